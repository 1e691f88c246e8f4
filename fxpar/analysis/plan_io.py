"""Plans as data: the resolved plan of a compiled model, saved as JSON and loaded back.

`pm.plan` is a `ResolvedPlan`: the plan the passes actually carried out,
with nothing left to chance. Every module that has a tensor-parallel style
is named with it (automatic choices made explicit, a fused qkv projection as
`colwise (fused x3)`), the pipeline cut points the balancer chose, the
schedule and microbatches, the mesh it was planned for, and a structural
fingerprint of the model. A ResolvedPlan is a `fxpar.Plan`, so it goes
straight back into `parallelize(..., plan=...)` or `fxpar.plan(...)` and
rewrites the same model on the same mesh into the same graph.

    fxpar.save_plan(pm.plan, "gpt2.plan.json")            # diffable JSON
    plan = fxpar.load_plan("gpt2.plan.json")
    pm = fxpar.parallelize(model, mesh, example_inputs=(ids,), plan=plan)

The JSON (`FORMAT`) is written in a fixed order (mesh, styles in graph
order, pipeline, model) with one entry per line, so `diff` between two saved
plans reads as the change of plan. A saved plan is refused with a PlanError
listing what changed when it meets a model whose parameters (FQNs or shapes)
or class differ, or a mesh other than the one it was planned for.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch.distributed as dist
import torch.fx as fx
import torch.nn as nn

from fxpar.core.errors import PlanError
from fxpar.core.plan import TP_STYLES, Plan, TPStyle
from fxpar.core.spec import get_info
from fxpar.core.stages import stage_info

__all__ = [
    "FORMAT",
    "MODEL_KEY",
    "ModelFingerprint",
    "SectionedStyle",
    "HeadsStyle",
    "ExpertsStyle",
    "ResolvedPlan",
    "parse_style",
    "resolve_plan",
    "check_plan_fits",
    "save_plan",
    "load_plan",
]

log = logging.getLogger(__name__)

FORMAT = "fxpar.plan/1"
"""The `format` field of a saved plan; a file with another format is refused."""

MODEL_KEY = "fxpar_model"
"""`gm.meta` key of the `ModelFingerprint` the compile path records after capture."""

_MAX_LISTED = 4  # differences of each kind listed in an error before '... and N more'


def fxpar_version() -> str:
    """The installed fxpar version ('unknown' when running from a source tree that is not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fxpar")
    except PackageNotFoundError:
        return "unknown"


# --------------------------------------------------------------------------- fingerprint


@dataclass(frozen=True)
class ModelFingerprint:
    """The structure of a model a plan was made for.

    Attributes:
        model_class: the model's class name.
        tensors: (FQN, shape) of every parameter and buffer, tied aliases
            included, in the model's registration order.
        fxpar_version: the fxpar that planned it (informational: a plan stays
            valid across versions, so a different version is logged, not refused).
    """

    model_class: str
    tensors: tuple[tuple[str, tuple[int, ...]], ...]
    fxpar_version: str = ""

    @classmethod
    def of(cls, model: nn.Module) -> ModelFingerprint:
        """Reads a model's structure; works on the meta device (no values are read)."""
        tensors = [(fqn, tuple(int(s) for s in t.shape))
                   for fqn, t in [*model.named_parameters(remove_duplicate=False),
                                  *model.named_buffers(remove_duplicate=False)]]
        return cls(type(model).__name__, tuple(tensors), fxpar_version())

    @property
    def digest(self) -> str:
        """A short hash of the class and every tensor's FQN and shape (not of the fxpar version)."""
        h = hashlib.sha256(self.model_class.encode())
        for fqn, shape in self.tensors:
            h.update(f"\n{fqn}:{_shape_str(shape)}".encode())
        return h.hexdigest()[:16]

    def differences(self, other: ModelFingerprint) -> list[str]:
        """What changed from `self` (the plan's model) to `other` (the model at hand), one line each."""
        out = []
        if self.model_class != other.model_class:
            out.append(f"model class {self.model_class} -> {other.model_class}")
        mine, theirs = dict(self.tensors), dict(other.tensors)
        out += [f"{fqn}: shape {_shape_str(s)} -> {_shape_str(theirs[fqn])}"
                for fqn, s in mine.items() if fqn in theirs and theirs[fqn] != s]
        out += [f"missing {fqn} {_shape_str(s)}" for fqn, s in mine.items() if fqn not in theirs]
        out += [f"new {fqn} {_shape_str(s)}" for fqn, s in theirs.items() if fqn not in mine]
        return out

    def to_dict(self) -> dict:
        return {"class": self.model_class, "digest": self.digest, "fxpar_version": self.fxpar_version,
                "tensors": {fqn: _shape_str(s) for fqn, s in self.tensors}}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelFingerprint:
        try:
            tensors = tuple((str(fqn), _parse_shape(s)) for fqn, s in dict(d["tensors"]).items())
            fp = cls(str(d["class"]), tensors, str(d.get("fxpar_version", "")))
        except (KeyError, TypeError, ValueError) as e:
            raise PlanError(f"saved plan: the 'model' entry is malformed ({type(e).__name__}: {e}); it needs "
                            "'class' and 'tensors' ({fqn: 'AxB'}); save the plan again with fxpar.save_plan") from e
        if d.get("digest") not in (None, fp.digest):
            raise PlanError("saved plan: the 'model' entry was edited (its digest does not match its tensors); "
                            "restore it or save the plan again with fxpar.save_plan")
        return fp


def _shape_str(shape: Iterable[int]) -> str:
    shape = tuple(shape)
    return "x".join(str(s) for s in shape) if shape else "scalar"


def _parse_shape(text: str) -> tuple[int, ...]:
    return () if text == "scalar" else tuple(int(s) for s in str(text).split("x"))


# --------------------------------------------------------------------------- styles


@dataclass(frozen=True)
class SectionedStyle(TPStyle):
    """Column-wise on a projection whose output is `sections` equal parts (a fused qkv).

    Each part is sharded on its own (`_StridedShard(dim, split_factor=sections)`),
    so every rank holds the same heads of q, k and v. The automatic plan finds
    such projections in the graph; a resolved plan names them with this style.

    Attributes:
        sections: the number of equal output sections (2 or more).
    """

    sections: int = 2

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.kind != "colwise" or isinstance(self.sections, bool) or not isinstance(self.sections, int) \
                or self.sections < 2:
            raise PlanError(f"style '{self}': fused sections apply to 'colwise' with 2 or more sections, "
                            f"e.g. 'colwise (fused x3)' for a fused qkv projection")

    def __str__(self) -> str:
        return f"{self.kind} (fused x{self.sections})"


@dataclass(frozen=True)
class HeadsStyle(TPStyle):
    """Column- or row-wise by whole attention heads whose count does not divide tp (`passes.unflatten_heads`).

    `annotate_parameters` leaves such a module replicated and `unflatten_heads` cuts it by heads
    (torch.chunk's: GPT-2's 12 heads at tp=8 are 2+2+2+2+2+2+0+0), as the automatic plan does; a
    resolved plan names the attention's projections with this style so that it reloads the same.

    Grouped-query attention's k / v projections with fewer kv heads than tp (`passes.replicate_kv_heads`,
    each kv head held by tp / KV ranks) are saved likewise as 'colwise (kv heads replicated: ...)'.

    Attributes:
        split: what the pass recorded, e.g. 'uneven heads: 3 heads of 2+1 over tp=2' (informational: the
            pass cuts by the heads of the mesh the plan is used on).
    """

    split: str = ""

    @property
    def kv_replicated(self) -> bool:
        return str(self.split).startswith("kv heads replicated")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.kv_replicated and self.kind == "colwise":
            return
        if self.kind == "replicate" or not str(self.split).startswith("uneven heads"):
            raise PlanError(f"style '{self}': uneven heads apply to 'colwise' (q, k, v) and 'rowwise' (the output "
                            "projection), e.g. 'colwise (uneven heads: 3 heads of 2+1 over tp=2)'")

    def __str__(self) -> str:
        return f"{self.kind} ({self.split})"


@dataclass(frozen=True)
class ExpertsStyle(TPStyle):
    """Stacked MoE expert weights (a fused `moe_experts` node): placed by the mesh, not by a tp kind.

    The experts go by index over 'ep' and by feature over 'tp' (gate / up colwise, down rowwise) where
    the sizes divide (`annotate_parameters._expert_placements`), as for a module no plan names; a
    resolved plan names them with this style so that the saved file says so. `kind` is 'replicate'
    and is not read.

    Attributes:
        description: what annotate_parameters recorded, e.g. 'experts: experts by index over ep (4 / 2)'.
    """

    description: str = "experts"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.kind != "replicate" or not str(self.description).startswith("experts"):
            raise PlanError(f"style {self.description!r}: an experts style reads 'experts: ...' "
                            "(as annotate_parameters records it)")

    def __str__(self) -> str:
        return self.description


# 'colwise', 'colwise (fused x3)', 'replicate (not sharded: why)', 'colwise (uneven: 50 in chunks of 25 over
# tp=2)', 'rowwise (uneven heads: 3 heads of 2+1 over tp=2)', each maybe with apply_fsdp's '; ...' note.
_STYLE_RE = re.compile(r"^(?P<kind>[a-z_]+)(?: \(fused x(?P<k>\d+)\))?(?: \(not sharded: (?P<why>.*?)\))?"
                       r"(?: \((?P<heads>(?:uneven heads|kv heads replicated): [^)]*)\))?(?: \(uneven: [^)]*\))?"
                       r"(?P<rest>; .*)?$")


def parse_style(text: str, *, key: str = "") -> tuple[TPStyle, str | None]:
    """A style and its note from the text `annotate_parameters` records and saved plans hold.

    Args:
        text: 'colwise', 'rowwise', 'replicate', 'colwise (fused x3)',
            'replicate (not sharded: <why>)', 'colwise (uneven: <cut>)' (a Linear cut
            unevenly: the plain style, the pass cuts it again), 'colwise (uneven heads: <cut>)'
            (a HeadsStyle) or 'experts: <how>' (an ExpertsStyle).
        key: the module it belongs to, for the error message.

    Returns:
        (style, why it stays replicated or None).

    Raises:
        PlanError: text that is not a style.
    """
    text = str(text).strip()
    if text.startswith("experts"):
        return ExpertsStyle("replicate", text.split("; ", 1)[0]), None
    m = _STYLE_RE.match(text)
    if m is None or m.group("kind") not in TP_STYLES:
        raise PlanError(f"plan entry {key!r}: {text!r} is not a tensor-parallel style; use one of {TP_STYLES} "
                        "or 'colwise (fused xK)' for a projection whose output is K fused sections")
    kind, k, heads = m.group("kind"), m.group("k"), m.group("heads")
    style = SectionedStyle(kind, int(k)) if k else HeadsStyle(kind, heads) if heads else TPStyle(kind)
    return style, m.group("why")


# --------------------------------------------------------------------------- the resolved plan


@dataclass(frozen=True, init=False)
class ResolvedPlan(Plan):
    """A Plan with every decision explicit, the mesh it is for, and the model it fits.

    Attributes (besides Plan's):
        mesh: ((dim name, size), ...) the plan was made for; () for any mesh.
        model: the model's ModelFingerprint; None to skip the structure check.
        notes: ((module, why it stays replicated), ...) from the automatic plan.
    """

    mesh: tuple[tuple[str, int], ...] = ()
    model: ModelFingerprint | None = None
    notes: tuple[tuple[str, str], ...] = ()

    def __init__(self, tp: Mapping[str, Any] | Iterable[tuple[str, Any]] | None = None, *, pp: Any = None,
                 schedule: str | None = None, microbatches: int | None = None, dp: str | None = None,
                 auto_tp: bool = False, sequence_parallel: bool = False, loss_parallel: bool | None = None,
                 mesh: Mapping[str, int] | Iterable[tuple[str, int]] | None = None,
                 model: ModelFingerprint | None = None, notes: Mapping[str, str] | None = None) -> None:
        super().__init__(tp, pp=pp, schedule=schedule, microbatches=microbatches, dp=dp, auto_tp=auto_tp,
                         sequence_parallel=sequence_parallel, loss_parallel=loss_parallel)
        pairs = list(mesh.items()) if isinstance(mesh, Mapping) else list(mesh or ())
        for name, size in pairs:
            if not isinstance(size, int) or isinstance(size, bool) or size < 1:
                raise PlanError(f"saved plan: mesh dim {name!r} has size {size!r}; sizes are positive ints")
        object.__setattr__(self, "mesh", tuple((str(n), int(s)) for n, s in pairs))
        object.__setattr__(self, "model", model)
        object.__setattr__(self, "notes", tuple((str(k), str(v)) for k, v in dict(notes or {}).items()))

    @property
    def styles(self) -> dict[str, TPStyle]:
        """Module glob (for a resolved plan: module FQN) -> style."""
        return dict(self.tp)

    def without_mesh(self) -> ResolvedPlan:
        """The same plan without its mesh, to use its styles on another mesh (sizes are then checked by the passes)."""
        return ResolvedPlan(self.tp, pp=self.pp, schedule=self.schedule, microbatches=self.microbatches,
                            dp=self.dp, auto_tp=self.auto_tp, sequence_parallel=self.sequence_parallel,
                            loss_parallel=self.loss_parallel, model=self.model, notes=dict(self.notes))

    def to_dict(self) -> dict:
        """The JSON-ready form (see `FORMAT`)."""
        return {
            "format": FORMAT,
            "fxpar_version": fxpar_version(),
            "mesh": dict(self.mesh),
            "tp": {key: str(style) for key, style in self.tp},
            "notes": dict(self.notes),
            "auto_tp": self.auto_tp,
            "sequence_parallel": self.sequence_parallel,
            "loss_parallel": self.loss_parallel,
            "pp": list(self.pp) if isinstance(self.pp, tuple) else self.pp,
            "schedule": self.schedule,
            "microbatches": self.microbatches,
            "dp": self.dp,
            "model": self.model.to_dict() if self.model is not None else None,
        }

    def to_json(self) -> str:
        """The plan as JSON text: fixed key order, one entry per line, so saved plans diff cleanly."""
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ResolvedPlan:
        """Reads `to_dict()`'s form back.

        Raises:
            PlanError: another format, unknown keys, or a malformed entry, naming it.
        """
        if not isinstance(d, Mapping) or d.get("format") != FORMAT:
            found = d.get("format") if isinstance(d, Mapping) else type(d).__name__
            raise PlanError(f"not a saved fxpar plan: format is {found!r}, expected {FORMAT!r}; "
                            "write plans with fxpar.save_plan(pm.plan, path)")
        known = {"format", "fxpar_version", "mesh", "tp", "notes", "auto_tp", "pp", "schedule", "microbatches",
                 "dp", "model", "sequence_parallel", "loss_parallel"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise PlanError(f"saved plan: unknown keys {unknown}; the keys are {sorted(known)}")
        tp = d.get("tp") or {}
        if not isinstance(tp, Mapping):
            raise PlanError("saved plan: 'tp' maps module FQNs (or globs) to styles, e.g. "
                            "{\"layers.0.up\": \"colwise\"}")
        styles = [(key, parse_style(text, key=key)[0]) for key, text in tp.items()]
        model = d.get("model")
        return cls(styles, pp=d.get("pp"), schedule=d.get("schedule"), microbatches=d.get("microbatches"),
                   dp=d.get("dp"), auto_tp=d.get("auto_tp", False),
                   sequence_parallel=d.get("sequence_parallel", False), loss_parallel=d.get("loss_parallel"),
                   mesh=d.get("mesh") or {},
                   model=ModelFingerprint.from_dict(model) if model is not None else None, notes=d.get("notes"))

    @classmethod
    def from_json(cls, text: str) -> ResolvedPlan:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise PlanError(f"saved plan is not valid JSON: {e}") from e
        return cls.from_dict(data)


def _graphs(pm) -> list[fx.GraphModule]:
    """Every graph of a compiled module: all pipeline stages (other ranks' included), or its one graph."""
    gm = pm.graph_module
    split = stage_info(gm)
    if split is None:
        return [gm]
    return [gm.get_submodule(f"stage_{k}") for k in range(split.num_stages)]


def full_mesh(pm) -> tuple[tuple[str, int], ...]:
    """The mesh the module was compiled for, its pp dim put back for pipelines."""
    dims = list(zip(pm.mesh_info.names, pm.mesh_info.sizes))
    split = stage_info(pm.graph_module)
    pp_dim = getattr(pm, "_pp_dim", None)
    if split is not None and pp_dim is not None:
        dims.insert(pp_dim, ("pp", split.pp_size))
    return tuple(dims)


def resolve_plan(pm) -> ResolvedPlan:
    """The plan a compiled module carries out, every automatic choice made explicit.

    Args:
        pm: a ParallelModule (or PipelineModule) from parallelize or a dry run.

    Returns:
        A ResolvedPlan that compiles the same model on the same mesh into the same graph.

    Raises:
        PlanError: a style recorded on a parameter that is not a style (a pass wrote something else).
    """
    styles: dict[str, TPStyle] = {}
    notes: dict[str, str] = {}
    names = pm.mesh_info.names
    for g in _graphs(pm):
        for node in g.graph.nodes:
            info = get_info(node)
            if node.op != "get_attr" or info is None:
                continue
            if info.style is None:
                spec = info.spec
                if "tp" in names and spec is not None and hasattr(spec, "placements") and \
                        not spec.placements[names.index("tp")].is_replicate():
                    log.warning("parameter %s is sharded on tp but no pass recorded its module's style "
                                "(its style); the resolved plan cannot reproduce that", node.target)
                continue
            module = info.module_fqn
            style, why = parse_style(info.style, key=module)
            styles.setdefault(module, style)
            if why:
                notes.setdefault(module, why)
    requested = pm.requested_plan
    pp, schedule, microbatches = requested.pp, requested.schedule, requested.microbatches
    split = stage_info(pm.graph_module)
    if split is not None:
        # The balancer's cuts, as cut points: a stage starts at the first computing node of each.
        pp = tuple(s.cut_before for s in split.stages[1:]) if split.num_stages > 1 else split.num_stages
        schedule, microbatches = split.schedule, split.microbatches
    return ResolvedPlan(list(styles.items()), pp=pp, schedule=schedule, microbatches=microbatches,
                        dp=requested.dp, auto_tp=False, sequence_parallel=requested.sequence_parallel,
                        loss_parallel=requested.loss_parallel, mesh=full_mesh(pm),
                        model=pm.graph_module.meta.get(MODEL_KEY), notes=notes)


def check_plan_fits(plan: Plan, model: nn.Module, mesh_info) -> None:
    """Refuses a saved plan on a model or mesh other than the one it was made for.

    Plain Plans pass unchecked: their keys are checked against the model by the passes.

    Raises:
        PlanError: listing every structural change (parameters missing, new or
            reshaped; the class), or the two meshes.
    """
    if not isinstance(plan, ResolvedPlan):
        return
    if plan.model is not None:
        here = ModelFingerprint.of(model)
        changes = plan.model.differences(here)
        if changes:
            # A few of each kind: a reshaped model and a deeper one read differently.
            kinds: dict[str, list[str]] = {}
            for c in changes:
                kind = "missing" if c.startswith("missing ") else "new" if c.startswith("new ") else \
                    "class" if c.startswith("model class ") else "shape"
                kinds.setdefault(kind, []).append(c)
            listed = []
            for group in kinds.values():
                listed += group[:_MAX_LISTED] + ([f"... and {len(group) - _MAX_LISTED} more like it"]
                                                 if len(group) > _MAX_LISTED else [])
            raise PlanError(
                f"this plan was made for a {plan.model.model_class} whose structure differs from this "
                f"{here.model_class} ({len(changes)} changes):\n  " + "\n  ".join(listed) +
                "\nplan this model again (plan=None plans automatically; save the new pm.plan), or use the "
                "model the plan was saved for")
        if plan.model.fxpar_version and plan.model.fxpar_version != here.fxpar_version:
            log.warning("plan saved by fxpar %s, used with fxpar %s: the same plan, graphs may differ in detail",
                        plan.model.fxpar_version, here.fxpar_version)
    if plan.mesh:
        want = {n: s for n, s in plan.mesh if s > 1}
        got = {n: s for n, s in zip(mesh_info.names, mesh_info.sizes) if s > 1}
        if want != got:
            fmt = lambda d: "(" + ", ".join(f"{n}={s}" for n, s in d.items()) + ")"  # noqa: E731
            raise PlanError(
                f"this plan was made for mesh {fmt(want)} but the mesh is {fmt(got)}; its automatic choices "
                "(styles, cuts, microbatches) depend on the mesh sizes. Plan again for this mesh (plan=None), "
                "or use its styles anyway with plan.without_mesh() (fxpar.load_plan(path, any_mesh=True))")


def save_plan(plan: Any, path: str | Path) -> Path:
    """Writes a plan as JSON.

    Args:
        plan: a ResolvedPlan (`pm.plan`), a ParallelModule or dry-run report
            (its `.plan`), or a plain Plan (saved as is, without mesh or model).
        path: the file to write.

    Returns:
        The path written.
    """
    if not isinstance(plan, Plan) and hasattr(plan, "plan"):
        plan = plan.plan
    if not isinstance(plan, Plan):
        raise PlanError(f"save_plan takes a fxpar.Plan, a ParallelModule or a dry-run report, not "
                        f"{type(plan).__name__}")
    if not isinstance(plan, ResolvedPlan):
        plan = ResolvedPlan(plan.tp, pp=plan.pp, schedule=plan.schedule, microbatches=plan.microbatches,
                            dp=plan.dp, auto_tp=plan.auto_tp, sequence_parallel=plan.sequence_parallel,
                            loss_parallel=plan.loss_parallel)
    path = Path(path)
    # Under a process group every rank may call this: rank 0 writes (to a temporary file, renamed into
    # place, so a reader never sees half a plan) and the others wait for it.
    group = dist.is_available() and dist.is_initialized()
    if not group or dist.get_rank() == 0:
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(plan.to_json())
        os.replace(tmp, path)
    if group:
        dist.barrier()
    return path


def load_plan(path: str | Path, *, model: nn.Module | None = None, any_mesh: bool = False) -> ResolvedPlan:
    """Reads a plan written by `save_plan`.

    Args:
        path: the JSON file.
        model: check now that the plan fits this model (it is checked again,
            with the mesh, when the plan is used).
        any_mesh: drop the plan's mesh, to use its styles on another mesh.

    Returns:
        The ResolvedPlan, ready for `parallelize(..., plan=...)`.

    Raises:
        PlanError: not a saved plan, a malformed entry, or a model whose structure changed.
    """
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise PlanError(f"cannot read plan file {str(path)!r}: {e.strerror or e}") from e
    plan = ResolvedPlan.from_json(text)
    if any_mesh:
        plan = plan.without_mesh()
    if model is not None and plan.model is not None:
        check_plan_fits(plan.without_mesh(), model, None)
    return plan
