"""The ``oss-jax`` command line."""

from __future__ import annotations

import argparse
import sys

from oss_jax.checkpoint import CheckpointError


def _convert(args: argparse.Namespace) -> None:
    from convert import convert

    out = convert(args.src, args.dst, overwrite=args.overwrite, progress=not args.no_progress)
    print(f"wrote {out}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="oss-jax", description="gpt-oss in JAX/Flax.")
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("convert", help="convert a Hugging Face or OpenAI checkpoint to orbax",
                       description="Convert SRC (HF directory, OpenAI original/ directory or hub repo id) "
                                   "to an orbax checkpoint at DST, checking every tensor.")
    c.add_argument("src")
    c.add_argument("dst")
    c.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    c.add_argument("--no-progress", action="store_true", help="no progress bar")
    c.set_defaults(func=_convert)
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (CheckpointError, ValueError, OSError) as e:
        print(f"oss-jax {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"oss-jax {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
