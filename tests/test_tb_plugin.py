"""The gradwatch TensorBoard plugin in a real ``tensorboard`` server, and in a real browser
(the system Chromium driven by Playwright): a small net with a hostile layer name, and a
12-block GPT-2-style transformer read by two fresh TensorBoard processes."""

import json
import struct

import pytest

from gradwatch.tb_plugin import MODULES, GradwatchLoader, GradwatchPlugin
from tests.support import gpt2log
from tests.support.chromium import page
from tests.support.dashpage import Dashboard
from tests.support.flowlog import HOSTILE, LAYERS, PARAM_LAYERS, train
from tests.support.tbserver import declared_entry_point, get, get_json, has_data_server, tensorboard


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tb")
    written = train(str(tmp / "logs"))
    with tensorboard(str(tmp / "logs"), str(tmp)) as url:
        yield url, written


def png_size(path):
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


def test_entry_point_names_the_loader():
    module, _, name = declared_entry_point().partition(":")
    import importlib

    assert getattr(importlib.import_module(module), name) is GradwatchLoader
    assert GradwatchPlugin.plugin_name == "gradwatch"


@pytest.mark.slow
def test_server_lists_the_plugin_enabled_and_serves_its_routes(server):
    url, written = server
    listing = get_json(url + "/data/plugins_listing")
    assert listing["gradwatch"]["enabled"] is True
    assert listing["gradwatch"]["loading_mechanism"] == {
        "type": "IFRAME", "module_path": "/data/plugin/gradwatch/index.js"}
    status, ctype, body = get(url + "/data/plugin/gradwatch/index.js")
    assert status == 200 and "javascript" in ctype and b"export async function render" in body
    for name in MODULES:  # every module index.js imports is served
        assert f"'./{name}'".encode() in body or name == "index.js"
        status, ctype, _ = get(url + "/data/plugin/gradwatch/" + name)
        assert status == 200 and "javascript" in ctype
    status, ctype, body = get(url + "/data/plugin/gradwatch/data?stat=act_zero_frac")
    assert status == 200 and ctype.startswith("application/json")
    data = json.loads(body)
    assert data["stat"] == "act_zero_frac" and "grad_rms" in data["stats"]
    (run,) = data["runs"]
    assert run["run"] == written.run and run["layers"] == LAYERS
    assert run["order"] == "record"
    assert run["types"] == ["Linear", "Tanh", "Linear", "ReLU", "Linear"]
    assert run["steps"] == list(range(written.every, written.steps + 1, written.every))
    assert run["values"][LAYERS.index(HOSTILE)] == [1.0] * len(run["steps"])
    assert [(a["step"], a["layer"], a["kind"], a["cause"], a["hint"]) for a in run["alerts"]] \
        == [(a.step, a.layer, a.kind, a.cause, a.hint) for a in written.alerts]
    assert run["alert_total"] == len(written.alerts)
    grad = get_json(url + "/data/plugin/gradwatch/data")  # default stat
    assert grad["stat"] == "grad_rms" and grad["runs"][0]["layers"] == PARAM_LAYERS
    import urllib.error

    with pytest.raises(urllib.error.HTTPError) as err:
        get(url + "/data/plugin/gradwatch/data?stat=grad_rsm")
    assert err.value.code == 400
    msg = json.loads(err.value.read())["error"]
    assert "stat must be one of" in msg and "'grad_rms'" in msg and "'grad_rsm'" in msg


