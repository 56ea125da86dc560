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
                     help="comma-separated stats to show as columns, or all (default: the "
                          "alerted stats and as many others as fit the terminal)")
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


def _emit(text: str) -> None:
    """Print to stdout; a reader that went away (``| head``) ends the output quietly."""
    try:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()
    except BrokenPipeError:
        # the interpreter's own flush at exit would fail again: point stdout at nothing
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def _report(args: argparse.Namespace) -> int:
    from gradwatch import textreport
    from gradwatch.reader import read_logdir

    try:
        stats = textreport.parse_stats(args.stats)
    except ValueError as e:
        return _error(str(e))
    print(f"reading {args.logdir} ...", file=sys.stderr)
    runs = read_logdir(args.logdir)
    status = 1 if args.fail_on_alert and any(r.alerts for r in runs) else 0
    if args.json:
        _emit(json.dumps(textreport.to_json(runs, args.logdir), indent=2))
    else:
        _emit(textreport.report_text(runs, stats, textreport.terminal_width()))
    return status


def _logdir_not_a_file(logdir: str) -> None:
    if os.path.exists(logdir) and not os.path.isdir(logdir):
        from gradwatch.reader import LogdirError

        raise LogdirError(f"logdir {logdir!r} is a file: give a directory for the runs")


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
            _logdir_not_a_file(args.logdir)
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
