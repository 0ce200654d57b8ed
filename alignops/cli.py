"""The alignops command: benchmarks (alignops bench), the ahead-of-time kernel build report
(alignops kernels) and the reference-log-prob cache (alignops precompute, alignops cache). Run
"alignops <command> --help" for a command's options."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="alignops", description=__doc__)
    parser.add_argument(
        "command",
        choices=["bench", "kernels", "precompute", "cache"],
        help="bench: time and memory against the alternatives; kernels: compile every Triton kernel "
        "for sm_80 / sm_90a and report registers and spills; precompute: score a dataset with a "
        "reference model into a cache; cache: verify or show a cache",
    )
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    args, rest = parser.parse_known_args(argv[:1])
    rest = argv[1:]
    if args.command == "bench":
        from alignops.bench.cli import main as bench_main

        return int(bench_main(rest) or 0)
    if args.command == "precompute":
        from alignops.cache.cli import precompute_main

        return precompute_main(rest)
    if args.command == "cache":
        from alignops.cache.cli import cache_main

        return cache_main(rest)
    from alignops.build_report import main as report_main

    return int(report_main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
