"""How long the gradwatch dashboard takes to show a 12-block GPT-2-style run, and the
dashboard pictures of the docs.

Trains the transformer of ``tests/support/gpt2log.py`` (Hugging Face ``GPT2LMHeadModel`` from a
config, 40 steps, ``every=5``, one MLP broken on purpose), starts a fresh ``tensorboard`` on
it, and opens the GRADWATCH tab ``--repeat`` times in the system Chromium (Playwright, a
fresh page each time). Prints the median and range of:

* navigation -> rows drawn: from the start of the top page's navigation (TensorBoard's own
  app loads first) to the dashboard's ``gradwatch:drawn`` performance mark, both read from
  the pages' own clocks;
* the data request alone (``data?stat=grad_rms``, resource timing in the browser), and a
  direct GET of the same route from Python;
* drawing alone: from the data response to the mark;
* TensorBoard's share: navigation -> the plugin's frame made by TensorBoard's own app.

``--windows N`` times a long run instead: the trained run's layer order and last window,
written N times (with noise) through gradwatch's TensorBoard sink, N columns per row
(TensorBoard serves at most 500).

    python benchmarks/dashboard.py [--repeat 5] [--load-fast] [--windows 500] [--shots docs]

``--shots DIR`` writes the pictures of the README and docs/reading-results.md into DIR.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from tests.support import chromium, gpt2log  # noqa: E402
from tests.support.dashpage import Dashboard  # noqa: E402
from tests.support.tbserver import get, tensorboard  # noqa: E402

WIDTH = 1280


def summary(values: list[float]) -> str:
    return f"{statistics.median(values):.0f} ms (range {min(values):.0f}-{max(values):.0f})"


def shots(url: str, out: str, trained: gpt2log.Gpt2Run) -> None:
    """The states the docs show, each a PNG in ``out``."""
    with chromium.page(WIDTH, 900) as pg:
        dash = Dashboard(pg)
        dash.open(url)
        dash.screenshot(os.path.join(out, "dashboard.png"), WIDTH)
        dash.set_filter("mlp.c_fc")
        dash.screenshot(os.path.join(out, "dashboard-filter.png"), WIDTH)
        dash.set_filter("")
        dash.set_group("module")
        dash.screenshot(os.path.join(out, "dashboard-group.png"), WIDTH)
        dash.set_group("none")
        pg.set_viewport_size({"width": WIDTH, "height": 720})
        dash.frame.evaluate("() => window.scrollTo(0, 0)")
        dash.pick_alert(gpt2log.BROKEN, next(
            a.step for a in trained.alerts if a.layer == gpt2log.BROKEN))
        pg.mouse.move(WIDTH - 20, 700)  # no tooltip over the picture
        pg.wait_for_timeout(300)
        pg.screenshot(path=os.path.join(out, "dashboard-alert.png"))
    for name in ("dashboard", "dashboard-filter", "dashboard-group", "dashboard-alert"):
        path = os.path.join(out, name + ".png")
        print(f"wrote {path} ({os.path.getsize(path) // 1024} KiB)")


def long_run(trained: gpt2log.Gpt2Run, logdir: str, windows: int) -> None:
    """``windows`` windows of the trained run's last stats, each scaled by a random factor,
    written by gradwatch's own sink with the trained run's layer order."""
    import random

    from torch.utils.tensorboard import SummaryWriter

    from gradwatch.sinks.tensorboard import TensorBoardSink
    from gradwatch.snapshot import Snapshot

    rng = random.Random(0)
    sink = TensorBoardSink(SummaryWriter(os.path.join(logdir, "long")), owns=True)
    layers = [(la, trained.types[la]) for la in trained.layers]
    for w in range(1, windows + 1):
        f = 10 ** rng.uniform(-0.3, 0.3)
        stats = {la: {k: v * f for k, v in st.items()} for la, st in trained.latest.items()}
        sink.write(Snapshot(w * trained.every, stats), [], layers=layers)
    sink.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--load-fast", action="store_true",
                    help="read the logdir with TensorBoard's Rust data server")
    ap.add_argument("--windows", type=int, default=0,
                    help="time a run of this many windows made from the trained one")
    ap.add_argument("--shots", default=None, help="write the docs pictures into this folder")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        trained = gpt2log.train(os.path.join(tmp, "logs"))
        print(f"trained {trained.steps} steps in {time.perf_counter() - t0:.1f} s: "
              f"{len(trained.layers)} watched layers, {len(trained.alerts)} alert(s)")
        logdir = trained.logdir
        if args.windows:
            logdir = os.path.join(tmp, "long")
            long_run(trained, logdir, args.windows)
        with tensorboard(logdir, tmp, load_fast=args.load_fast) as url:
            direct = []
            for _ in range(args.repeat):
                t = time.perf_counter()
                get(url + "/data/plugin/gradwatch/data?stat=grad_rms")
                direct.append((time.perf_counter() - t) * 1000)
            runs = []
            for _ in range(args.repeat):
                with chromium.page(WIDTH, 1000) as pg:
                    times = Dashboard(pg).open(url)
                    rows = len(Dashboard(pg).snapshot()["runs"][0]["rows"])
                runs.append(times)
            print(f"provider: {'Rust data server' if args.load_fast else 'Python multiplexer'}; "
                  f"{rows} rows x {args.windows or trained.steps // trained.every} windows "
                  f"drawn, data {runs[0]['data_bytes']} bytes")
            print("TensorBoard's app -> frame:", summary([r["frame_ms"] for r in runs]))
            print("navigation -> rows drawn:", summary([r["navigation_ms"] for r in runs]))
            print("data request (browser):  ", summary([r["data_ms"] for r in runs]))
            print("data request (direct GET):", summary(direct))
            print("drawing (response -> drawn):", summary([r["draw_ms"] for r in runs]))
            if args.shots and not args.windows:
                shots(url, args.shots, trained)
    load = os.getloadavg()
    print(f"{os.cpu_count()} cores, load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")


if __name__ == "__main__":
    main()