@pytest.mark.slow
def test_dashboard_in_headless_chromium(server, tmp_path):
    url, written = server
    with page(1400, 900) as pg:
        dash = Dashboard(pg)
        dash.open(url)
        seen = dash.snapshot()
        # default view: grad_rms, one heatmap row per layer that has parameters
        assert seen["stat"] == "grad_rms" and "act_zero_frac" in seen["options"]
        assert "(log |value|)" in seen["legend"]
        (run,) = seen["runs"]
        assert run["run"] == written.run
        assert run["rows"] == PARAM_LAYERS
        assert run["cells"] == [written.steps // written.every] * len(PARAM_LAYERS)
        assert len(run["alerts"]) == len(written.alerts) > 0

        # switch the stat selector: now every watched layer is a row, the payload among them
        seen = dash.set_stat("act_zero_frac")
        assert "0" in seen["legend"] and "1 (linear)" in seen["legend"]
        (run,) = seen["runs"]
        assert run["rows"] == LAYERS == run["labels"]
        assert [a[:3] for a in run["alerts"]] == [
            [str(a.step), a.layer, a.kind] for a in written.alerts]
        # each alert's cause is shown as written (a measured cause, not "unknown"), the hint
        # once per kind and cause, folded under its first sentence
        assert [a[6:] for a in run["alerts"]] == [[a.cause] for a in written.alerts]
        assert [(w["kind"], w["cause"], w["hint"]) for w in run["why"]] == [
            ("dead", "bias_shift", written.alerts[0].hint)]
        assert written.alerts[0].cause == "bias_shift" and "mean -50" in written.alerts[0].hint
        assert [HOSTILE, written.alerts[0].step] in run["marked"]
        assert run["flagged"] == [HOSTILE]  # the label of an alerted layer is marked
        # the name was shown as text: no element was made from it, and it is a real payload
        assert seen["imgs"] == 0
        assert dash.frame.evaluate(f"""() => {{ const t = document.createElement('template');
            t.innerHTML = {json.dumps(HOSTILE)}; return t.content.querySelectorAll('img').length;
            }}""") == 1
        assert pg.dialogs == []

        # the mouse over a cell shows its layer, step, value, module type and alert
        first = written.alerts[0]
        col = first.step // written.every - 1
        tip = dash.hover(HOSTILE, col)
        assert tip == f"{HOSTILE}\nstep {first.step}\nact_zero_frac = 1\nReLU\nalert: dead"
        assert [a.step for a in written.alerts if a.layer == HOSTILE] == [first.step]
        tip = dash.hover(HOSTILE, col - 1)
        assert tip == f"{HOSTILE}\nstep {first.step - written.every}\nact_zero_frac = 1\nReLU"

        # an alert about another stat than the one shown switches to its stat
        seen = dash.set_stat("grad_rms")
        assert HOSTILE not in seen["runs"][0]["rows"]
        seen = dash.pick_alert(HOSTILE, first.step)
        assert seen["stat"] == "act_zero_frac" and seen["runs"][0]["focus"] == [
            [HOSTILE, first.step]]

        # a glob that matches nothing says so; the filter does not touch the alert list
        seen = dash.set_filter("nothing*")
        assert seen["runs"][0]["rows"] == [] and len(seen["runs"][0]["alerts"]) > 0
        seen = dash.set_filter("<img")  # a substring of the payload
        assert seen["runs"][0]["rows"] == [HOSTILE]

        shot = tmp_path / "dashboard.png"
        pg.screenshot(path=str(shot))
    assert png_size(shot) == (1400, 900)
    assert shot.stat().st_size > 10_000


@pytest.mark.slow
def test_colour_scales_suit_the_stat(server):
    """The scale functions in the browser: log for magnitudes, a fixed 0..1 for fractions,
    a diverging one for the signed act_mean."""
    url, _ = server
    with page(800, 600) as pg:
        dash = Dashboard(pg)
        dash.open(url)
        got = dash.frame.evaluate("""async () => {
          const c = await import('/data/plugin/gradwatch/colour.js');
          const runs = [{ values: [[1e-6, 1e-3, 'nan', null, 0]] }];
          const log = c.makeScale('grad_rms', runs);
          const lin = c.makeScale('act_zero_frac', [{ values: [[1.0]] }]);
          const sig = c.makeScale('act_mean', [{ values: [[-2, 0.5, 1e-9]] }]);
          return {
            kinds: ['grad_rms', 'act_std', 'out_grad_rms', 'grad_max', 'act_zero_frac',
                    'act_sat_frac', 'act_mean'].map(c.scaleKind),
            log: [log.colour(1e-6), log.colour(1e-3), log.colour(NaN), log.colour(null),
                  log.colour(0), log.low, log.high],
            lin: [lin.colour(0), lin.colour(0.5), lin.colour(1), c.viridis(0.5)],
            sig: [sig.colour(2), sig.colour(-2), sig.colour(0), sig.colour(1e-9)],
          };
        }""")
    assert got["kinds"] == ["log"] * 4 + ["linear"] * 2 + ["signed"]
    viridis_lo, viridis_hi = "rgb(68, 1, 84)", "rgb(253, 231, 37)"
    assert got["log"] == [viridis_lo, viridis_hi, "#ff2bd6", "#e3e3e3", "#1b1b1b",
                          "1e-06", "0.001"]
    # fractions: the same colour for the same value whatever the data holds (only 1.0 here)
    assert got["lin"] == [viridis_lo, got["lin"][3], viridis_hi, got["lin"][3]]

    def rgb(s):
        return [int(x) for x in s[4:-1].split(",")]

    pos, neg, zero, tiny = map(rgb, got["sig"])
    assert pos[0] > pos[2] + 100 and neg[2] > neg[0] + 100  # red above 0, blue below
    assert zero == tiny == [247, 247, 247]  # white at 0 and far below the top decades


# -- the 12-block transformer ------------------------------------------------------------------

def rows_for(g, stat):
    """The layers having ``stat``, in the watcher's forward order."""
    return [la for la in g.layers if stat in g.latest[la]]


PROVIDERS = [False, pytest.param(True, marks=pytest.mark.skipif(
    not has_data_server(), reason="tensorboard-data-server has no binary here"))]


@pytest.mark.slow
@pytest.mark.parametrize("load_fast", PROVIDERS, ids=["python-provider", "rust-provider"])
def test_gpt2_rows_in_forward_order_in_a_fresh_tensorboard(gpt2, tmp_path, load_fast):
    """Each parameter starts its own TensorBoard process on the same logdir (the Python
    multiplexer, then the Rust data server): tag order is theirs, row order is the model's."""
    assert len(gpt2.layers) > 12 * 6  # every block's ln_1, c_attn, c_proj, ln_2, c_fc, c_proj
    with tensorboard(gpt2.logdir, str(tmp_path), load_fast=load_fast) as url:
        data = get_json(url + "/data/plugin/gradwatch/data?stat=grad_rms")
        (run,) = data["runs"]
        assert run["layers"] == rows_for(gpt2, "grad_rms") and run["order"] == "record"
        assert run["types"] == [gpt2.types[la] for la in run["layers"]]
        with page(1280, 1000) as pg:
            dash = Dashboard(pg)
            times = dash.open(url)
            seen = dash.snapshot()
            (shown,) = seen["runs"]
            assert shown["rows"] == rows_for(gpt2, "grad_rms")
            assert shown["sub"].startswith(f"{len(shown['rows'])} of {len(shown['rows'])} layers")
            assert "forward order" in shown["sub"]
            assert shown["cells"] == [gpt2.steps // gpt2.every] * len(shown["rows"])
            assert seen["stat"] == "grad_rms" and not pg.dialogs
            seen = dash.set_stat("act_std")
            assert seen["runs"][0]["rows"] == rows_for(gpt2, "act_std")
    assert 0 < times["data_ms"] < times["navigation_ms"] < 60_000


@pytest.mark.slow
def test_gpt2_filter_grouping_and_alerts_in_the_browser(gpt2, tmp_path):
    broken = [a for a in gpt2.alerts if a.layer == gpt2log.BROKEN]
    assert broken and broken[0].kind == "vanishing" and broken[0].stat == "grad_rms"
    grads = rows_for(gpt2, "grad_rms")
    with tensorboard(gpt2.logdir, str(tmp_path)) as url, page(1280, 1000) as pg:
        dash = Dashboard(pg)
        dash.open(url)
        (run,) = dash.snapshot()["runs"]
        assert run["rows"] == grads
        assert run["titles"] == [f"{la} ({gpt2.types[la]})" for la in grads]
        assert gpt2log.BROKEN in run["flagged"]
        dash.screenshot(str(tmp_path / "depth.png"))

        # filter: a substring, then a glob on the whole name, then several terms
        seen = dash.set_filter("C_ATTN")
        assert seen["runs"][0]["rows"] == [la for la in grads if "c_attn" in la]
        assert len(seen["runs"][0]["rows"]) == gpt2log.N_BLOCKS
        assert seen["runs"][0]["sub"].startswith(f"{gpt2log.N_BLOCKS} of {len(grads)} layers")
        seen = dash.set_filter("*.h.1?.mlp.*")
        assert seen["runs"][0]["rows"] == [la for la in grads if la.split(".")[2:4] in (
            ["10", "mlp"], ["11", "mlp"])]
        seen = dash.set_filter("h.7.*, ln_f")  # no glob matches a shortened name
        assert seen["runs"][0]["rows"] == ["transformer.ln_f"]
        seen = dash.set_filter("transformer.h.7.*, ln_f")
        assert seen["runs"][0]["rows"] == [la for la in grads if ".h.7." in la or "ln_f" in la]
        dash.screenshot(str(tmp_path / "filter.png"))

        # grouping by module: one group per name without its block number, in forward order
        # of their first layer, each a depth profile h.0 ... h.11
        dash.set_filter("")
        seen = dash.set_group("module")
        groups = seen["runs"][0]["groups"]
        keys = list(dict.fromkeys(
            ".".join("*" if p.isdigit() else p for p in la.split(".")) for la in grads))
        assert [g["title"].split(" · ")[0] for g in groups] == keys
        for g in groups:
            key = g["title"].split(" · ")[0]
            assert g["rows"] == [la for la in grads
                                 if ".".join("*" if p.isdigit() else p for p in la.split("."))
                                 == key]
        key = "transformer.h.*.attn.c_attn"
        c_attn = next(g for g in groups if g["title"].startswith(key))
        assert c_attn["title"] == f"{key} · Conv1D · {gpt2log.N_BLOCKS} layers"
        assert sorted(seen["runs"][0]["rows"]) == sorted(grads)
        labels = dict(zip(seen["runs"][0]["rows"], seen["runs"][0]["labels"]))
        assert [labels[la] for la in c_attn["rows"]] == [f"h.{i}" for i in range(gpt2log.N_BLOCKS)]
        dash.screenshot(str(tmp_path / "module.png"))

        # by module type: the recorded types, groups in order of first appearance
        seen = dash.set_group("type")
        types = list(dict.fromkeys(gpt2.types[la] for la in grads))
        assert [g["title"] for g in seen["runs"][0]["groups"]] == [
            f"{t} · {sum(gpt2.types[la] == t for la in grads)} layers" for t in types]
        # by block: consecutive runs of each block, depth order kept
        seen = dash.set_group("block")
        assert seen["runs"][0]["rows"] == grads
        titles = [g["title"].split(" · ")[0] for g in seen["runs"][0]["groups"]]
        assert titles == ["outside the blocks"] + [
            f"transformer.h.{i}" for i in range(gpt2log.N_BLOCKS)] + ["outside the blocks"]

        # an alert in the list points at its cell: a filter hiding the layer is cleared, the
        # cell is outlined and scrolled into view; cause and hint are in the row
        dash.set_group("none")
        pg.set_viewport_size({"width": 1280, "height": 600})  # the layer's row out of view
        dash.set_filter("")
        dash.frame.evaluate("() => window.scrollTo(0, 0)")
        assert dash.visible(gpt2log.BROKEN) is False
        dash.set_filter("attn")
        seen = dash.pick_alert(gpt2log.BROKEN, broken[0].step)
        (run,) = seen["runs"]
        assert seen["filter"] == "" and run["rows"] == grads
        assert run["focus"] == [[gpt2log.BROKEN, broken[0].step]]
        assert [gpt2log.BROKEN, broken[0].step] in run["marked"]
        assert dash.visible() and dash.visible(gpt2log.BROKEN)
        assert seen["status"].endswith(f"showing {gpt2log.BROKEN} at step {broken[0].step}")
        row = next(r for r in run["alerts"] if r[1] == gpt2log.BROKEN)
        assert row[6:] == [broken[0].cause]
        why = next(w for w in run["why"] if (w["kind"], w["cause"]) == (
            broken[0].kind, broken[0].cause))
        assert why["hint"] == next((a.hint for a in gpt2.alerts if a.hint and (a.kind, a.cause)
                                    == (broken[0].kind, broken[0].cause)), "")
        dash.screenshot(str(tmp_path / "alert.png"))
        assert not pg.dialogs
    for name in ("depth", "filter", "module", "alert"):
        w, h = png_size(tmp_path / f"{name}.png")
        assert w == 1280 and 300 < h <= 2000
