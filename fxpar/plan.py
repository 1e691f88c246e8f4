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

from fxpar.errors import PlanError

__all__ = ["TPStyle", "Plan", "as_plan", "TP_STYLES"]

TP_STYLES = ("colwise", "rowwise", "replicate")


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


def _style(value: Any, key: str) -> TPStyle:
    if isinstance(value, TPStyle):
        return value
    if isinstance(value, str):
        if value not in TP_STYLES:
            raise PlanError(f"plan key {key!r}: unknown style {value!r}; use one of {TP_STYLES} or a fxpar.TPStyle")
        return TPStyle(value)
    raise PlanError(f"plan key {key!r}: a style is a string from {TP_STYLES} or a fxpar.TPStyle, not {value!r}")


@dataclass(frozen=True)
class Plan:
    """How to parallelize: tensor-parallel styles by module glob, and more as it lands.

    Attributes:
        tp: (glob, style) pairs in priority order (later wins).
        pp: pipeline cut points (module FQNs) or a stage count; None for no pipeline.
        dp: 'dp' or 'fsdp' for data parallelism over the mesh dim of that name.
        auto_tp: plan tensor parallelism automatically for modules no tp key names.
    """

    tp: tuple[tuple[str, TPStyle], ...] = ()
    pp: Any = None
    dp: str | None = None
    auto_tp: bool = False

    def __init__(self, tp: Mapping[str, Any] | Iterable[tuple[str, Any]] | None = None, *, pp: Any = None,
                 dp: str | None = None, auto_tp: bool = False) -> None:
        items = list(tp.items()) if isinstance(tp, Mapping) else list(tp or ())
        pairs = []
        for key, value in items:
            if not isinstance(key, str) or not key:
                raise PlanError(f"plan keys are module FQN globs (non-empty strings), not {key!r}")
            pairs.append((key, _style(value, key)))
        if dp not in (None, "dp", "fsdp"):
            raise PlanError(f"dp={dp!r}: use 'dp' or 'fsdp' (the name of the data-parallel mesh dim)")
        object.__setattr__(self, "tp", tuple(pairs))
        object.__setattr__(self, "pp", pp)
        object.__setattr__(self, "dp", dp)
        object.__setattr__(self, "auto_tp", auto_tp)

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
        return {"tp": {k: str(s) for k, s in self.tp}, "pp": self.pp, "dp": self.dp, "auto_tp": self.auto_tp}


def as_plan(plan: Plan | Mapping[str, Any] | None) -> Plan:
    """Accepts a Plan, a plain {glob: style} dict (the tp part), or None (automatic)."""
    if plan is None:
        return Plan(auto_tp=True)
    if isinstance(plan, Plan):
        return plan
    if isinstance(plan, Mapping):
        return Plan(tp=plan)
    raise PlanError(f"plan must be a fxpar.Plan, a {{glob: style}} dict or None, not {type(plan).__name__}")
