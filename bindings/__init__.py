"""Thin adapters of alignops into other people's training code (transformers, TRL).

Imported as ``alignops.bindings``; only calls the public ``alignops`` API.
"""
