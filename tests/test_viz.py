"""Pictures: the graph as SVG (Graphviz or pure Python) and HTML, memory and schedule charts; parsed, not eyeballed."""

from __future__ import annotations

import shutil
import sys
import xml.etree.ElementTree as ET

import pytest
import torch

import fxpar
from fxpar import viz

from tests.models import BlockStack

pytest.importorskip("matplotlib", reason="charts need matplotlib (in the 'test' and 'viz' extras)")

SVG = "{http://www.w3.org/2000/svg}"


@pytest.fixture(scope="module")
def pipelined():
    return fxpar.plan(BlockStack(), {"pp": 2, "tp": 2}, example_inputs=(torch.randn(8, 4, 32),))


@pytest.fixture(scope="module")
def flat():
    return fxpar.plan(BlockStack(depth=2), {"dp": 2, "tp": 2}, example_inputs=(torch.randn(8, 4, 32),))


def _nodes(root: ET.Element, kind: str) -> list[ET.Element]:
    return [g for g in root.iter(f"{SVG}g") if kind in (g.get("class") or "").split()]


def test_python_svg_colours_placements_and_highlights_collectives(flat, tmp_path):
    path = tmp_path / "graph.svg"
    text = viz.graph_svg(flat, path, engine="python")
    root = ET.fromstring(path.read_text())
    assert root.tag == f"{SVG}svg" and text == path.read_text()
    collectives = _nodes(root, "collective")
    graph_collectives = [n for n in flat.graph_module.graph.nodes if n.target in fxpar.ops.collectives.COLLECTIVE_OPS]
    assert len(collectives) == len(graph_collectives) > 0
    rect = collectives[0].find(f"{SVG}rect")
    assert rect.get("stroke") == "#dc2626" and rect.get("stroke-width") == "2"
    # The tp-sharded MLP is indigo, the batch-sharded norm sky blue; each node says its placement and local shape.
    labels = {g.get("id"): g.find(f"{SVG}text").text for g in _nodes(root, "compute")}
    fills = {g.get("id"): g.find(f"{SVG}rect").get("fill") for g in _nodes(root, "compute")}
    up = next(k for k, v in labels.items() if "w: weight [R, S(0)], bias [R, S(0)]" in v)
    norm = next(k for k, v in labels.items() if v.startswith("layer_norm ="))
    assert fills[up] == "#c7d2fe" and fills[norm] == "#e0f2fe"
    assert "[S(0), S(2)] [4, 4, 64]" in labels[up]  # batch / dp, hidden / tp
    titles = [t.text for t in root.iter(f"{SVG}title")]
    assert any("fwd all_reduce" in t for t in titles)


def test_python_svg_draws_pipeline_stages_as_bands(pipelined):
    root = ET.fromstring(viz.graph_svg(pipelined, engine="python"))
    bands = [r for r in root.iter(f"{SVG}rect") if r.get("class") == "stage"]
    assert len(bands) == 2
    ids = [g.get("id") for g in root.iter(f"{SVG}g") if g.get("id")]
    assert any(i.startswith("s0_") for i in ids) and any(i.startswith("s1_") for i in ids)


def test_auto_engine_falls_back_to_python_without_graphviz(flat, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    text = viz.graph_svg(flat)  # engine='auto'
    assert 'class="node' in text  # the pure-Python drawing
    with pytest.raises(fxpar.FxparError, match="needs Graphviz"):
        viz.graph_svg(flat, engine="dot")


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz's dot is not installed (apt-get install graphviz)")
def test_graphviz_svg_parses_with_stage_clusters(pipelined, tmp_path):
    root = ET.fromstring(viz.graph_svg(pipelined, tmp_path / "g.svg", engine="dot"))
    clusters = [g for g in root.iter(f"{SVG}g") if g.get("class") == "cluster"]
    assert len(clusters) == 2
    assert "subgraph cluster_stage1" in viz.graph_dot(pipelined)


def test_html_view_is_self_contained(pipelined, tmp_path):
    page = viz.graph_html(pipelined, tmp_path / "g.html")
    assert page.startswith("<!doctype html>") and "<svg" in page and "Memory per rank" in page
    assert "<script src" not in page and "<link" not in page and "@import" not in page
    body = page[page.index("<svg"):page.index("</svg>") + 6]
    ET.fromstring(body)


def test_memory_chart_png_and_svg(pipelined, tmp_path):
    import matplotlib.image

    png = viz.memory_chart(pipelined, tmp_path / "memory.png", capacity_bytes=2**20)
    image = matplotlib.image.imread(png)
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 300
    svg = viz.memory_chart(pipelined, tmp_path / "memory.svg")
    root = ET.fromstring(svg.read_text())
    texts = " ".join(t.text or "" for t in root.iter(f"{SVG}text"))
    assert "pp rank 0" in texts and "pp rank 1" in texts and "optimizer (AdamW)" in texts
    # One stacked bar segment per (rank, kind): parameters, gradients, optimizer for 2 pp ranks.
    bars = [p for p in root.iter(f"{SVG}g") if (p.get("id") or "").startswith("patch_")]
    assert len(bars) >= 6


def test_schedule_chart_draws_every_action(pipelined, tmp_path):
    svg = viz.schedule_chart(pipelined, tmp_path / "schedule.svg")
    root = ET.fromstring(svg.read_text())
    texts = " ".join(t.text or "" for t in root.iter(f"{SVG}text"))
    assert "'1f1b'" in texts and "bubble 33.3%" in texts and "pp rank 1" in texts
    split = fxpar.core.stages.stage_info(pipelined.graph_module)
    labels = [t.text for t in root.iter(f"{SVG}text") if (t.text or "").isdigit()]
    assert len(labels) >= 2 * split.num_stages * split.microbatches  # one per action, plus tick labels


def test_schedule_chart_needs_a_pipeline(flat, tmp_path):
    with pytest.raises(fxpar.FxparError, match="not a pipeline"):
        viz.schedule_chart(flat, tmp_path / "s.png")


def test_charts_without_matplotlib_say_how_to_install(flat, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(fxpar.FxparError, match=r"pip install 'fxpar\[viz\]'"):
        viz.memory_chart(flat, tmp_path / "m.png")


def test_readme_shows_pictures_that_render():
    """The README's images exist and parse (PNG by matplotlib, SVG as XML); regenerate them with the
    `fxpar explain` commands in docs/api.md if the plan changes."""
    import re
    from pathlib import Path

    import matplotlib.image

    root = Path(__file__).resolve().parent.parent
    images = re.findall(r"!\[[^\]]*\]\((docs/img/[^)]+)\)", (root / "README.md").read_text())
    assert images, "the README shows no picture"
    for rel in images:
        path = root / rel
        assert path.is_file(), rel
        if path.suffix == ".png":
            assert matplotlib.image.imread(path).shape[0] > 100
        else:
            ET.parse(path)
    ET.parse(root / "docs/img/mlp_graph.svg")
