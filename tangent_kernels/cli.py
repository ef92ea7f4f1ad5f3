"""The command line: ``tangent-kernels <command>`` or ``python -m tangent_kernels <command>``."""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional


def _info(_: argparse.Namespace) -> int:
    from ._ext import info

    print(info())
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__, demo

    parser = argparse.ArgumentParser(
        prog="tangent-kernels", description="Empirical neural tangent kernels for PyTorch models."
    )
    parser.add_argument("--version", action="version", version=f"tangent_kernels {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="command")
    demo_parser = commands.add_parser(
        "demo", help="eNTK kernel regression on scikit-learn's digits", description=demo.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_arguments(demo_parser)
    demo_parser.set_defaults(run=demo.main)
    info_parser = commands.add_parser("info", help="which backends (C++, CUDA, Triton) are active, and why not")
    info_parser.set_defaults(run=_info)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
