"""The data of a step timeline (`fxpar.analysis.timeline.rank_timeline`): bars on lanes, overlap windows, text.

Built by `fxpar.analysis.timeline` (the eager graph's replay, pipelines) and
`fxpar.analysis.compiled_timeline` (inductor's kernel order of a compiled module);
drawn by `fxpar.viz.timeline_chart` / `timeline_text`.
"""

from __future__ import annotations

from dataclasses import dataclass

from fxpar.core.fmt import fmt_bytes

__all__ = ["Bar", "Overlap", "Timeline", "KIND_COLORS"]

KIND_COLORS = {"forward": "#3b82f6", "backward": "#ef4444", "collective": "#dc2626", "issued": "#f97316",
               "bucket": "#10b981", "p2p": "#8b5cf6", "wait": "#d1d5db",
               "regather": "#f59e0b", "reduce_scatter": "#b45309"}
"""A bar's colour by kind in pictures of a timeline (fxpar.viz.timeline_chart)."""


@dataclass(frozen=True)
class Bar:
    """One op or collective on a lane.

    Attributes:
        lane: 'compute' or 'comm' (a pipeline: 'pp<r> compute' / 'pp<r> comm').
        label: what it is ('addmm_3', 'all_reduce(tp) %allreduce_x', 'F1.0').
        kind: 'forward', 'backward', 'collective', 'issued', 'bucket', 'p2p', 'wait', 'regather' (an
            FSDP re-gather in the backward issued ahead of its use), 'reduce_scatter' (FSDP's, waited late).
        start, end: seconds from the start of the step.
        node: the graph node ('' for pipeline actions and buckets).
        module: its module FQN.
        nbytes: a collective's payload per rank (0 for compute).
    """

    lane: str
    label: str
    kind: str
    start: float
    end: float
    node: str = ""
    module: str = ""
    nbytes: int = 0


@dataclass(frozen=True)
class Overlap:
    """A collective in flight from its issue to its wait, and the compute ops that run meanwhile."""

    collective: str
    issue: str
    wait: str
    start: float
    end: float
    ops: tuple[str, ...]
    modules: tuple[str, ...]


@dataclass(frozen=True)
class Timeline:
    """This rank's step on its lanes (see the module docstring)."""

    title: str
    lanes: tuple[str, ...]
    bars: tuple[Bar, ...]
    overlaps: tuple[Overlap, ...]
    measured: bool = False
    backward_from: int = -1  # bars[backward_from:] are the backward's (-1: no backward)

    @property
    def makespan(self) -> float:
        return max((b.end for b in self.bars), default=0.0)

    @property
    def unit(self) -> tuple[float, str]:
        """(factor, name): the time unit that suits this step (seconds * factor are in it)."""
        span = self.makespan
        return (1.0, "s") if span >= 1 else (1e3, "ms") if span >= 1e-3 else (1e6, "us")

    def lane(self, name: str) -> list[Bar]:
        return [b for b in self.bars if b.lane == name]

    def text(self, *, width: int = 60) -> str:
        """The timeline as text: one row per lane drawn to scale, the collectives, and the overlaps."""
        span = self.makespan or 1.0
        cell = span / width
        scale, unit = self.unit
        clock = lambda seconds: f"{seconds * scale:.3f} {unit}"  # noqa: E731
        source = "measured (profile)" if self.measured else "estimated (fxpar.analysis.cost)"
        out = [f"Timeline: {self.title}; step {clock(span)}, times {source}"]
        for lane in self.lanes:
            row = [" "] * width
            for b in self.lane(lane):
                mark = {"forward": "f", "backward": "b", "wait": "."}.get(b.kind, "#")
                for i in range(int(b.start / cell), max(int(b.start / cell) + 1, int(b.end / cell))):
                    row[min(i, width - 1)] = mark
            out.append(f"  {lane:>12} |{''.join(row)}|")
        out.append("  (f forward op, b backward op, # communication, . waiting)")
        comm = [b for b in self.bars if b.nbytes or b.kind in ("collective", "issued", "bucket", "p2p")]
        if comm:
            out.append("Communication:")
            out += [f"  {clock(b.start)} - {clock(b.end)}  {b.lane}: {b.label} {fmt_bytes(b.nbytes)}"
                    + (f" [{b.module}]" if b.module else "") for b in comm]
        if self.overlaps:
            out.append("Overlap (a collective issued before its wait, and the compute under it):")
            for o in self.overlaps:
                shown = ", ".join(o.modules[:4]) + (f", ... ({len(o.modules)} modules)" if len(o.modules) > 4 else "")
                out.append(f"  {o.collective}: issued at {o.issue} {clock(o.start)}, "
                           f"waited at {o.wait} {clock(o.end)}; "
                           f"under it {len(o.ops)} ops of {shown or 'nothing'}")
        return "\n".join(out)
