"""Pictures of a compiled model: its rewritten graph, memory per rank, the pipeline schedule.

    fxpar.viz.graph_svg(pm, "graph.svg")          # Graphviz where installed, pure Python otherwise
    fxpar.viz.graph_html(pm, "graph.html")        # self-contained page: the graph, a legend, a search box
    fxpar.viz.memory_chart(report, "memory.png")  # stacked bars per pp rank (matplotlib)
    fxpar.viz.schedule_chart(report, "pp.svg")    # the pipeline schedule as a timeline (matplotlib)
    fxpar.viz.timeline_chart(report, "step.svg")  # a rank's compute / comm lanes and overlaps; timeline_text

Every function takes a ParallelModule (a real rank's) or a `DryRunReport`.

The graph is drawn from the same nodes either way (`graph_nodes`): every
node of this rank's graph (every stage's, for pipelines), with parameters
folded into the ops that use them and shape bookkeeping (sym_size, shape
asserts, the input guard) left out. A node's fill says its output placement
(replicated, batch-sharded on dp / fsdp, sharded on tp, partial), a collective is red with its mesh dim and
payload, an op without a sharding rule (fallback) amber; pipeline stages
are bands (clusters in Graphviz) of their own colour.

The pure-Python drawing puts nodes in graph order, one per row, and draws
each edge as an arc on the left whose width grows with the distance it
spans: residual connections and long-lived values stand out, and the
picture of a 1000-node graph is still a readable scroll. Charts use
matplotlib's object API (no pyplot, no global state) and write any format
matplotlib knows from the file's suffix.
"""

from __future__ import annotations

import html
import logging
import math
import operator
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx

from fxpar.analysis.explain import collectives
from fxpar.analysis.memory import memory_per_rank
from fxpar.analysis.plan_io import full_mesh as _full_mesh
from fxpar.analysis.schedule import schedule_order, simulate_schedule
from fxpar.analysis.timeline import KIND_COLORS, rank_timeline
from fxpar.core.errors import FxparError
from fxpar.core.fmt import fmt_bytes
from fxpar.core.spec import TensorSpec, get_info, placements_str, size_hint
from fxpar.core.stages import stage_info
from fxpar.dryrun import DryRunReport
from fxpar.ops.collectives import COLLECTIVE_OPS
from fxpar.ops.transitions import collective_args

__all__ = ["VizNode", "graph_nodes", "graph_dot", "graph_svg", "graph_html", "memory_chart", "schedule_chart",
           "timeline_chart", "timeline_text"]

log = logging.getLogger(__name__)

_PLACEMENT_FILL = {"replicate": "#f3f4f6", "batch": "#e0f2fe", "sharded": "#c7d2fe", "partial": "#f5d0fe",
                   "none": "#ffffff"}
_KIND_FILL = {"collective": "#fee2e2", "fallback": "#fef3c7", "input": "#dcfce7", "output": "#dcfce7"}
_KIND_STROKE = {"collective": "#dc2626", "fallback": "#d97706"}
_STAGE_COLORS = ("#eff6ff", "#fefce8", "#f0fdf4", "#fdf2f8", "#f5f3ff", "#ecfeff", "#fff7ed", "#f7fee7")
_STAGE_BARS = ("#3b82f6", "#eab308", "#22c55e", "#ec4899", "#8b5cf6", "#06b6d4", "#f97316", "#84cc16")
_HIDDEN_TARGETS = {"sym_size", "sym_stride", "sym_numel", "_assert_tensor_metadata", "_assert_scalar",
                   "sym_constrain_range_for_size", "_assert_async"}


# --------------------------------------------------------------------------- the nodes to draw


