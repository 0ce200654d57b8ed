"""Each kernel family registered as PyTorch custom ops ``alignops::<family>_fwd`` / ``_bwd``, with
a fake (meta) implementation and the autograd formula. Being custom ops, ``torch.compile`` (even
``fullgraph=True``) keeps each call one opaque node instead of tracing into chunk loops or a
Triton launch, and compiled backward graphs work too. The public functions call these ops."""
