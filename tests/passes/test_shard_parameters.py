"""shard_parameters: the GraphModule keeps only this rank's chunk of each sharded parameter."""

from __future__ import annotations

import torch
import torch.nn as nn

import fxpar
from fxpar.core.mesh import MeshInfo
from fxpar.core.spec import get_spec
from models import MLPBlock
from pass_harness import context, param, run_upto

MEGATRON = {"up": "colwise", "down": "rowwise"}


def _mesh(names, sizes, coordinate):
    return MeshInfo(names, sizes, coordinate, tuple(f"dryrun:{n}" for n in names))


def _shard(model, mesh, plan=MEGATRON):
    return run_upto("shard_parameters", model, (torch.randn(4, 16),), mesh, plan, dynamic=False)


def test_each_rank_holds_its_chunk_along_the_sharded_dim():
    model = MLPBlock(16, 32)
    full = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for tp_rank in (0, 1):
        gm = _shard(model, _mesh(("dp", "tp"), (2, 2), (1, tp_rank)))
        torch.testing.assert_close(gm.up.weight, full["up.weight"].chunk(2, 0)[tp_rank])   # colwise: rows
        torch.testing.assert_close(gm.up.bias, full["up.bias"].chunk(2, 0)[tp_rank])
        torch.testing.assert_close(gm.down.weight, full["down.weight"].chunk(2, 1)[tp_rank])  # rowwise: columns
        torch.testing.assert_close(gm.down.bias, full["down.bias"])  # replicated: the whole tensor
        for fqn in full:
            t = gm.get_parameter(fqn)
            assert isinstance(t, nn.Parameter) and t.requires_grad and t.is_contiguous()
            assert tuple(t.shape) == get_spec(param(gm, fqn)).local_shape


def test_the_users_model_keeps_its_full_parameters():
    model = MLPBlock(16, 32)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    gm = _shard(model, _mesh(("tp",), (2,), (0,)))
    assert gm.up.weight.shape == (16, 16)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    # and the shard owns its memory: no view into a full tensor kept alive
    assert gm.up.weight.untyped_storage().nbytes() == gm.up.weight.numel() * 4


def test_fsdp_cuts_after_tensor_parallel():
    model = MLPBlock(16, 32)
    w = model.up.weight.detach().clone()
    gm = _shard(model, _mesh(("fsdp", "tp"), (2, 2), (1, 0)))
    # tp rank 0's rows 0..15, then fsdp rank 1's half of those: rows 8..15
    torch.testing.assert_close(gm.up.weight, w[8:16])
    assert get_spec(param(gm, "up.weight")).local_shape == (8, 16)


def test_without_a_coordinate_tensors_stay_whole():
    model = MLPBlock(16, 32)
    mesh = MeshInfo.from_sizes({"tp": 2})
    gm = run_upto("bucket_grad_sync", model, (torch.randn(4, 16),), mesh, MEGATRON, dynamic=False)
    result = fxpar.passes.shard_parameters(gm, context(mesh, MEGATRON))
    assert not result.modified
    assert gm.up.weight.shape == (32, 16)


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(32, 16)
        self.head = nn.Linear(16, 32, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(self.emb(ids))


def test_tied_weights_are_cut_once_and_stay_one_parameter():
    model = Tied()
    w = model.emb.weight.detach().clone()
    gm = run_upto("shard_parameters", model, (torch.randint(0, 32, (4, 8)),), _mesh(("tp",), (2,), (1,)),
                  {"head": "colwise"}, dynamic=False)
    assert gm.emb.weight is gm.head.weight
    torch.testing.assert_close(gm.head.weight, w.chunk(2, 0)[1])
    assert len(list(gm.parameters())) == 1
