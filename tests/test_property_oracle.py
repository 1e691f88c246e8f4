"""The fast oracle itself: simulated ranks compile and communicate as real ones do.

Every rank of a mesh runs as a thread of this process (fxpar.testing.simulate);
these tests pin down that the simulation is faithful (same graphs as
`fxpar.parallelize`, collectives computing what gloo computes) and that it fails
loudly where real ranks would hang.
"""

from __future__ import annotations

import time

import pytest
import torch

import fxpar
from fxpar.testing.simulate import SimWorld, check_equivalence, simulate_parallelize
from fxpar.testing.strategies import BlockSpec, Case, ModelSpec, build_model, make_inputs

_c10d = torch.ops._c10d_functional


@pytest.mark.parametrize("mesh", [{"tp": 4}, {"dp": 2, "tp": 2}, {"dp": 2, "fsdp": 2}])
def test_simulated_compile_is_parallelize_on_each_rank(mesh):
    spec = ModelSpec(8, (BlockSpec("mlp", hidden=16), BlockSpec("attention", heads=2, kv_heads=1, causal=True)))
    model = build_model(spec)
    x, _ = make_inputs(Case(tuple(mesh.items()), spec, None, True, (4, 3), 0))
    with SimWorld(mesh) as world:
        pms = simulate_parallelize(model, world, example_inputs=(x,))
        for rank, pm in enumerate(pms):
            ref = fxpar.parallelize(model, world.device_mesh(rank), example_inputs=(x,))
            assert pm.graph_module.code == ref.graph_module.code
            assert pm.mesh_info == ref.mesh_info
            assert set(pm.graph_module.meta) == set(ref.graph_module.meta)
            shapes = {k: tuple(v.shape) for k, v in pm.graph_module.state_dict().items()}
            assert shapes == {k: tuple(v.shape) for k, v in ref.graph_module.state_dict().items()}


def test_ranks_are_numbered_as_init_device_mesh_numbers_them():
    with SimWorld({"dp": 2, "tp": 3}) as world:
        assert [world.coordinate(r) for r in range(6)] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
        tp_group = world.mesh_info(4).group_names[1]
        dp_group = world.mesh_info(4).group_names[0]
        assert world.group_ranks(tp_group) == (3, 4, 5) and world.group_ranks(dp_group) == (1, 4)
        ranks = world.run(lambda r: torch.distributed.distributed_c10d._resolve_process_group(
            world.mesh_info(r).group_names[1]).rank())
        assert ranks == [0, 1, 2, 0, 1, 2]


def test_collectives_compute_what_real_ones_do():
    with SimWorld({"tp": 3}) as world:
        def body(r):
            x = torch.arange(6, dtype=torch.float64).reshape(3, 2) + 10 * r
            g = world.mesh_info(r).group_names[0]
            return {
                "all_reduce": _c10d.wait_tensor(_c10d.all_reduce(x, "sum", g)),
                "all_gather": _c10d.wait_tensor(_c10d.all_gather_into_tensor(x, 3, g)),
                "reduce_scatter": _c10d.wait_tensor(_c10d.reduce_scatter_tensor(x, "sum", 3, g)),
                "all_to_all": _c10d.wait_tensor(_c10d.all_to_all_single(x, [1, 1, 1], [1, 1, 1], g)),
            }

        out = world.run(body)
    xs = [torch.arange(6, dtype=torch.float64).reshape(3, 2) + 10 * r for r in range(3)]
    for r in range(3):
        assert torch.equal(out[r]["all_reduce"], sum(xs))
        assert torch.equal(out[r]["all_gather"], torch.cat(xs))
        assert torch.equal(out[r]["reduce_scatter"], sum(xs)[r:r + 1])
        assert torch.equal(out[r]["all_to_all"], torch.cat([x[r:r + 1] for x in xs]))


def test_mismatched_collectives_fail_at_once_naming_every_rank():
    with SimWorld({"tp": 2}) as world:
        def body(r):
            g = world.mesh_info(r).group_names[0]
            return _c10d.wait_tensor(_c10d.all_reduce(torch.ones(3 + r), "sum", g))

        with pytest.raises(fxpar.GraphInvariantError) as e:
            world.run(body)
    msg = str(e.value)
    assert "collective #0 on group 'fxsim" in msg and "differs across its ranks" in msg
    assert "rank 0: all_reduce([3], float32, sum)" in msg and "rank 1: all_reduce([4], float32, sum)" in msg


def test_a_deadlock_is_reported_as_it_happens_not_after_a_timeout():
    with SimWorld({"tp": 2}, timeout=60) as world:
        def body(r):
            g = world.mesh_info(r).group_names[0]
            if r == 0:
                _c10d.wait_tensor(_c10d.all_reduce(torch.ones(2), "sum", g))
            return r

        start = time.monotonic()
        with pytest.raises(fxpar.GraphInvariantError, match=r"collective deadlock: .*\n  rank 0: waits in "
                                                            r"all_reduce\(\[2\], float32, sum\) #0 .*\n  rank 1: done"):
            world.run(body)
        assert time.monotonic() - start < 5


def test_a_failing_rank_keeps_its_exception_type_and_releases_the_others():
    with SimWorld({"tp": 2}) as world:
        def body(r):
            g = world.mesh_info(r).group_names[0]
            if r == 1:
                raise fxpar.ShardingError("planted on rank 1")
            return _c10d.wait_tensor(_c10d.all_reduce(torch.ones(2), "sum", g))

        with pytest.raises(fxpar.ShardingError, match="planted on rank 1") as e:
            world.run(body)
        assert "(raised on simulated rank 1 of 2)" in e.value.__notes__
        assert world.run(lambda r: r) == [0, 1]  # the world is usable again


def test_pipelines_are_refused_with_the_harness_to_use():
    with SimWorld({"pp": 2}) as world, pytest.raises(fxpar.PlanError, match="rank_pool"):
        simulate_parallelize(torch.nn.Linear(4, 4), world, example_inputs=(torch.randn(2, 4),))


def test_check_equivalence_is_the_oracle_in_one_call():
    spec = ModelSpec(8, (BlockSpec("gated_mlp", hidden=16, bias=False),))
    model = build_model(spec)
    x, y = make_inputs(Case((("tp", 2),), spec, None, True, (4, 3), 3))
    reports = check_equivalence(model, {"tp": 2}, x, target=y, loss_fn=lambda o, t: ((o - t) ** 2).mean())
    assert len(reports) == 2 and all(r.ok for r in reports)
    names = {t.name for t in reports[0].tensors}
    assert {"param blocks.0.gate.weight", "output[0]", "loss", "grad blocks.0.gate.weight", "grad input[0]"} <= names
