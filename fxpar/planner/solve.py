"""The exact solvers the planner uses where its space is too large to enumerate.

1. Per-module styles (`solve_choices`), AutoParallel's formulation: units u (a Megatron pair, a
   projection, an embedding), each with choices s of cost c[u,s] (seconds per step) and memory
   m[u,s] (bytes per rank), and edges (u, v) between neighbours with a resharding cost r[uv](s, t)
   (seconds; infinite where the two choices cannot meet). With binaries x[u,s] and y[uv,s,t]:

       minimize    sum_{u,s} c[u,s] x[u,s] + sum_{uv,s,t} r[uv](s,t) y[uv,s,t]
       subject to  sum_s x[u,s] = 1                          one choice per unit
                   sum_t y[uv,s,t] = x[u,s]                  an edge's choice agrees with its ends
                   sum_s y[uv,s,t] = x[v,t]
                   sum_{u in g, s} m[u,s] x[u,s] <= M[g]     memory, per group g (a pipeline stage)

   y with an infinite r is left out, which forbids that pair of choices. The program is a
   multiple-choice knapsack with pairwise terms (NP-hard in general): it goes to HiGHS's branch
   and cut through `scipy.optimize.milp`, which proves the optimum (`_milp`).

2. Pipeline cut points (`min_max_partition`): units 0..n-1 in order (blocks), S stages of
   consecutive units; stage k = [i, j) costs T(i, j) = sum of unit costs and holds memory
   mem(i, j, k) (a callable: 1F1B's stage k keeps S - k microbatches of activations). The exact
   dynamic program

       f[k][j] = min_{i < j, mem(i, j, k) <= M} max(f[k-1][i], T(i, j)),   f[0][0] = 0

   gives the least slowest stage f[S][n] under the budget in O(S n^2) evaluations
   (`min_max_partition`); the cuts are read back from the arg-mins.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np

from fxpar.core.errors import PlanError

__all__ = ["Choice", "Unit", "Solution", "solve_choices", "min_max_partition", "solver_available"]


def solver_available() -> bool:
    """Whether scipy (HiGHS through scipy.optimize.milp, a dependency of fxpar) is installed."""
    try:
        import scipy.optimize  # noqa: F401  (imported where used: `import fxpar` works without it)
    except ImportError:
        return False
    return True


@dataclass(frozen=True)
class Choice:
    """One option of a unit: its name, seconds per step and bytes per rank."""

    name: str
    cost: float
    memory: float = 0.0


@dataclass(frozen=True)
class Unit:
    """A unit of the style program: a name, its choices, and the memory group it counts in."""

    name: str
    choices: tuple[Choice, ...]
    group: int = 0


@dataclass(frozen=True)
class Solution:
    """The solver's answer: the index of each unit's choice, the objective and the memory per group."""

    picks: tuple[int, ...]
    cost: float
    memory: dict

    def names(self, units: Sequence[Unit]) -> dict[str, str]:
        return {u.name: u.choices[k].name for u, k in zip(units, self.picks)}


Edges = Mapping[tuple[int, int], Sequence[Sequence[float]]]


def solve_choices(units: Sequence[Unit], edges: Edges | None = None,
                  budget: float | Mapping[int, float] = math.inf, *, time_limit: float = 30.0) -> Solution:
    """Chooses one option per unit minimizing total cost under the memory budget (module docstring, 1).

    Args:
        units: the units and their choices.
        edges: {(u, v): r} with r[s][t] the resharding seconds between choice s of unit u and t of v
            (math.inf: not allowed).
        budget: bytes per rank, one number for every group or {group: bytes}.
        time_limit: seconds HiGHS may take.

    Returns:
        The optimal Solution.

    Raises:
        PlanError: no assignment fits the budget (or every combination is forbidden).
    """
    edges = dict(edges or {})
    if not units:
        return Solution((), 0.0, {})
    offset = [0]
    for u in units:
        if not u.choices:
            raise PlanError(f"style unit {u.name!r} has no choices")
        offset.append(offset[-1] + len(u.choices))
    cost = [c.cost for u in units for c in u.choices]
    # y variables: one per allowed (edge, s, t)
    yvars: list[tuple[int, int, int, int]] = []  # (u, v, s, t)
    for (a, b), r in edges.items():
        for s in range(len(units[a].choices)):
            for t in range(len(units[b].choices)):
                if math.isfinite(r[s][t]):
                    yvars.append((a, b, s, t))
                    cost.append(float(r[s][t]))
    nx = offset[-1]
    rows, cols, vals, lo, hi = [], [], [], [], []
    row = 0
    for i, u in enumerate(units):  # one choice per unit
        for s in range(len(u.choices)):
            rows.append(row), cols.append(offset[i] + s), vals.append(1.0)
        lo.append(1.0), hi.append(1.0)
        row += 1
    per_edge: dict[tuple[int, int], list[int]] = {}
    for j, (a, b, _, _) in enumerate(yvars):
        per_edge.setdefault((a, b), []).append(j)
    for (a, b) in edges:  # y marginals equal x
        for end, unit in ((0, a), (1, b)):
            for k in range(len(units[unit].choices)):
                rows.append(row), cols.append(offset[unit] + k), vals.append(-1.0)
                for j in per_edge.get((a, b), ()):
                    if yvars[j][2 + end] == k:
                        rows.append(row), cols.append(nx + j), vals.append(1.0)
                lo.append(0.0), hi.append(0.0)
                row += 1
    groups = sorted({u.group for u in units})
    limits = {g: (budget.get(g, math.inf) if isinstance(budget, Mapping) else budget) for g in groups}
    for g in groups:
        if not math.isfinite(limits[g]):
            continue
        for i, u in enumerate(units):
            if u.group == g:
                for s, c in enumerate(u.choices):
                    rows.append(row), cols.append(offset[i] + s), vals.append(float(c.memory))
        lo.append(-np.inf), hi.append(float(limits[g]))
        row += 1
    picks = _milp(np.array(cost), rows, cols, vals, lo, hi, nx, time_limit)
    if picks is None:
        least = {g: sum(min(c.memory for c in u.choices) for u in units if u.group == g) for g in groups}
        raise PlanError("no choice of per-module styles fits the memory budget: the least memory per group is "
                        + ", ".join(f"{g}: {least[g] / 2 ** 30:.2f} GiB (budget {limits[g] / 2 ** 30:.2f})"
                                    for g in groups)
                        + "; use more devices, a larger memory_gib, or a larger tp")
    chosen = tuple(int(np.argmax(picks[offset[i]:offset[i + 1]])) for i in range(len(units)))
    total = sum(u.choices[k].cost for u, k in zip(units, chosen))
    total += sum(edges[(a, b)][chosen[a]][chosen[b]] for (a, b) in edges)
    memory = {g: sum(u.choices[k].memory for u, k in zip(units, chosen) if u.group == g) for g in groups}
    return Solution(chosen, total, memory)


def _milp(c, rows, cols, vals, lo, hi, nx, time_limit):
    """x of the binary program min c x, lo <= A x <= hi (None: infeasible)."""
    try:
        from scipy.optimize import Bounds, LinearConstraint, milp
        from scipy.sparse import coo_array
    except ImportError as e:
        raise PlanError("the per-module style search needs scipy (scipy.optimize.milp, HiGHS): "
                        "pip install 'scipy>=1.9'") from e
    n = len(c)
    a = coo_array((vals, (rows, cols)), shape=(len(lo), n)).tocsr()
    res = milp(c, constraints=LinearConstraint(a, lo, hi), integrality=np.ones(n), bounds=Bounds(0, 1),
               options={"time_limit": time_limit, "disp": False})
    if res.x is None or res.status not in (0, 1):  # 1: time limit with a feasible point
        return None
    return np.round(res.x[:nx])


def min_max_partition(costs: Sequence[float], stages: int, *,
                      memory: Callable[[int, int, int], float] | None = None,
                      budget: float = math.inf) -> tuple[list[int], float]:
    """Cuts units 0..n-1 into `stages` consecutive stages minimizing the slowest, each within the budget.

    Args:
        costs: seconds of each unit.
        stages: S, at most len(costs).
        memory: mem(i, j, k), bytes of stage k holding units [i, j) (default: no memory limit).
        budget: bytes per stage.

    Returns:
        (the S - 1 cut indices ascending, a stage starting at each; the slowest stage's seconds).

    Raises:
        PlanError: S out of range, or no partition fits the budget.
    """
    n = len(costs)
    if not 1 <= stages <= n:
        raise PlanError(f"{stages} pipeline stages of {n} units: use 1 to {n} stages")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    fits = (lambda i, j, k: True) if memory is None else (lambda i, j, k: memory(i, j, k) <= budget)
    f = {0: 0.0}
    back: list[dict[int, int]] = []
    for k in range(stages):
        row: dict[int, float] = {}
        arg: dict[int, int] = {}
        last = k == stages - 1
        for j in ([n] if last else range(k + 1, n - (stages - k - 1) + 1)):
            for i, fi in f.items():
                if i >= j or not fits(i, j, k):
                    continue
                v = max(fi, prefix[j] - prefix[i])
                if j not in row or v < row[j]:
                    row[j], arg[j] = v, i
        back.append(arg)
        f = row
    if n not in f:
        raise PlanError(f"no cut of {n} units into {stages} pipeline stages fits {budget / 2 ** 30:.2f} GiB per stage; "
                        "use more pipeline stages, activation checkpointing, or a larger memory_gib")
    cuts, j = [], n
    for k in range(stages - 1, 0, -1):
        j = back[k][j]
        cuts.append(j)
    return sorted(cuts), f[n]
