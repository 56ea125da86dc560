"""TensorBoard's own tabs on a 12-block GPT-2-style transformer: the custom-scalars layout
gradwatch writes groups each stat's layers by module (a depth profile of every
``h.*.attn.c_attn``) with at most ``MAX_LINES`` lines a chart, covers every layer, and is the
layout a real TensorBoard serves; a small model keeps one chart per stat."""

from __future__ import annotations

import re

import pytest
from tensorboard.plugins.custom_scalar import layout_pb2, metadata

from gradwatch.schema import STATS, split_tag
from gradwatch.sinks.tensorboard import MAX_LINES, layout, module_key
from tests.support import gpt2log
from tests.support.events import load
from tests.support.tbserver import get_json, tensorboard


def written_layout(path):
    acc = load(path)
    (ev,) = acc.Tensors(metadata.CONFIG_SUMMARY_TAG)
    lay = layout_pb2.Layout()
    lay.ParseFromString(ev.tensor_proto.string_val[0])
    return lay, acc.Tags()["scalars"]


@pytest.mark.slow
def test_custom_scalars_group_a_transformer_by_module(gpt2, tmp_path):
    import os

    lay, tags = written_layout(os.path.join(gpt2.logdir, "gpt2"))
    stat_tags = [t for t in tags if split_tag(t)]
    charted: dict[str, int] = {}
    by_title = {}
    for cat in lay.category:
        for chart in cat.chart:
            (rx,) = chart.multiline.tag
            lines = [t for t in tags if re.search(rx, t)]
            assert 0 < len(lines) <= MAX_LINES, (chart.title, len(lines))
            for t in lines:
                if t in stat_tags:
                    charted[t] = charted.get(t, 0) + 1
            by_title[chart.title] = lines
    assert set(charted) == set(stat_tags) and set(charted.values()) == {1}  # each once
    cats = [c.title for c in lay.category]
    assert cats[0] == "gradwatch" and "gradwatch · grad_rms" in cats
    # one chart per module: the depth profile h.0 .. h.11 of c_attn, in forward order
    key = "transformer.h.*.attn.c_attn"
    assert by_title[f"grad_rms · {key}"] == [
        f"gradwatch/grad_rms/transformer.h.{i}.attn.c_attn" for i in range(gpt2log.N_BLOCKS)]
    assert module_key(gpt2log.BROKEN) == "transformer.h.*.mlp.c_fc"
    with tensorboard(gpt2.logdir, str(tmp_path)) as url:
        served = get_json(url + "/data/plugin/custom_scalars/layout")
    assert [c["title"] for c in served["category"]] == cats


def test_a_small_model_keeps_one_chart_per_stat():
    few = {s: ["0", "1", "2"] for s in STATS if s != "act_sat_frac"}
    (cat,) = layout(few).items()  # no chart for a stat that no layer has
    assert cat[0] == "gradwatch" and list(cat[1]) == [
        *(s for s in STATS if s != "act_sat_frac"), "alert_count"]
    many = {"grad_rms": [f"h.{i}.fc" for i in range(30)] + ["head"]}
    lay = layout(many)
    charts = lay["gradwatch · grad_rms"]
    assert list(charts) == ["grad_rms · h.*.fc (1/3)", "grad_rms · h.*.fc (2/3)",
                            "grad_rms · h.*.fc (3/3)", "grad_rms · other layers"]
    assert list(lay["gradwatch"]) == ["alert_count"]
