"""bucket_grad_sync: data-parallel grad_all_reduce nodes on parameters become bucketed runtime gradient syncs."""

from __future__ import annotations

import torch
import torch.nn as nn

import fxpar
from fxpar.core.spec import GradSyncInfo, get_info
from fxpar.ops.collectives import collective_args
from models import MLPStack
from pass_harness import calls, context, param, position, run_upto

F = torch.ops.fxpar.grad_all_reduce.default
MEGATRON = {"layers.*.up": "colwise", "layers.*.down": "rowwise"}
PARAMS = [f"layers.{i}.{m}.{p}" for i in range(2) for m in ("up", "down") for p in ("weight", "bias")]


def _run(upto="bucket_grad_sync", mesh=None, plan=MEGATRON, model=None, **options):
    return run_upto(upto, model or MLPStack(depth=2), (torch.randn(4, 16),), mesh or {"dp": 2, "tp": 2}, plan,
                    dynamic=False, **options)


def _dims(gm, fs):
    return sorted(collective_args(f)["mesh_dim"] for f in fs)


def test_data_parallel_fs_on_parameters_move_to_their_grad_sync_tensor_parallel_fs_stay():
    before = _run("insert_collectives")
    on_params = [f for f in calls(before, F) if f.args[0].op == "get_attr"]
    assert _dims(before, on_params) == ["dp"] * len(PARAMS)
    gm = _run()
    assert [f for f in calls(gm, F) if collective_args(f)["mesh_dim"] == "dp"] == []
    # Megatron's f on the activations (tp) is no business of this pass
    assert _dims(gm, calls(gm, F)) == _dims(before, [f for f in calls(before, F) if f not in on_params]) \
        == ["tp", "tp"]
    for fqn in PARAMS:
        p = param(gm, fqn)
        assert get_info(p).grad_sync == GradSyncInfo(("dp",), 0)
        # the parameter now feeds its op directly
        assert all(u.target != F for u in p.users) and p.users


def test_buckets_fill_in_reverse_order_of_first_use_up_to_bucket_bytes():
    one_weight = get_info(param(_run(), "layers.0.up.weight")).spec.nbytes(local=True)  # 16 x 16 floats
    gm = _run(bucket_bytes=one_weight + 1)
    pos = position(gm)
    syncs = sorted(((min(pos[u] for u in param(gm, f).users), param(gm, f)) for f in PARAMS),
                   key=lambda t: -t[0])
    buckets = [get_info(p).grad_sync.bucket for _, p in syncs]
    # the last-used parameter's gradient comes first in the backward: bucket 0
    assert buckets[0] == 0 and buckets == sorted(buckets) and buckets[-1] > 0
    for b in set(buckets):
        members = [p for _, p in syncs if get_info(p).grad_sync.bucket == b]
        size = sum(get_info(p).spec.nbytes(local=True) for p in members)
        assert size <= one_weight + 1 or len(members) == 1
    assert len(set(buckets)) < len(PARAMS)  # biases share with their neighbours


class _Scaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.seq = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
        self.scale = nn.Parameter(torch.ones(()))  # a scalar: no dim 0 to shard on fsdp

    def forward(self, x):
        return self.seq(x) * self.scale


def test_fsdp_gathered_parameters_need_no_sync_the_replicated_ones_sync_on_fsdp():
    gm = _run(model=_Scaled(), mesh={"fsdp": 2}, plan={})
    assert calls(gm, F) == []
    assert get_info(param(gm, "seq.0.weight")).grad_sync is None  # its gather's backward reduce-scatters
    assert get_info(param(gm, "seq.2.weight")).grad_sync is None  # 3 rows: an uneven shard, reduce-scattered too
    assert get_info(param(gm, "scale")).grad_sync == GradSyncInfo(("fsdp",), 0)


def test_no_data_parallel_dim_nothing_to_bucket():
    gm = _run("insert_collectives", mesh={"tp": 2})
    result = fxpar.passes.bucket_grad_sync(gm, context({"tp": 2}, MEGATRON))
    assert not result.modified
    assert all(get_info(param(gm, f)).grad_sync is None for f in PARAMS)
