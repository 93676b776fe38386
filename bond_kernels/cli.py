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
    # Listed whatever is installed: bond_kernels.demo imports only torch and bond_kernels, and the demo's own
    # requirements are looked up when it runs (bond_kernels._demo.deps), with one message if one is missing.
    from ._demo.deps import HELP as _demo_help
    from .demo import add_arguments as _demo_args

    _demo_args(sub.add_parser("demo", help=_demo_help, description=_demo_help + "."))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
