"""The gradwatch dashboard inside a real TensorBoard page, driven as a user drives it (a
Playwright page of ``chromium.page()``): open the tab, pick a stat, type a filter, choose
a grouping, click an alert, hover a cell; read back what is drawn; time and screenshot it.
"""

from __future__ import annotations

import time
from typing import Any

FRAME = "plugin_entry.html?name=gradwatch"

# What the dashboard shows, read from its DOM (run inside the plugin's frame).
SNAPSHOT = """() => {
  const root = document.querySelector('.gw-root[data-ready=true]');
  if (!root) return null;
  const layerOf = (c) => c.closest('.gw-row').dataset.layer;
  return {
    stat: root.dataset.stat, filter: root.dataset.filter, group: root.dataset.group,
    scale: root.dataset.scale,
    barLegend: [...document.querySelectorAll('.gw-bar .gw-legend')].map((e) => e.textContent),
    options: [...document.querySelectorAll('.gw-stat option')].map((o) => o.value),
    legend: document.querySelector('.gw-legend').textContent,
    status: document.querySelector('.gw-status').textContent,
    imgs: document.querySelectorAll('img').length,
    runs: [...document.querySelectorAll('.gw-run')].map((s) => {
      const groups = [];
      for (const e of s.querySelectorAll('.gw-heatmap > *')) {
        if (e.classList.contains('gw-group')) groups.push({ title: e.textContent, rows: [] });
        else if (e.classList.contains('gw-row')) {
          if (!groups.length) groups.push({ title: null, rows: [] });
          groups[groups.length - 1].rows.push(e.dataset.layer);
        }
      }
      const rows = [...s.querySelectorAll('.gw-row')];
      return {
        run: s.querySelector('h2').textContent,
        sub: s.querySelector('.gw-sub').textContent,
        rows: rows.map((r) => r.dataset.layer),
        labels: rows.map((r) => r.querySelector('.gw-label').textContent),
        titles: rows.map((r) => r.querySelector('.gw-label').title),
        flagged: rows.filter((r) => r.querySelector('.gw-label.gw-has-alert'))
          .map((r) => r.dataset.layer),
        cells: rows.map((r) => r.querySelectorAll('.gw-cell').length),
        groups,
        marked: [...s.querySelectorAll('.gw-cell.gw-alerted')].map(
          (c) => [layerOf(c), Number(c.dataset.step)]),
        focus: [...s.querySelectorAll('.gw-cell.gw-focus')].map(
          (c) => [layerOf(c), Number(c.dataset.step)]),
        alerts: [...s.querySelectorAll('tr.gw-alert')].map(
          (tr) => [...tr.querySelectorAll('td')].map((td) => td.textContent)),
        open: s.open,
        legend: [...s.querySelectorAll('.gw-legend')].map((e) => e.textContent),
        why: [...s.querySelectorAll('.gw-why')].map((d) => ({
          kind: d.dataset.kind, cause: d.dataset.cause, open: d.open,
          summary: d.querySelector('summary').textContent,
          hint: d.querySelector('p.gw-hint') ? d.querySelector('p.gw-hint').textContent : '',
        })),
        missing: s.querySelector('.gw-missing') ? s.querySelector('.gw-missing').textContent
          : null,
        ticks: [...s.querySelectorAll('.gw-axis span')].map((t) => {
          const r = t.getBoundingClientRect();
          return [t.textContent, r.left, r.right];
        }),
        colours: [...new Set([...s.querySelectorAll('.gw-cell')].map((c) => c.style.background))],
      };
    }),
  };
}"""

# Is the row of a layer (or the focused cell) inside the frame's viewport, below the bar?
VISIBLE = """(layer) => {
  const e = layer === null ? document.querySelector('.gw-cell.gw-focus')
    : [...document.querySelectorAll('.gw-row')].find((r) => r.dataset.layer === layer);
  if (!e) return null;
  const r = e.getBoundingClientRect();
  const bar = document.querySelector('.gw-bar').getBoundingClientRect();
  return r.top >= bar.bottom && r.bottom <= window.innerHeight && r.width > 0;
}"""

TIMINGS = """() => {
  const drawn = performance.getEntriesByName('gradwatch:drawn')[0];
  const data = performance.getEntriesByType('resource').find((e) => e.name.includes('data?stat='));
  return {
    drawn: drawn ? performance.timeOrigin + drawn.startTime : null,
    data_ms: data ? data.responseEnd - data.startTime : null,
    draw_ms: data && drawn ? drawn.startTime - data.responseEnd : null,
    data_bytes: data ? data.encodedBodySize : null,
  };
}"""


