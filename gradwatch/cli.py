"""The ``gradwatch`` command (also ``python -m gradwatch``)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"size must be WIDTHxHEIGHT in pixels, got {text!r}") from None
    if not (64 <= w <= 20000 and 64 <= h <= 20000):
        raise argparse.ArgumentTypeError(f"size must be 64..20000 pixels a side, got {text!r}")
    return w, h


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gradwatch", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train a broken and a healthy net, watched")
    demo.add_argument("--logdir", default="runs", help="where TensorBoard runs go (runs)")
    demo.add_argument("--steps", type=int, default=300, help="training steps per net (300)")
    rep = sub.add_parser("report", help="latest stats per layer and every alert of a logdir")
    rep.add_argument("logdir", help="a TensorBoard log directory written by gradwatch")
    rep.add_argument("--json", action="store_true", help="print JSON instead of tables")
    rep.add_argument("--stats", default=None,
                     help="comma-separated stats to show as columns, or all (default: all that "
                          "fit the terminal)")
    rep.add_argument("--fail-on-alert", action="store_true",
                     help="exit with status 1 when any run holds an alert (for CI)")
    plot = sub.add_parser("plot", help="gradient-flow heatmap of a logdir as a PNG")
    plot.add_argument("logdir", help="a TensorBoard log directory written by gradwatch")
    plot.add_argument("-o", "--output", default="flow.png", help="PNG file to write (flow.png)")
    plot.add_argument("--size", type=_size, default=None,
                      help="WIDTHxHEIGHT in pixels (default: 1200 wide, height by layers)")
    return parser


def _error(msg: str) -> int:
    print(f"gradwatch: error: {msg}", file=sys.stderr)
    return 2


def _report(args: argparse.Namespace) -> int:
    from gradwatch import textreport
    from gradwatch.reader import read_logdir

    print(f"reading {args.logdir} ...", file=sys.stderr)
    runs = read_logdir(args.logdir)
    n_alerts = sum(len(r.alerts) for r in runs)
    if args.json:
        print(json.dumps(textreport.to_json(runs, args.logdir), indent=2))
    else:
        textreport.require_rich()
        from rich.console import Console

        stats = None
        if args.stats == "all":
            from gradwatch.buffers import STATS

            stats = list(STATS)
        elif args.stats:
            stats = [s.strip() for s in args.stats.split(",")]
        textreport.print_report(runs, Console(), stats)
    return 1 if args.fail_on_alert and n_alerts else 0


def _plot(args: argparse.Namespace) -> int:
    from gradwatch import plot
    from gradwatch.reader import read_logdir

    plot.require_matplotlib()
    print(f"reading {args.logdir} ...", file=sys.stderr)
    runs = read_logdir(args.logdir)
    out = os.path.abspath(args.output)
    if not os.path.isdir(os.path.dirname(out)):
        return _error(f"cannot write {args.output!r}: its directory does not exist")
    plot.plot_runs(runs, out, args.size)
    print(f"wrote {args.output} ({len(runs)} run(s): {', '.join(r.name for r in runs)})",
          file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from gradwatch.reader import LogdirError

    try:
        if args.command == "demo":
            from gradwatch import demo as d

            d.run(args.logdir, args.steps)
        elif args.command == "report":
            return _report(args)
        elif args.command == "plot":
            return _plot(args)
    except (LogdirError, ImportError, OSError) as e:
        return _error(str(e))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