@dataclass(frozen=True)
class VizNode:
    """One node as drawn.

    Attributes:
        id: unique across stages ('s1_addmm_3').
        name: the fx node name.
        op: short op name ('addmm', 'all_reduce', 'input', 'output').
        kind: 'input', 'output', 'compute', 'collective' or 'fallback'.
        stage: the pipeline stage, None without a pipeline.
        placement: 'replicate', 'batch' (split on dp / fsdp only), 'sharded' (on tp), 'partial' or
            'none' (not a tensor).
        label: one line: name, op, placements, local shape, parameters used.
        detail: the tooltip: module, global shape, collective payload.
        inputs: ids of the drawn nodes it reads.
        note: for collectives, the payload per step ('fwd all_reduce 8.0 KiB, bwd none').
    """

    id: str
    name: str
    op: str
    kind: str
    stage: int | None
    placement: str
    label: str
    detail: str
    inputs: tuple[str, ...]
    note: str = ""


def _module(obj: Any):
    """The ParallelModule of a ParallelModule or a DryRunReport."""
    return obj.module if isinstance(obj, DryRunReport) else obj


def _graphs(pm) -> list[tuple[int | None, fx.GraphModule]]:
    gm = pm.graph_module
    split = stage_info(gm)
    if split is None:
        return [(None, gm)]
    return [(k, gm.get_submodule(f"stage_{k}")) for k in range(split.num_stages)]


def _op_name(node: fx.Node) -> str:
    if node.op == "placeholder":
        return "input"
    if node.op == "output":
        return "output"
    if node.op == "call_module":
        return str(node.target)
    target = node.target
    if target in COLLECTIVE_OPS:
        return COLLECTIVE_OPS[target]
    name = getattr(target, "__name__", str(target))
    return name.split(".")[0] if hasattr(target, "_schema") else name


def _hidden(node: fx.Node) -> bool:
    if node.op == "get_attr":
        return True
    if node.op == "call_module" and str(node.target).startswith("_guards"):
        return True
    if node.op == "call_function":
        if _op_name(node) in _HIDDEN_TARGETS:
            return True
        val = node.meta.get("val")
        # Shape arithmetic (operator.mul of SymInts, ...) is bookkeeping, not data flow.
        if getattr(node.target, "__module__", None) in ("_operator", "operator") and node.target is not \
                operator.getitem:
            return True
        if isinstance(val, (torch.SymInt, int)) and not isinstance(val, bool):
            return True
    return False


def _placement_class(spec: TensorSpec | None, names: tuple[str, ...]) -> str:
    """'partial' (a pending sum), 'sharded' (split on tp or another model dim), 'batch' (split only on
    the data-parallel dims) or 'replicate'."""
    if spec is None:
        return "none"
    if any(p.is_partial() for p in spec.placements):
        return "partial"
    split = [name for p, name in zip(spec.placements, names) if not p.is_replicate()]
    if not split:
        return "replicate"
    return "batch" if all(name in ("dp", "fsdp", "ep") for name in split) else "sharded"


def _shape(shape) -> str:
    return "[" + ", ".join(str(size_hint(s)) if isinstance(s, torch.SymInt) else str(s) for s in shape) + "]"


