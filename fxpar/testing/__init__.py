"""Testing utilities: a multi-rank gloo harness, an in-process simulator of all ranks, hypothesis strategies.

    rank_pool(n).run(fn, *args)          real gloo ranks (processes): pipelines, the runtime
    SimWorld({"tp": 4}).run(fn)          every rank of a mesh as a thread of this process: fast oracle
    check_equivalence(model, mesh, x)    compile for every rank, check statically, verify numerically
    fxpar.testing.strategies             random meshes, models, plans and inputs for hypothesis

`strategies` imports hypothesis; import it explicitly (`from fxpar.testing.strategies import cases`).
"""

from fxpar.testing.dist import RankError, RankPool, preload, rank_pool, run_ranks
from fxpar.testing.simulate import SimDeviceMesh, SimWorld, check_equivalence, sim_world, simulate_parallelize

__all__ = [
    "RankError",
    "RankPool",
    "preload",
    "rank_pool",
    "run_ranks",
    "SimWorld",
    "SimDeviceMesh",
    "sim_world",
    "simulate_parallelize",
    "check_equivalence",
]
