"""The ``bond-kernels`` command: ``info`` (versions, backends and why one is missing) and ``demo`` (the
J-BOND main job).  Benchmarks run through pytest: ``pytest benchmarks/ --benchmark-only``."""

import argparse
import sys


def _info(args):
    from . import info

    print(info())
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(prog="bond-kernels", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_info = sub.add_parser("info", help="versions and available backends")
    p_info.set_defaults(func=_info)
    try:
        from .demo import add_arguments as _demo_args
    except ImportError:
        _demo_args = None
    if _demo_args is not None:
        _demo_args(sub.add_parser("demo", help="J-BOND on a small transformers causal LM (the main job)"))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
