"""Plans: validated, immutable descriptions of how to parallelize a model.

    Plan(tp={"layers.*.up": "colwise", "layers.*.down": "rowwise"})

Tensor-parallel keys are module FQN globs (fnmatch, `*` matches within and
across dots) mapped to a style. Later keys override earlier ones for the
modules they both match. A key that matches no module is an error that lists
the nearest FQNs: silently ignoring a typo would leave a model unsharded.
"""

from __future__ import annotations

import difflib
import fnmatch
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from fxpar.core.errors import PlanError

__all__ = ["TPStyle", "Plan", "as_plan", "TP_STYLES", "PP_SCHEDULES"]

TP_STYLES = ("colwise", "rowwise", "replicate")

# Pipeline schedules by name; fxpar.runtime.pipeline maps each to torch.distributed.pipelining's class.
PP_SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b", "looped_bfs", "interleaved_zb", "zbv", "dualpipev")
_SCHEDULE_ALIASES = {"interleaved": "interleaved_1f1b", "zb-v": "zbv", "zbvzerobubble": "zbv",
                     "dualpipe_v": "dualpipev"}


@dataclass(frozen=True)
class TPStyle:
    """A tensor-parallel style for one module.

    Attributes:
        kind: 'colwise' (weight [out, in] sharded on out), 'rowwise' (sharded
            on in, output reduced), or 'replicate'.
    """

    kind: str

    def __post_init__(self) -> None:
        if self.kind not in TP_STYLES:
            raise PlanError(f"unknown tensor-parallel style {self.kind!r}; use one of {TP_STYLES}")

    def __str__(self) -> str:
        return self.kind


def _pp(value: Any) -> int | tuple[str, ...] | None:
    """Validates the pp field: a stage count or module FQNs to cut before."""
    if value is None:
        return None
    if isinstance(value, bool) or (isinstance(value, int) and value < 1):
        raise PlanError(f"pp={value!r}: a stage count is a positive int")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        value = [value]
    if isinstance(value, Iterable):
        cuts = tuple(value)
        if not cuts or not all(isinstance(c, str) and c for c in cuts):
            raise PlanError(f"pp={value!r}: cut points are module FQNs (non-empty strings), e.g. ['layers.4']")
        dup = sorted({c for c in cuts if cuts.count(c) > 1})
        if dup:
            raise PlanError(f"pp cut points {dup} are given more than once; list each module once")
        return cuts
    raise PlanError(f"pp={value!r}: give a stage count (int) or a list of module FQNs to cut before")


def _schedule(value: Any) -> str | None:
    if value is None:
        return None
    name = _SCHEDULE_ALIASES.get(str(value).lower(), str(value).lower())
    if name not in PP_SCHEDULES:
        raise PlanError(f"schedule={value!r} is not a pipeline schedule fxpar runs; use one of {PP_SCHEDULES}")
    return name


def _style(value: Any, key: str) -> TPStyle:
    if isinstance(value, TPStyle):
        return value
    if isinstance(value, str):
        if value not in TP_STYLES:
            raise PlanError(f"plan key {key!r}: unknown style {value!r}; use one of {TP_STYLES} or a fxpar.TPStyle")
        return TPStyle(value)
    raise PlanError(f"plan key {key!r}: a style is a string from {TP_STYLES} or a fxpar.TPStyle, not {value!r}")


MAX_MICROBATCHES = 1 << 16
"""More microbatches than any batch has rows: a plan asking for more is a typo (and would take forever to simulate)."""


