"""Bad input gets a clear error naming the module and the fix."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import fxpar
from models import MLPStack

MEGATRON = {"layers.*.up": "colwise", "layers.*.down": "rowwise"}


def test_plan_key_matching_nothing_lists_near_fqns(make_fake_mesh):
    mesh = make_fake_mesh((2,), ("tp",))
    with pytest.raises(fxpar.PlanError) as e:
        fxpar.parallelize(MLPStack(), mesh, example_inputs=(torch.randn(2, 16),), plan={"layers.*.upp": "colwise"})
    msg = str(e.value)
    assert "'layers.*.upp' matches no module" in msg and "layers.0.up" in msg
    assert isinstance(e.value, ValueError)


def test_unknown_style_is_a_plan_error():
    with pytest.raises(fxpar.PlanError, match="unknown style 'columnwise'"):
        fxpar.Plan(tp={"a": "columnwise"})


class _Lookup(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(30, 16)

    def forward(self, ids):
        return self.emb(ids)


def test_non_divisible_dim_names_module_and_fix(make_fake_mesh):
    # an embedding's vocab-parallel rows must divide (its rule computes chunk offsets); a Linear's need not
    mesh = make_fake_mesh((4,), ("tp",))
    with pytest.raises(fxpar.ShardingError) as e:
        fxpar.parallelize(_Lookup(), mesh, example_inputs=(torch.randint(0, 30, (2, 3)),), plan={"emb": "rowwise"})
    msg = str(e.value)
    assert "'emb'" in msg and "size 30" in msg and "tp=4" in msg
    assert "use tp in [2, 3, 5, 6, 10, 15, 30]" in msg and "'replicate'" in msg
    assert "[annotate_parameters]" in msg


def test_non_divisible_linear_is_sharded_unevenly(make_fake_mesh):
    # 30 hidden features on tp=4: torch.chunk's 8, 8, 8, 6 (tests/test_uneven_shards.py checks the numerics)
    mesh = make_fake_mesh((4,), ("tp",))
    pm = fxpar.parallelize(MLPStack(dim=16, hidden=30), mesh, example_inputs=(torch.randn(2, 16),), plan=MEGATRON)
    assert "colwise (uneven: 30 in chunks of 8 over tp=4)" in pm.explain()


def test_automatic_plan_leaves_non_divisible_pairs_replicated(make_fake_mesh):
    mesh = make_fake_mesh((4,), ("tp",))
    pm = fxpar.parallelize(MLPStack(dim=16, hidden=30), mesh, example_inputs=(torch.randn(2, 16),))
    assert all(p.shape in {(30, 16), (30,), (16, 30), (16,)} for p in pm.parameters())
    assert "Collectives (0 nodes" in pm.explain()


def test_plan_on_mesh_without_tp_dim(make_fake_mesh):
    mesh = make_fake_mesh((2,), ("dp",))
    with pytest.raises(fxpar.PlanError, match="not parallelize yet|no 'tp' dim"):
        fxpar.parallelize(MLPStack(), mesh, example_inputs=(torch.randn(2, 16),), plan=MEGATRON)


def test_mesh_with_unknown_dim_name(make_fake_mesh):
    mesh = make_fake_mesh((2,), ("model",))
    with pytest.raises(fxpar.PlanError, match=r"mesh dim names \['model'\] are not recognised"):
        fxpar.parallelize(MLPStack(), mesh, example_inputs=(torch.randn(2, 16),), plan=MEGATRON)


def test_unnamed_1d_mesh_is_tp(make_fake_mesh):
    mesh = make_fake_mesh((2,))
    pm = fxpar.parallelize(MLPStack(), mesh, example_inputs=(torch.randn(2, 16),), plan=MEGATRON)
    assert pm.mesh_info.names == ("tp",)


def test_style_on_module_it_cannot_shard(make_fake_mesh):
    class WithNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.LayerNorm(16)

        def forward(self, x):
            return self.norm(x)

    mesh = make_fake_mesh((2,), ("tp",))
    with pytest.raises(fxpar.PlanError, match="does not know how to shard its parameter 'weight'.*'norm'"):
        fxpar.parallelize(WithNorm(), mesh, example_inputs=(torch.randn(2, 16),), plan={"norm": "colwise"})


def test_capture_error_names_module_and_line(make_fake_mesh):
    class Branchy(nn.Module):
        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow
                return x * 2
            return x

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = Branchy()

        def forward(self, x):
            return self.inner(x)

    mesh = make_fake_mesh((2,), ("tp",))
    with pytest.raises(fxpar.CaptureError) as e:
        fxpar.parallelize(Outer(), mesh, example_inputs=(torch.randn(2, 16),))
    msg = str(e.value)
    assert "module 'inner'" in msg and "test_errors.py:" in msg and "torch.cond" in msg


def test_errors_keep_their_type_and_gain_the_pass_name(make_fake_mesh):
    @fxpar.fx_pass(requires=("captured",), provides=("boom",))
    def explode(gm, ctx):
        raise KeyError("inner failure")

    mesh = make_fake_mesh((2,), ("tp",))
    with pytest.raises(KeyError) as e:
        fxpar.parallelize(MLPStack(), mesh, example_inputs=(torch.randn(2, 16),), passes=[explode])
    assert any("explode" in note for note in getattr(e.value, "__notes__", []))
