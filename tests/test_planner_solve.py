"""The planner's exact solvers against brute force: the per-module style ILP and the pipeline min-max cut."""

from __future__ import annotations

import itertools
import math
import random

import pytest

import fxpar
from fxpar.planner.solve import Choice, Unit, min_max_partition, solve_choices, solver_available

INF = math.inf
needs_scipy = pytest.mark.skipif(not solver_available(), reason="scipy is not installed here (a dependency of fxpar: "
                                                                "pip install -e .)")


def _brute(units, edges, budget):
    best = None
    for picks in itertools.product(*(range(len(u.choices)) for u in units)):
        mem = {}
        for u, k in zip(units, picks):
            mem[u.group] = mem.get(u.group, 0.0) + u.choices[k].memory
        limit = (lambda g: budget.get(g, INF)) if isinstance(budget, dict) else (lambda g: budget)
        if any(m > limit(g) + 1e-9 for g, m in mem.items()):
            continue
        cost = sum(u.choices[k].cost for u, k in zip(units, picks))
        cost += sum(r[picks[a]][picks[b]] for (a, b), r in edges.items())
        if math.isfinite(cost) and (best is None or cost < best):
            best = cost
    return best


@needs_scipy
def test_memory_budget_by_hand():
    # sharding each pair costs communication (slower) but saves memory; 10 bytes allow one replicated pair
    units = [Unit(f"pair{i}", (Choice("megatron", 3.0, 4.0), Choice("replicate", 1.0, 8.0))) for i in range(3)]
    free = solve_choices(units, budget=INF)
    assert free.names(units) == {f"pair{i}": "replicate" for i in range(3)} and free.cost == 3.0
    tight = solve_choices(units, budget=16.0)  # 8 + 4 + 4: one replicated
    assert sorted(tight.names(units).values()) == ["megatron", "megatron", "replicate"]
    assert tight.cost == 7.0 and tight.memory == {0: 16.0}
    with pytest.raises(fxpar.PlanError, match="no choice of per-module styles fits"):
        solve_choices(units, budget=11.0)


@needs_scipy
def test_resharding_between_neighbours_by_hand():
    # colwise feeding rowwise needs no resharding; any other meeting costs 5, colwise -> replicate is forbidden
    styles = (Choice("colwise", 1.0), Choice("rowwise", 1.0), Choice("replicate", 2.0))
    units = [Unit("a", styles), Unit("b", styles)]
    r = [[5.0, 0.0, INF], [5.0, 5.0, 5.0], [5.0, 5.0, 5.0]]
    sol = solve_choices(units, {(0, 1): r})
    assert sol.names(units) == {"a": "colwise", "b": "rowwise"} and sol.cost == 2.0


@needs_scipy
@pytest.mark.parametrize("seed", range(12))
def test_random_programs_equal_brute_force(seed):
    rng = random.Random(seed)
    n = rng.randint(2, 6)
    units = [Unit(f"u{i}", tuple(Choice(f"c{s}", rng.uniform(0, 10), rng.uniform(0, 10))
                                 for s in range(rng.randint(1, 3))), group=rng.randint(0, 1)) for i in range(n)]
    edges = {}
    for a in range(n - 1):
        if rng.random() < 0.7:
            edges[(a, a + 1)] = [[INF if rng.random() < 0.15 else rng.uniform(0, 5) for _ in units[a + 1].choices]
                                 for _ in units[a].choices]
    budget = {0: rng.uniform(5, 30), 1: rng.uniform(5, 30)}
    want = _brute(units, edges, budget)
    if want is None:
        with pytest.raises(fxpar.PlanError):
            solve_choices(units, edges, budget)
        return
    got = solve_choices(units, edges, budget)
    assert got.cost == pytest.approx(want, rel=1e-9, abs=1e-9)
    assert all(got.memory[g] <= budget[g] + 1e-6 for g in got.memory)


def _brute_partition(costs, stages, memory, budget):
    n = len(costs)
    best = None
    for cuts in itertools.combinations(range(1, n), stages - 1):
        bounds = [0, *cuts, n]
        spans = list(zip(bounds, bounds[1:]))
        if memory and any(memory(i, j, k) > budget for k, (i, j) in enumerate(spans)):
            continue
        worst = max(sum(costs[i:j]) for i, j in spans)
        if best is None or worst < best:
            best = worst
    return best


def test_partition_by_hand():
    cuts, worst = min_max_partition([1, 1, 1, 1, 4], 2)
    assert (cuts, worst) == ([4], 4)
    # 1F1B: stage 0 keeps 2 microbatches of activations (2 per unit), stage 1 one: memory moves the cut
    mem = lambda i, j, k: (j - i) * 2 * (2 - k)  # noqa: E731
    cuts, worst = min_max_partition([1, 1, 1, 1], 2, memory=mem, budget=6)
    assert cuts == [1] and worst == 3
    with pytest.raises(fxpar.PlanError, match="no cut of 4 units into 2"):
        min_max_partition([1, 1, 1, 1], 2, memory=mem, budget=5)


@pytest.mark.parametrize("seed", range(10))
def test_random_partitions_equal_brute_force(seed):
    rng = random.Random(100 + seed)
    n = rng.randint(2, 9)
    stages = rng.randint(1, min(n, 4))
    costs = [rng.uniform(0.1, 5) for _ in range(n)]
    weights = [rng.uniform(0.1, 5) for _ in range(n)]
    memory = lambda i, j, k: sum(weights[i:j]) * (stages - k)  # noqa: E731
    budget = rng.uniform(3, 30)
    want = _brute_partition(costs, stages, memory, budget)
    if want is None:
        with pytest.raises(fxpar.PlanError):
            min_max_partition(costs, stages, memory=memory, budget=budget)
        return
    cuts, got = min_max_partition(costs, stages, memory=memory, budget=budget)
    assert got == pytest.approx(want, rel=1e-12)
    bounds = [0, *cuts, len(costs)]
    assert max(sum(costs[i:j]) for i, j in zip(bounds, bounds[1:])) == pytest.approx(got, rel=1e-12)