def graph_nodes(obj: Any) -> list[VizNode]:
    """The nodes to draw, in graph order (stage after stage for pipelines).

    Args:
        obj: a ParallelModule or a DryRunReport.
    """
    pm = _module(obj)
    mesh = pm.mesh_info
    out: list[VizNode] = []
    for stage, gm in _graphs(pm):
        prefix = f"s{stage}_" if stage is not None else ""
        payload = {c.node: c for c in collectives(gm, mesh)}
        for node in gm.graph.nodes:
            if _hidden(node):
                continue
            info = get_info(node)
            spec = info.spec if info is not None and isinstance(info.spec, TensorSpec) else None
            op = _op_name(node)
            if node.op in ("placeholder", "output"):
                kind = node.op.replace("placeholder", "input")
            elif node.target in COLLECTIVE_OPS:
                kind = "collective"
            elif info is not None and info.fallback:
                kind = "fallback"
            else:
                kind = "compute"
            params, inputs = [], []
            for a in node.all_input_nodes:
                if a.op == "get_attr":
                    ainfo = get_info(a)
                    aspec = ainfo.spec if ainfo is not None and isinstance(ainfo.spec, TensorSpec) else None
                    pname = str(a.target).rpartition(".")[2]
                    params.append(f"{pname} {placements_str(aspec.placements)}" if aspec else pname)
                elif not _hidden(a):
                    inputs.append(prefix + a.name)
            label = f"{node.name} = {op}"
            if kind == "collective":
                args = collective_args(node)
                label += f"({args['mesh_dim']})"
            if spec is not None:
                label += f" {placements_str(spec.placements)} {_shape(spec.local_shape)}"
            if params:
                label += "  w: " + ", ".join(params)
            detail = [f"{node.op} {node.target}" if node.op != "placeholder" else f"input {node.target}"]
            if info is not None and info.module_fqn:
                detail.append(f"module {info.module_fqn}")
            if spec is not None:
                detail.append(f"global {_shape(spec.shape)} {str(spec.dtype).replace('torch.', '')}")
            c = payload.get(node.name)
            note = ""
            if c is not None:
                fwd = f"fwd {c.op} {fmt_bytes(c.forward_bytes, 1)}" if c.forward_bytes else "fwd no communication"
                bwd = f"bwd {c.backward_op} {fmt_bytes(c.backward_bytes, 1)}" if c.backward_op else "bwd none"
                note = f"{fwd}, {bwd}"
                detail.append(f"{note} (per step, each rank's payload)")
            if info is not None and info.fallback:
                detail.append("no sharding rule: runs on replicated inputs")
            if info is not None and info.note:
                detail.append(info.note)
            placement = _placement_class(spec, mesh.names)
            out.append(VizNode(prefix + node.name, node.name, op, kind, stage, placement, label, "\n".join(detail),
                               tuple(inputs), note))
    return out


def _fill(n: VizNode) -> str:
    return _KIND_FILL.get(n.kind, _PLACEMENT_FILL[n.placement])


def _title(pm) -> str:
    mesh = ", ".join(f"{k}={v}" for k, v in _full_mesh(pm))
    return f"{pm.capture_info.model_class} on mesh ({mesh})"


# --------------------------------------------------------------------------- Graphviz