@dataclass(frozen=True)
class Plan:
    """How to parallelize: tensor-parallel styles by module glob, and more as it lands.

    Attributes:
        tp: (glob, style) pairs in priority order (later wins).
        pp: pipeline cut points (module FQNs, a stage starts at each) or a total
            stage count (balanced automatically); None: one stage per rank (times
            the schedule's stages per rank) on the mesh's 'pp' dim, balanced
            automatically.
        schedule: pipeline schedule, one of PP_SCHEDULES (None: '1f1b', or
            'interleaved_1f1b' when there are more stages than pp ranks).
        microbatches: microbatches per step (None: the number of stages).
        dp: 'dp' or 'fsdp' for data parallelism over the mesh dim of that name.
        auto_tp: plan tensor parallelism automatically for modules no tp key names.
        sequence_parallel: Megatron-SP on the tp dim: norms, dropout and residual adds run on
            sequence shards (dim -2 of a (..., T, C) activation); each block's forward all-reduce
            becomes a reduce-scatter, and an all-gather runs before the next column-parallel matmul.
        loss_parallel: with a captured loss (`parallelize(..., loss_fn=, example_target=)`), compute
            cross-entropy on vocab-sharded logits (max, sum-exp and target-logit all-reduces of a few
            bytes per token) instead of gathering them. None: on when the loss is captured and the
            head is vocab-sharded; True / False force it (True on a replicated head is a PlanError).
    """

    tp: tuple[tuple[str, TPStyle], ...] = ()
    pp: int | tuple[str, ...] | None = None
    schedule: str | None = None
    microbatches: int | None = None
    dp: str | None = None
    auto_tp: bool = False
    sequence_parallel: bool = False
    loss_parallel: bool | None = None

    def __init__(self, tp: Mapping[str, Any] | Iterable[tuple[str, Any]] | None = None, *, pp: Any = None,
                 schedule: str | None = None, microbatches: int | None = None,
                 dp: str | None = None, auto_tp: bool = False, sequence_parallel: bool = False,
                 loss_parallel: bool | None = None) -> None:
        items = list(tp.items()) if isinstance(tp, Mapping) else list(tp or ())
        pairs = []
        for key, value in items:
            if not isinstance(key, str) or not key:
                raise PlanError(f"plan keys are module FQN globs (non-empty strings), not {key!r}")
            pairs.append((key, _style(value, key)))
        if dp not in (None, "dp", "fsdp"):
            raise PlanError(f"dp={dp!r}: use 'dp' or 'fsdp' (the name of the data-parallel mesh dim)")
        if microbatches is not None and (isinstance(microbatches, bool) or not isinstance(microbatches, int)
                                         or not 1 <= microbatches <= MAX_MICROBATCHES):
            raise PlanError(f"microbatches={microbatches!r}: use a positive int (at most {MAX_MICROBATCHES}) that "
                            "divides the batch")
        if not isinstance(auto_tp, bool):
            raise PlanError(f"auto_tp={auto_tp!r}: use True or False")
        if not isinstance(sequence_parallel, bool):
            raise PlanError(f"sequence_parallel={sequence_parallel!r}: use True or False")
        if loss_parallel not in (None, True, False):
            raise PlanError(f"loss_parallel={loss_parallel!r}: use None (automatic), True or False")
        object.__setattr__(self, "tp", tuple(pairs))
        object.__setattr__(self, "pp", _pp(pp))
        object.__setattr__(self, "schedule", _schedule(schedule))
        object.__setattr__(self, "microbatches", microbatches)
        object.__setattr__(self, "dp", dp)
        object.__setattr__(self, "auto_tp", auto_tp)
        object.__setattr__(self, "sequence_parallel", sequence_parallel)
        object.__setattr__(self, "loss_parallel", loss_parallel)

    def resolve_tp(self, module_fqns: Iterable[str]) -> dict[str, TPStyle]:
        """Maps each module FQN some key matches to its style.

        Raises:
            PlanError: a key that matches no module, with the nearest FQNs.
        """
        fqns = [f for f in module_fqns if f]
        out: dict[str, TPStyle] = {}
        for key, style in self.tp:
            hits = [f for f in fqns if fnmatch.fnmatchcase(f, key)]
            if not hits:
                near = difflib.get_close_matches(key, fqns, n=5, cutoff=0.4)
                hint = f"; nearest module FQNs: {near}" if near else f"; module FQNs look like {fqns[:5]}"
                raise PlanError(f"plan key {key!r} matches no module{hint}")
            for f in hits:
                out[f] = style
        return out

    def to_dict(self) -> dict:
        pp = list(self.pp) if isinstance(self.pp, tuple) else self.pp
        return {"tp": {k: str(s) for k, s in self.tp}, "pp": pp, "schedule": self.schedule,
                "microbatches": self.microbatches, "dp": self.dp, "auto_tp": self.auto_tp,
                "sequence_parallel": self.sequence_parallel, "loss_parallel": self.loss_parallel}


def as_plan(plan: Plan | Mapping[str, Any] | None) -> Plan:
    """Accepts a Plan, a plain {glob: style} dict (the tp part), or None (automatic)."""
    if plan is None:
        return Plan(auto_tp=True)
    if isinstance(plan, Plan):
        return plan
    if isinstance(plan, Mapping):
        return Plan(tp=plan)
    raise PlanError(f"plan must be a fxpar.Plan, a {{glob: style}} dict or None, not {type(plan).__name__}")
