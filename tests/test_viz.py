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


# --------------------------------------------------------------------------- the step timeline

def _xs(g: ET.Element) -> tuple[float, float]:
    """The x extent of a matplotlib patch group (its path's coordinates)."""
    import re

    d = g.find(f".//{SVG}path").get("d")
    nums = [float(v) for v in re.findall(r"-?\d+(?:\.\d+)?(?:e-?\d+)?", d)]
    return min(nums[0::2]), max(nums[0::2])


@pytest.fixture(scope="module")
def fsdp_overlap():
    return fxpar.plan(BlockStack(), {"fsdp": 2}, example_inputs=(torch.randn(8, 4, 32),))


def test_timeline_shows_each_prefetch_running_under_the_block_before(fsdp_overlap, tmp_path):
    from fxpar.analysis.timeline import rank_timeline

    t = rank_timeline(fsdp_overlap.module)
    assert t.lanes == ("compute", "comm")
    gm = fsdp_overlap.graph_module
    forward = [b for b in t.lane("compute") if b.kind == "forward"]
    matmuls = (torch.ops.aten.linear.default, torch.ops.aten.addmm.default)
    linears = [n.name for n in gm.graph.nodes if n.target in matmuls]
    assert len(linears) == 8 and set(linears) <= {b.node for b in forward}  # every block's two matmuls are bars
    assert len([b for b in t.lane("compute") if b.kind == "backward"]) == len(forward)  # the backward replays them
    issued = [b for b in t.lane("comm") if b.kind == "issued"]
    assert [b.node for b in issued] == ["prefetch_blocks_1", "prefetch_blocks_2", "prefetch_blocks_3"]
    prefetches = [o for o in t.overlaps if o.issue.startswith("%prefetch")]  # the backward's: tests/test_timeline.py
    assert len(prefetches) == 3
    for k, o in enumerate(prefetches):
        # the gather of block k+1 is in flight from its issue to its wait, and block k computes meanwhile
        assert o.issue == f"%prefetch_blocks_{k + 1}" and o.wait == f"%fsdpgather_blocks_{k + 1}_norm_weight"
        assert o.start == issued[k].start < o.end
        block = {b.node for b in forward if b.module.startswith(f"blocks.{k}")}
        assert set(o.ops) == block and len(block) >= 5, (o.ops, block)
        assert {n for n in linears if get_module(gm, n).startswith(f"blocks.{k}.")} <= set(o.ops)
        assert all(o.start <= b.start and b.end <= o.end + 1e-15 for b in forward if b.node in o.ops)
    # an unissued unit (block 0) blocks the compute lane: nothing computes before its gather ends
    first = t.lane("comm")[0]
    assert first.kind == "collective" and "of blocks.0" in first.label and forward[0].start >= first.end

    text = viz.timeline_text(fsdp_overlap)
    assert "all_gather(fsdp) of blocks.1: issued at %prefetch_blocks_1" in text
    assert "under it 5 ops of blocks.0.norm, blocks.0.up" in text and "compute |" in text and "comm |" in text

    root = ET.parse(viz.timeline_chart(fsdp_overlap, tmp_path / "step.svg")).getroot()
    groups = {g.get("id"): g for g in root.iter(f"{SVG}g") if ":" in (g.get("id") or "")}
    assert sum(i.startswith("forward:") for i in groups) == len({b.node for b in forward})
    assert sum(i.startswith("issued:") for i in groups) == 3 and any(i.startswith("backward:") for i in groups)
    lo, hi = _xs(groups["overlap:%prefetch_blocks_1"])
    for op in t.overlaps[0].ops:  # the shaded window covers block 0's bars, not block 1's
        a, b = _xs(groups[f"forward:{op}"])
        assert lo - 1e-6 <= a and b <= hi + 1e-6, op
    outside = next(b.node for b in forward if b.module.startswith("blocks.1"))
    assert _xs(groups[f"forward:{outside}"])[0] >= hi - 1e-6
    png = viz.timeline_chart(fsdp_overlap, tmp_path / "step.png")
    import matplotlib.image

    assert matplotlib.image.imread(png).shape[1] > 800


def get_module(gm, name: str) -> str:
    node = next(n for n in gm.graph.nodes if n.name == name)
    return node.meta["fxpar"].module_fqn