class Dashboard:
    def __init__(self, page: Any) -> None:
        self.page = page

    @property
    def frame(self) -> Any:
        for f in self.page.frames:
            if FRAME in f.url:
                return f
        raise LookupError("the gradwatch frame is not in the page")

    def open(self, url: str, timeout: float = 120) -> dict[str, float]:
        """Navigate to the GRADWATCH tab; wait until the rows are drawn. Returns the times:
        ``navigation_ms`` (navigation start -> rows drawn, from the pages' own clocks),
        ``wall_ms`` (the same seen from here), ``frame_ms`` (navigation start -> the
        plugin's frame made by TensorBoard's app), ``data_ms`` (the data request alone) and
        ``draw_ms`` (its response -> rows drawn)."""
        t0 = time.perf_counter()
        self.page.goto(url + "/#gradwatch")
        deadline = time.monotonic() + timeout
        while True:
            try:
                frame = self.frame
                break
            except LookupError:
                if time.monotonic() > deadline:
                    raise
                self.page.wait_for_timeout(100)
        frame.wait_for_selector(".gw-root[data-ready=true]", state="attached",
                                timeout=timeout * 1000)
        wall = (time.perf_counter() - t0) * 1000
        nav_start = self.page.evaluate("performance.timeOrigin")
        t = frame.evaluate(TIMINGS)
        return {"navigation_ms": t["drawn"] - nav_start, "wall_ms": wall,
                "frame_ms": frame.evaluate("performance.timeOrigin") - nav_start,
                "data_ms": t["data_ms"], "draw_ms": t["draw_ms"],
                "data_bytes": t["data_bytes"]}

    def snapshot(self) -> dict[str, Any]:
        return dict(self.frame.evaluate(SNAPSHOT))

    def wait(self, timeout: float = 60, **drawn: str) -> dict[str, Any]:
        """Wait until the drawn stat/filter/group are ``drawn``; return the snapshot."""
        want = "&&".join(f"r.dataset.{k} === {v!r}" for k, v in drawn.items()) or "true"
        self.frame.wait_for_function(
            f"() => {{ const r = document.querySelector('.gw-root[data-ready=true]'); "
            f"return r && {want}; }}", timeout=timeout * 1000)
        return self.snapshot()

    def set_stat(self, stat: str) -> dict[str, Any]:
        self.frame.select_option(".gw-stat", stat)
        return self.wait(stat=stat)

    def set_filter(self, text: str) -> dict[str, Any]:
        self.frame.fill(".gw-filter", text)
        return self.wait(filter=text)

    def set_scale(self, mode: str) -> dict[str, Any]:
        self.frame.select_option(".gw-scale", mode)
        return self.wait(scale=mode)

    def toggle_run(self, run: str) -> dict[str, Any]:
        """Click a run's heading (it folds or unfolds)."""
        self.frame.locator(f".gw-run[data-run='{run}'] > summary").click()
        self.page.wait_for_timeout(100)
        return self.snapshot()

    def set_group(self, mode: str) -> dict[str, Any]:
        self.frame.select_option(".gw-group-by", mode)
        return self.wait(group=mode)

    def pick_alert(self, layer: str, step: int) -> dict[str, Any]:
        """Click the alert row of ``layer`` at ``step``; wait for its cell to be focused."""
        row = self.frame.locator(f"tr.gw-alert[data-step='{int(step)}']")
        for i in range(row.count()):
            if row.nth(i).get_attribute("data-layer") == layer:
                row.nth(i).click()
                break
        else:
            raise LookupError(f"no alert row for {layer!r} at step {step}")
        self.frame.wait_for_selector(".gw-cell.gw-focus", state="attached")
        return self.snapshot()

    def visible(self, layer: str | None = None) -> bool:
        """Whether the row of ``layer`` (None: the focused cell) is in view."""
        return bool(self.frame.evaluate(VISIBLE, layer))

    def hover(self, layer: str, column: int) -> str | None:
        """Move the mouse over a cell; the tooltip's text (None when hidden)."""
        rows = self.frame.locator(".gw-row")
        for i in range(rows.count()):
            if rows.nth(i).get_attribute("data-layer") == layer:
                rows.nth(i).locator(".gw-cell").nth(column).hover()
                break
        else:
            raise LookupError(f"no row for {layer!r}")
        return self.frame.evaluate(
            "() => { const t = document.querySelector('.gw-tip'); "
            "return t.hidden ? null : t.textContent; }")

    def screenshot(self, path: str, width: int = 1280, max_height: int = 2000) -> None:
        """The page at ``width``, tall enough for the whole dashboard (up to ``max_height``)."""
        before = self.page.viewport_size
        frame_el = self.page.query_selector(f"iframe[src*='{FRAME}']")
        top = frame_el.bounding_box()["y"] if frame_el else 0
        height = self.frame.evaluate("() => document.documentElement.scrollHeight")
        self.page.set_viewport_size({"width": width,
                                     "height": int(min(max_height, top + height + 8))})
        self.page.wait_for_timeout(300)  # TensorBoard lays the frame out again
        self.page.screenshot(path=path)
        self.page.set_viewport_size(before)
        self.page.wait_for_timeout(300)
