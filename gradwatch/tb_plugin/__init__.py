"""The ``gradwatch`` TensorBoard dashboard: a dynamic plugin (``tensorboard_plugins`` entry
point) with a plain ES-module frontend, no build step.

The backend reads gradwatch's scalars and alert texts through TensorBoard's data provider
and serves them as JSON; ``static/index.js`` draws a layer x step heatmap per stat (log
colour scale), a stat selector and the alert list. Routes, under
``/data/plugin/gradwatch/``: ``index.js`` and ``data?stat=<stat>``.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable

from tensorboard.plugins import base_plugin  # a core dependency

from gradwatch.reader import (
    ALERT_COUNT,
    ALERT_TEXT_TAGS,
    PREFIX,
    build_run,
    json_number,
    split_tag,
)

PLUGIN_NAME = "gradwatch"
STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
MAX_STEPS = 500  # columns per heatmap: longer runs are downsampled by TensorBoard
DEFAULT_STAT = "grad_rms"



def _respond(request: Any, body: bytes | str, mimetype: str, code: int = 200) -> Any:
    from tensorboard.backend import http_util

    return http_util.Respond(request, body, mimetype, code=code)


class GradwatchPlugin(base_plugin.TBPlugin):
    """Serves the dashboard's module and its data."""

    plugin_name = PLUGIN_NAME

    def __init__(self, context: base_plugin.TBContext) -> None:
        self._provider = context.data_provider

    def get_plugin_apps(self) -> dict[str, Callable[..., Any]]:
        from werkzeug import wrappers

        return {
            "/index.js": wrappers.Request.application(self._serve_js),
            "/data": wrappers.Request.application(self._serve_data),
        }

    def is_active(self) -> bool:
        """Enabled when some run holds a ``gradwatch/`` scalar."""
        if self._provider is None:
            return False
        from tensorboard import context

        found = self._provider.list_scalars(context.RequestContext(), experiment_id="",
                                            plugin_name="scalars")
        return any(t.startswith(PREFIX) for tags in found.values() for t in tags)

    def frontend_metadata(self) -> base_plugin.FrontendMetadata:
        return base_plugin.FrontendMetadata(es_module_path="/index.js", tab_name="gradwatch")

    # -- routes -------------------------------------------------------------------------------
    def _serve_js(self, request: Any) -> Any:
        with open(os.path.join(STATIC, "index.js"), "rb") as f:
            return _respond(request, f.read(), "application/javascript")

    def _serve_data(self, request: Any) -> Any:
        from tensorboard import plugin_util

        stat = request.args.get("stat", DEFAULT_STAT)
        ctx = plugin_util.context(request.environ)
        eid = plugin_util.experiment_id(request.environ)
        return _respond(request, json.dumps(self.data(ctx, eid, stat)), "application/json")

    # -- data ---------------------------------------------------------------------------------
    def data(self, ctx: Any, eid: str, stat: str) -> dict[str, Any]:
        """Every run with gradwatch data: the ``stat`` heatmap and the alerts."""
        from tensorboard.data import provider as P

        listing = self._provider.list_scalars(ctx, experiment_id=eid, plugin_name="scalars")
        stats: set[str] = set()
        wanted: dict[str, list[str]] = {}
        order: dict[str, list[str]] = {}
        for run, tags in listing.items():
            mine = [t for t in tags if t.startswith(PREFIX)]
            if not mine:
                continue
            seen: dict[str, None] = {}
            for t in mine:
                st = split_tag(t)
                if st is not None:
                    stats.add(st[0])
                    seen.setdefault(st[1], None)
            order[run] = list(seen)
            wanted[run] = [t for t in mine if (split_tag(t) or ("",))[0] == stat
                           or t.startswith(PREFIX + ALERT_COUNT + "/")]
        tags = sorted({t for ts in wanted.values() for t in ts})
        read = self._provider.read_scalars(
            ctx, experiment_id=eid, plugin_name="scalars", downsample=MAX_STEPS,
            run_tag_filter=P.RunTagFilter(runs=list(wanted), tags=tags),
        ) if tags else {}
        texts = self._alert_texts(ctx, eid, list(wanted))
        out = []
        for run in sorted(wanted):
            series = [(t, [(d.step, float(d.value)) for d in read.get(run, {}).get(t, [])])
                      for t in wanted[run]]
            rd = build_run(run, run, series, texts.get(run, []))
            have, steps, values = rd.matrix(stat)
            rows = dict(zip(have, values))
            layers = [la for la in order[run] if la in rows]  # forward order
            out.append({
                "run": run,
                "layers": layers,
                "steps": steps,
                "values": [[json_number(v) for v in rows[la]] for la in layers],
                "alerts": [a.to_dict() for a in rd.alerts],
                "alert_total": sum(rd.alert_counts.values()),
            })
        from gradwatch.buffers import STATS

        return {"stat": stat, "stats": [s for s in STATS if s in stats], "runs": out}

    def _alert_texts(self, ctx: Any, eid: str, runs: list[str]) -> dict[str, list[str]]:
        from tensorboard.data import provider as P

        listing = self._provider.list_tensors(ctx, experiment_id=eid, plugin_name="text")
        tags = sorted({t for r in runs for t in listing.get(r, {}) if t in ALERT_TEXT_TAGS})
        if not tags:
            return {}
        read = self._provider.read_tensors(
            ctx, experiment_id=eid, plugin_name="text", downsample=100_000,
            run_tag_filter=P.RunTagFilter(runs=runs, tags=tags),
        )
        out: dict[str, list[str]] = {}
        for run, by_tag in read.items():
            for data in by_tag.values():
                for d in data:
                    for item in d.numpy.flat:
                        out.setdefault(run, []).append(
                            item.decode("utf-8", "replace") if isinstance(item, bytes)
                            else str(item))
        return out


class GradwatchLoader(base_plugin.TBLoader):
    """Entry point object: ``tensorboard_plugins = gradwatch = gradwatch.tb_plugin:...``."""

    def load(self, context: base_plugin.TBContext) -> GradwatchPlugin:
        return GradwatchPlugin(context)