def test_timeline_runs_data_parallel_buckets_under_the_rest_of_the_backward():
    from fxpar.analysis.timeline import rank_timeline

    with torch.device("meta"):  # 16 MiB weights: one 25 MB bucket each
        model = BlockStack(depth=2, dim=1024, hidden=4096)
    report = fxpar.plan(model, {"dp": 2}, example_inputs=(torch.randn(8, 4, 1024, device="meta"),))
    t = rank_timeline(report.module)
    buckets = [b for b in t.lane("comm") if b.kind == "bucket"]
    syncs = {n.meta["fxpar"].grad_sync.bucket for n in report.graph_module.graph.nodes
             if n.op == "get_attr" and n.meta["fxpar"].grad_sync is not None}
    assert len(buckets) == len(syncs) >= 3
    backward = [b for b in t.lane("compute") if b.kind == "backward"]
    # the first bucket (the last block's gradients) is in flight while block 0's backward runs
    assert buckets[0].start < backward[-1].end
    first = next(o for o in t.overlaps if o.collective == buckets[0].label)
    assert first.ops and all(b.kind == "backward" for b in backward if b.node in first.ops)
    assert any(m.startswith("blocks.0") for m in first.modules)
    assert "bucket 0" in buckets[0].label and buckets[0].nbytes >= 16 * 2**20
    assert t.makespan >= max(b.end for b in buckets)  # the step waits for every bucket
    assert "grad all_reduce(dp) bucket 0: issued at its last gradient" in t.text()
    text = report.explain()  # explain() says the same from graph order
    assert "Overlap of the data-parallel gradient buckets" in text
    assert "grad all_reduce(dp) bucket 0 (16.00 MiB): issued after the backward of %linear_" in text
    section = text.split("Overlap of the data-parallel gradient buckets")[1].split("\n\n")[0].splitlines()[1:]
    assert len(section) == len(buckets) and "ops of blocks.0.norm, blocks.0.up" in section[0]
    assert "overlaps nothing: the step waits for it at the end of the backward" in section[-1]


def test_timeline_of_a_pipeline_has_lanes_per_pp_rank(pipelined, tmp_path):
    from fxpar.analysis.timeline import rank_timeline

    t = rank_timeline(pipelined.module)
    split = fxpar.core.stages.stage_info(pipelined.graph_module)
    assert t.lanes == ("pp0 compute", "pp0 comm", "pp1 compute", "pp1 comm")
    f = [b for b in t.bars if b.kind == "forward"]
    assert len(f) == len([b for b in t.bars if b.kind == "backward"]) == split.num_stages * split.microbatches
    sends = [b for b in t.bars if b.kind == "p2p"]
    assert len(sends) == 2 * (split.num_stages - 1) * split.microbatches and all(b.nbytes > 0 for b in sends)
    assert all(s.lane == "pp0 comm" for s in sends if "activation" in s.label)
    assert "bubble 33.3%" in t.title
    root = ET.parse(viz.timeline_chart(pipelined, tmp_path / "pp.svg")).getroot()
    ids = [g.get("id") for g in root.iter(f"{SVG}g") if ":" in (g.get("id") or "")]
    assert sum(i.startswith("forward:F") for i in ids) == len(f)
    assert sum(i.startswith("p2p:") for i in ids) == len(sends)


def test_timeline_takes_measured_times(fsdp_overlap):
    from fxpar.analysis.timeline import rank_timeline

    t0 = rank_timeline(fsdp_overlap.module)
    op = next(b for b in t0.lane("compute") if b.kind == "forward")
    t = rank_timeline(fsdp_overlap.module, profile={op.node: 1e-3, f"{op.node}.backward": 5e-3}, backward=True)
    bars = {(b.kind, b.node): b for b in t.lane("compute")}
    assert bars[("forward", op.node)].end - bars[("forward", op.node)].start == pytest.approx(1e-3)
    assert bars[("backward", op.node)].end - bars[("backward", op.node)].start == pytest.approx(5e-3)
    assert t.measured and "measured (profile)" in t.text() and t.unit == (1e3, "ms")
    assert not [b for b in rank_timeline(fsdp_overlap.module, backward=False).bars if b.kind == "backward"]
