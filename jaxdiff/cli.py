"""`jaxdiff` command line: thin wrappers over library functions.

A user error (a JaxdiffError: bad path, bad file, bad flag) prints one line to stderr and exits 2.
"""
from __future__ import annotations

import argparse
import sys


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's default prints usage over several lines
        print(f"jaxdiff: error: {message} (see `jaxdiff --help`)", file=sys.stderr)
        raise SystemExit(2)


def _convert(args) -> None:
    from jaxdiff.loading import load
    pipe = load(args.src, dtype=args.dtype)
    pipe.save(args.dst)
    print(f"wrote {args.dst}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="jaxdiff", description="Stable Diffusion in JAX.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    conv = sub.add_parser("convert", help="read a diffusers or jaxdiff folder, write jaxdiff's native format")
    conv.add_argument("src", help="diffusers folder (with model_index.json) or jaxdiff folder")
    conv.add_argument("dst", help="output folder (written atomically)")
    conv.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                      help="param dtype to store")
    conv.set_defaults(run=_convert)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from jaxdiff.errors import JaxdiffError
    try:
        args.run(args)
    except JaxdiffError as e:
        print(f"jaxdiff: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("jaxdiff: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
