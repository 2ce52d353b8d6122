"""The `distillery` command."""

import argparse
import sys

from pipeline.params import ParamsError, load_params


def cmd_validate(args):
    params = load_params(args.params)
    runs = ", ".join(name for _, _, name in params.runs())
    print(f"{args.params}: valid (profile {params.profile}; runs: {runs})")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="distillery", description="One-step diffusion distillation pipeline.")
    sub = parser.add_subparsers(dest="command", required=True)
    validate = sub.add_parser("validate", help="check params.yaml against the schema, before any compute")
    validate.add_argument("--params", default="params.yaml")
    validate.set_defaults(func=cmd_validate)
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except ParamsError as e:
        print(e, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
