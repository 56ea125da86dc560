"""The ``gradwatch`` command (also ``python -m gradwatch``)."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gradwatch", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train a broken and a healthy net, watched")
    demo.add_argument("--logdir", default="runs", help="where TensorBoard runs go (runs)")
    demo.add_argument("--steps", type=int, default=300, help="training steps per net (300)")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from gradwatch import demo as d

        d.run(args.logdir, args.steps)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