def _dot_str(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def graph_dot(obj: Any) -> str:
    """The rewritten graph in Graphviz's DOT language (stages as clusters, collectives red)."""
    pm = _module(obj)
    nodes = graph_nodes(pm)
    lines = ["digraph fxpar {", f"  label={_dot_str(_title(pm))}; labelloc=t; rankdir=TB;",
             '  node [shape=box, style="rounded,filled", fontname="monospace", fontsize=10, color="#9ca3af"];',
             '  edge [color="#6b7280", arrowsize=0.6];']
    by_stage: dict[int | None, list[VizNode]] = {}
    for n in nodes:
        by_stage.setdefault(n.stage, []).append(n)
    for stage, members in by_stage.items():
        indent = "  "
        if stage is not None:
            lines.append(f"  subgraph cluster_stage{stage} {{")
            lines.append(f'    label="stage {stage}"; style=filled; color="{_STAGE_BARS[stage % 8]}"; '
                         f'fillcolor="{_STAGE_COLORS[stage % 8]}";')
            indent = "    "
        for n in members:
            attrs = [f"label={_dot_str(n.label)}", f"tooltip={_dot_str(n.detail)}", f'fillcolor="{_fill(n)}"']
            if n.kind in _KIND_STROKE:
                attrs += [f'color="{_KIND_STROKE[n.kind]}"', "penwidth=2"]
            lines.append(f"{indent}{_dot_str(n.id)} [{', '.join(attrs)}];")
        if stage is not None:
            lines.append("  }")
    for n in nodes:
        for i in n.inputs:
            lines.append(f"  {_dot_str(i)} -> {_dot_str(n.id)};")
    lines.append("}")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- pure-Python SVG

_ROW = 22
_BOX_X = 240  # arcs use the strip left of the boxes
_BOX_W = 640
_TOP = 96
_CHAR_W = 6.6  # 11 px monospace


def _esc(s: str) -> str:
    return html.escape(s, quote=True)


def _svg_python(pm) -> str:
    """The graph as SVG, laid out here: one row per node in graph order, edges as arcs on the left."""
    nodes = graph_nodes(pm)
    row = {n.id: i for i, n in enumerate(nodes)}
    height = _TOP + len(nodes) * _ROW + 40
    width = _BOX_X + _BOX_W + 330
    y = lambda i: _TOP + i * _ROW  # noqa: E731
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" font-family="monospace" font-size="11">',
             "<defs><marker id=\"arrow\" viewBox=\"0 0 10 10\" refX=\"10\" refY=\"5\" markerWidth=\"6\" "
             "markerHeight=\"6\" orient=\"auto-start-reverse\"><path d=\"M 0 0 L 10 5 L 0 10 z\" "
             "fill=\"#6b7280\"/></marker></defs>",
             f'<rect width="{width}" height="{height}" fill="#ffffff"/>',
             f'<text x="16" y="24" font-size="15" font-weight="bold">{_esc(_title(pm))}</text>']
    # Legend.
    legend = [("replicated", _PLACEMENT_FILL["replicate"], "#9ca3af"),
              ("batch-sharded (dp/fsdp)", _PLACEMENT_FILL["batch"], "#9ca3af"),
              ("sharded (tp)", _PLACEMENT_FILL["sharded"], "#9ca3af"),
              ("partial sums", _PLACEMENT_FILL["partial"], "#9ca3af"),
              ("collective", _KIND_FILL["collective"], _KIND_STROKE["collective"]),
              ("fallback", _KIND_FILL["fallback"], _KIND_STROKE["fallback"]),
              ("input/output", _KIND_FILL["input"], "#9ca3af")]
    x = 16
    for name, fill, stroke in legend:
        parts.append(f'<rect x="{x}" y="40" width="14" height="14" rx="3" fill="{fill}" stroke="{stroke}"/>'
                     f'<text x="{x + 20}" y="51">{name}</text>')
        x += 30 + len(name) * _CHAR_W
    parts.append(f'<text x="16" y="74" fill="#6b7280">{len(nodes)} nodes; '
                 f'{sum(n.kind == "collective" for n in nodes)} collectives; '
                 f'{sum(n.kind == "fallback" for n in nodes)} fallbacks. Hover a node for details.</text>')
    # Stage bands.
    start = 0
    for i in range(1, len(nodes) + 1):
        if i == len(nodes) or nodes[i].stage != nodes[start].stage:
            stage = nodes[start].stage
            if stage is not None:
                top, bottom = y(start) - 3, y(i - 1) + _ROW - 3
                parts.append(f'<rect class="stage" x="8" y="{top}" width="{width - 16}" height="{bottom - top}" '
                             f'fill="{_STAGE_COLORS[stage % 8]}" stroke="{_STAGE_BARS[stage % 8]}"/>'
                             f'<rect x="8" y="{top}" width="6" height="{bottom - top}" '
                             f'fill="{_STAGE_BARS[stage % 8]}"/>'
                             f'<text x="{width - 20}" y="{top + 14}" text-anchor="end" font-weight="bold" '
                             f'fill="{_STAGE_BARS[stage % 8]}">stage {stage}</text>')
            start = i
    # Edges: arcs on the left, wider for longer spans.
    for n in nodes:
        b = row[n.id]
        for src in n.inputs:
            a = row.get(src)
            if a is None:
                continue
            ya, yb = y(a) + _ROW / 2 - 3, y(b) + _ROW / 2 - 3
            span = abs(b - a)
            if span == 1:
                parts.append(f'<path d="M {_BOX_X + 12} {y(a) + _ROW - 6} L {_BOX_X + 12} {y(b)}" '
                             'stroke="#9ca3af" fill="none" marker-end="url(#arrow)"/>')
                continue
            bend = min(_BOX_X - 24, 12 + 22 * math.log2(span))
            parts.append(f'<path d="M {_BOX_X} {ya} C {_BOX_X - bend} {ya}, {_BOX_X - bend} {yb}, {_BOX_X} {yb}" '
                         'stroke="#9ca3af" stroke-opacity="0.7" fill="none" marker-end="url(#arrow)"/>')
    # Nodes.
    max_chars = int((_BOX_W - 12) / _CHAR_W)
    for i, n in enumerate(nodes):
        stroke = _KIND_STROKE.get(n.kind, "#9ca3af")
        weight = ' stroke-width="2"' if n.kind in _KIND_STROKE else ""
        text = n.label if len(n.label) <= max_chars else n.label[: max_chars - 1] + "\u2026"
        bold = ' font-weight="bold"' if n.kind == "collective" else ""
        parts.append(f'<g class="node {n.kind}" id="{_esc(n.id)}"><title>{_esc(n.label)}\n{_esc(n.detail)}</title>'
                     f'<rect x="{_BOX_X}" y="{y(i)}" width="{_BOX_W}" height="{_ROW - 6}" rx="4" fill="{_fill(n)}" '
                     f'stroke="{stroke}"{weight}/>'
                     f'<text x="{_BOX_X + 6}" y="{y(i) + 12}"{bold}>{_esc(text)}</text></g>')
        if n.note:
            parts.append(f'<text x="{_BOX_X + _BOX_W + 8}" y="{y(i) + 12}" fill="#dc2626">{_esc(n.note)}</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def _svg_dot(pm, timeout: float) -> str:
    result = subprocess.run(["dot", "-Tsvg"], input=graph_dot(pm), capture_output=True, text=True,
                            timeout=timeout, check=False)
    if result.returncode != 0:
        raise FxparError(f"graphviz 'dot' failed (exit {result.returncode}): {result.stderr.strip()[:500]}; "
                         "draw with engine='python' instead")
    return result.stdout


def graph_svg(obj: Any, path: str | Path | None = None, *, engine: str = "auto", timeout: float = 120.0) -> str:
    """The rewritten graph as SVG: Graphviz's layout where `dot` is installed, else a pure-Python one.

    Args:
        obj: a ParallelModule or a DryRunReport.
        path: also write the SVG here.
        engine: 'auto' (dot if installed), 'dot' or 'python'.
        timeout: seconds dot may take (large graphs).

    Returns:
        The SVG text.

    Raises:
        FxparError: engine='dot' without Graphviz installed, or dot failing.
    """
    if engine not in ("auto", "dot", "python"):
        raise FxparError(f"engine={engine!r}: use 'auto', 'dot' (Graphviz) or 'python'")
    pm = _module(obj)
    if engine == "dot" and shutil.which("dot") is None:
        raise FxparError("engine='dot' needs Graphviz's 'dot' on PATH (apt-get install graphviz, brew install "
                         "graphviz); engine='python' draws without it")
    if engine == "python" or (engine == "auto" and shutil.which("dot") is None):
        svg = _svg_python(pm)
    else:
        try:
            svg = _svg_dot(pm, timeout)
        except (FxparError, subprocess.TimeoutExpired) as e:
            if engine == "dot":
                raise FxparError(f"graphviz 'dot' did not draw the graph: {e}") from e
            log.warning("graphviz failed (%s); drawing the graph with the pure-Python layout", e)
            svg = _svg_python(pm)
    if path is not None:
        Path(path).write_text(svg)
    return svg


_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 16px; }}
#find {{ font: 13px monospace; padding: 4px 8px; width: 24em; }}
.hit rect {{ stroke: #111827 !important; stroke-width: 3 !important; }}
pre {{ background: #f9fafb; padding: 8px; overflow-x: auto; }}
</style></head><body>
<h1>{title}</h1>
<p><input id="find" placeholder="find nodes (name, op, module)..."> <span id="count"></span></p>
{svg}
<h2>explain()</h2>
<pre>{explain}</pre>
<script>
const box = document.getElementById('find'), count = document.getElementById('count');
box.addEventListener('input', () => {{
  const q = box.value.toLowerCase(); let n = 0, first = null;
  document.querySelectorAll('g.node').forEach(g => {{
    const hit = q && g.textContent.toLowerCase().includes(q);
    g.classList.toggle('hit', hit); if (hit) {{ n++; first = first || g; }}
  }});
  count.textContent = q ? n + ' found' : '';
  if (first) first.scrollIntoView({{block: 'center'}});
}});
</script>
</body></html>
"""


def graph_html(obj: Any, path: str | Path | None = None) -> str:
    """A self-contained HTML page: the graph (pure-Python SVG), a node search, and explain()'s text.

    Args:
        obj: a ParallelModule or a DryRunReport.
        path: also write the page here.

    Returns:
        The HTML text (no external files, scripts or fonts).
    """
    pm = _module(obj)
    text = obj.explain() if hasattr(obj, "explain") else ""
    page = _HTML.format(title=_esc("fxpar: " + _title(pm)), svg=_svg_python(pm), explain=_esc(text))
    if path is not None:
        Path(path).write_text(page)
    return page


# --------------------------------------------------------------------------- charts


def _figure(width: float, height: float):
    try:
        from matplotlib.figure import Figure
    except ImportError as e:
        raise FxparError("charts need matplotlib: pip install 'fxpar[viz]' (or pip install matplotlib)") from e
    return Figure(figsize=(width, height), layout="constrained")


def _save(fig, path: str | Path) -> Path:
    """Writes a figure; SVG keeps its text as text (searchable, smaller), set for this call only."""
    import matplotlib

    with matplotlib.rc_context({"svg.fonttype": "none"}):
        fig.savefig(path)
    return Path(path)


def _unit(nbytes: float) -> tuple[float, str]:
    for scale, unit in ((2**40, "TiB"), (2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if nbytes >= scale:
            return scale, unit
    return 1, "B"


def memory_chart(obj: Any, path: str | Path, *, optimizer_bytes_per_element: int = 8,
                 capacity_bytes: float | None = None) -> Path:
    """Memory per rank as stacked bars (parameters, gradients, optimizer state, buffers), one per pp rank.

    Args:
        obj: a DryRunReport or a ParallelModule.
        path: the file to write; the format follows its suffix (.png, .svg, .pdf).
        optimizer_bytes_per_element: optimizer state per trainable element (AdamW float32: 8).
        capacity_bytes: draw a line at this device memory (e.g. 80 * 2**30).

    Returns:
        The path written.
    """
    pm = _module(obj)
    memory = memory_per_rank(pm, getattr(obj, "mesh", None), optimizer_bytes_per_element=optimizer_bytes_per_element)
    scale, unit = _unit(max([m.total for m in memory] + [capacity_bytes or 0]))
    fig = _figure(max(5.5, 1.2 * len(memory) + 3.5), 3.6)
    ax = fig.add_subplot()
    labels = [f"{m.label}\n({m.ranks} rank{'s' if m.ranks > 1 else ''})" for m in memory]
    bottom = [0.0] * len(memory)
    for name, color, values in (("parameters", "#3b82f6", [m.parameters for m in memory]),
                                ("gradients", "#f59e0b", [m.gradients for m in memory]),
                                ("optimizer (AdamW)", "#10b981", [m.optimizer for m in memory]),
                                ("buffers", "#9ca3af", [m.buffers for m in memory])):
        if not any(values):
            continue
        heights = [v / scale for v in values]
        ax.bar(labels, heights, bottom=bottom, color=color, label=name, width=0.6)
        bottom = [b + h for b, h in zip(bottom, heights)]
    for i, total in enumerate(bottom):
        ax.annotate(f"{total:.2f}", (i, total), ha="center", va="bottom", fontsize=8, xytext=(0, 2),
                    textcoords="offset points")
    if capacity_bytes:
        ax.axhline(capacity_bytes / scale, color="#dc2626", linestyle="--", linewidth=1, label="device memory")
    ax.set_ylabel(unit)
    ax.set_title(f"Memory per rank\n{_title(pm)}", fontsize=9)
    fig.legend(fontsize=8, loc="outside right upper")
    ax.margins(y=0.1)
    return _save(fig, path)


def schedule_chart(obj: Any, path: str | Path) -> Path:
    """The pipeline schedule as a timeline: one row per pp rank, one box per forward / backward action.

    Torch's own action order for the plan's schedule, simulated with equal
    stage times (backward = 2 forwards): idle gaps are the pipeline bubble.

    Args:
        obj: a DryRunReport or a pipelined ParallelModule.
        path: the file to write; the format follows its suffix (.png, .svg, .pdf).

    Returns:
        The path written.

    Raises:
        FxparError: the module is not a pipeline.
    """
    pm = _module(obj)
    split = stage_info(pm.graph_module)
    if split is None:
        raise FxparError("schedule_chart: this module is not a pipeline (no pp dim or pp in the plan); "
                         "draw memory_chart or graph_svg instead")
    entries, bubble = simulate_schedule(schedule_order(split), split.num_stages)
    if bubble is None:
        raise FxparError(f"schedule_chart: torch's '{split.schedule}' order could not be simulated")
    colors = {"F": "#3b82f6", "B": "#ef4444", "I": "#f97316", "W": "#10b981"}
    makespan = max(e.end for e in entries)
    fig = _figure(min(18.0, max(6.0, makespan * 0.25 + 2)), 0.5 * split.pp_size + 2.0)
    ax = fig.add_subplot()
    for e in entries:
        local = split.stages_per_rank > 1 and e.stage // split.pp_size % 2 == 1
        ax.barh(e.rank, e.end - e.start, left=e.start, height=0.8, color=colors[e.kind],
                alpha=0.6 if local else 1.0, edgecolor="white", linewidth=0.5)
        if e.end - e.start >= 0.9:
            ax.text((e.start + e.end) / 2, e.rank, str(e.microbatch), ha="center", va="center", fontsize=6,
                    color="white")
    ax.set_yticks(range(split.pp_size), [f"pp rank {r}" for r in range(split.pp_size)])
    ax.invert_yaxis()
    ax.set_xlabel("time (forward of one stage = 1)")
    ax.set_xlim(0, makespan)
    names = {"F": "forward", "B": "backward", "I": "backward (input)", "W": "backward (weights)"}
    kinds = sorted({e.kind for e in entries}, key="FBIW".index)
    from matplotlib.patches import Patch

    fig.legend([Patch(color=colors[k]) for k in kinds], [names[k] for k in kinds], fontsize=7,
               loc="outside lower center", ncols=len(kinds))
    ax.set_title(f"'{split.schedule}': {split.num_stages} stages on {split.pp_size} pp ranks, {split.microbatches} "
                 f"microbatches; bubble {bubble:.1%}\n{_title(pm)}", fontsize=9)
    return _save(fig, path)




def timeline_text(obj: Any, **kwargs) -> str:
    """This rank's step as text (`Timeline.text`); kwargs: `fxpar.analysis.timeline.rank_timeline`'s."""
    return rank_timeline(_module(obj), **kwargs).text()


def timeline_chart(obj: Any, path: str | Path, **kwargs) -> Path:
    """A rank's step: compute / comm lanes, op and collective bars, overlaps shaded (SVG ids '<kind>:<node>')."""
    t = rank_timeline(_module(obj), **kwargs)
    (k, unit), row, seen = t.unit, {lane: i for i, lane in enumerate(t.lanes)}, set()
    ax = (fig := _figure(14.0, 0.6 * len(t.lanes) + 1.8)).add_subplot(
        title=t.title, xlabel=f"{unit}, " + ("measured" if t.measured else "estimated (fxpar.analysis.cost)"),
        yticks=range(len(t.lanes)), yticklabels=list(t.lanes), ylim=(len(t.lanes) - 0.5, -0.5))
    for i, o in enumerate(t.overlaps):
        ax.axvspan(o.start * k, o.end * k, color="#fde68a", alpha=0.5, gid=f"overlap:{o.issue}",
                   label=None if i else "overlap (issue to wait)")
    for b in t.bars:
        ax.barh(row[b.lane], (b.end - b.start) * k, left=b.start * k, height=0.7, color=KIND_COLORS[b.kind],
                edgecolor="white", linewidth=0.3, gid=f"{b.kind}:{b.node or b.label}", label=None if b.kind in seen
                else b.kind)
        seen.add(b.kind)
    fig.legend(fontsize=7, loc="outside lower center", ncols=len(seen) + 1)
    return _save(fig, path)
