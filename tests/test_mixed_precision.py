"""Mixed precision with FSDP2's MixedPrecisionPolicy: float32 master weights, bf16 compute, fp32 reduction."""

from __future__ import annotations

import collections
import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.fsdp import MixedPrecisionPolicy

import fxpar
from fxpar.core.spec import get_info
from fxpar.testing import rank_pool

from tests.models import mse, tiny_gpt2

transformers = pytest.importorskip("transformers")

BF16 = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def ce(out, target):
    logits = out if isinstance(out, torch.Tensor) else out.logits
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), target.reshape(-1))


def _bf16_step(shape, names) -> dict:
    mesh = torch.distributed.device_mesh.init_device_mesh("cpu", shape, mesh_dim_names=names)
    torch.manual_seed(0)
    model = tiny_gpt2(n_layer=2, n_embd=64)
    ids, target = torch.randint(0, 128, (4, 16)), torch.randint(0, 128, (4, 16))
    pm = fxpar.parallelize(model, mesh, example_inputs=(ids,), mp_policy=BF16)
    with fxpar.count_comms() as comms:
        loss = pm.step(ids, target=target, loss_fn=ce)
    ref = copy.deepcopy(model)
    ref_loss = ce(ref(ids), target)
    ref_loss.backward()
    grads = pm.full_grads()
    rel = {k: ((grads[k] - p.grad).norm() / p.grad.norm()).item() for k, p in ref.named_parameters()
           if p.grad is not None and p.grad.norm() > 0}
    dtypes = collections.Counter(f"{c.direction} {c.op} {c.mesh_dim}" for c in comms)
    bytes_by = collections.Counter()
    for c in comms:
        bytes_by[f"{c.direction} {c.op} {c.mesh_dim}"] += c.nbytes
    return {
        "param_dtypes": {str(p.dtype) for p in pm.parameters()},
        "grad_dtypes": {str(p.grad.dtype) for p in pm.parameters() if p.grad is not None},
        "full_grad_dtypes": {str(g.dtype) for g in grads.values()},
        "rel": rel, "loss": loss.item(), "ref_loss": ref_loss.item(),
        "exactly_equal": all(torch.equal(grads[k], p.grad) for k, p in ref.named_parameters() if p.grad is not None),
        "explain": pm.explain(), "comms": dtypes, "bytes": bytes_by,
        "local_bytes": sum(p.numel() * p.element_size() for p in pm.parameters()),
        "rank": dist.get_rank(),
    }


@pytest.mark.parametrize("shape,names", [((4,), ("fsdp",)), ((2, 2), ("dp", "tp")), ((2, 2), ("fsdp", "tp")),
                                         ((2, 2), ("pp", "tp")), ((2, 2), ("fsdp", "pp"))],
                         ids=["fsdp4", "dp2xtp2", "fsdp2xtp2", "pp2xtp2", "fsdp2xpp2"])
def test_bf16_policy_keeps_fp32_weights_and_computes_in_bf16(shape, names):
    results = rank_pool(4).run(_bf16_step, shape, names, timeout=300)
    # (a pipeline's automatic split of this 2-block model may leave a stage without parameters)
    assert set().union(*(r["param_dtypes"] for r in results)) == {"torch.float32"}
    for r in results:
        assert r["param_dtypes"] <= {"torch.float32"}, r["param_dtypes"]
        assert r["grad_dtypes"] == r["param_dtypes"], r["grad_dtypes"]
        worst = max(r["rel"].values())
        # within bf16 rounding of the float32 model's gradients, and not equal: the compute is bf16
        assert worst <= 5e-2, sorted(r["rel"].items(), key=lambda kv: -kv[1])[:5]
        assert not r["exactly_equal"]
        assert max(r["rel"].values()) > 1e-4, r["rel"]
        assert abs(r["loss"] - r["ref_loss"]) <= 2e-2 * abs(r["ref_loss"])
        assert "Mixed precision" in r["explain"] and "compute in bfloat16" in r["explain"], r["explain"]
        assert "gradients reduced in float32" in r["explain"]


def test_fsdp_gathers_bf16_and_reduce_scatters_fp32():
    """FSDP2's meaning: the shard is cast before the gather (half the bytes), the gradient is
    reduce-scattered in reduce_dtype."""
    plain = rank_pool(2).run(_bf16_step_nomp, (2,), ("fsdp",), timeout=300)
    mixed = rank_pool(2).run(_bf16_step, (2,), ("fsdp",), timeout=300)
    for p, m in zip(plain, mixed):
        assert m["bytes"]["forward all_gather fsdp"] * 2 == p["bytes"]["forward all_gather fsdp"], (p, m)
        assert m["bytes"]["backward reduce_scatter fsdp"] == p["bytes"]["backward reduce_scatter fsdp"], (p, m)
        assert m["local_bytes"] == p["local_bytes"]


def _bf16_step_nomp(shape, names) -> dict:
    mesh = torch.distributed.device_mesh.init_device_mesh("cpu", shape, mesh_dim_names=names)
    torch.manual_seed(0)
    model = tiny_gpt2(n_layer=2, n_embd=64)
    ids, target = torch.randint(0, 128, (4, 16)), torch.randint(0, 128, (4, 16))
    pm = fxpar.parallelize(model, mesh, example_inputs=(ids,))
    bytes_by = collections.Counter()
    with fxpar.count_comms() as comms:
        pm.step(ids, target=target, loss_fn=ce)
    for c in comms:
        bytes_by[f"{c.direction} {c.op} {c.mesh_dim}"] += c.nbytes
    return {"bytes": bytes_by, "local_bytes": sum(p.numel() * p.element_size() for p in pm.parameters())}


def _bf16_model_step(shape, names) -> dict:
    mesh = torch.distributed.device_mesh.init_device_mesh("cpu", shape, mesh_dim_names=names)
    torch.manual_seed(0)
    model = tiny_gpt2(n_layer=2, n_embd=64, dtype=torch.bfloat16)
    ids, target = torch.randint(0, 128, (4, 16)), torch.randint(0, 128, (4, 16))
    pm = fxpar.parallelize(model, mesh, example_inputs=(ids,), mp_policy=BF16)
    loss = pm.step(ids, target=target, loss_fn=ce)
    return {"param_dtypes": {str(p.dtype) for p in pm.parameters()}, "loss": loss.item(),
            "casts": sum(1 for n in pm.graph_module.graph.nodes if n.name.startswith("cast_"))}


def test_bf16_model_keeps_working_under_the_policy():
    results = rank_pool(2).run(_bf16_model_step, (2,), ("fsdp",), timeout=300)
    for r in results:
        assert r["param_dtypes"] == {"torch.bfloat16"}
        assert r["casts"] == 0  # nothing to cast
        assert 0 < r["loss"] < 10


# --------------------------------------------------------------------------- a gather under a tp f (q/k norms)


def _qk_norm_model():
    from tests.models import FusedChunkAttention

    torch.manual_seed(0)
    return torch.nn.Sequential(FusedChunkAttention(qk_norm="rms"))


QK_NORMS = ["0.q_norm.weight", "0.k_norm.weight"]
GATHER = torch.ops.fxpar.fsdp_all_gather.default
F_OP = torch.ops.fxpar.grad_all_reduce.default


def test_gather_under_a_tp_f_gathers_in_param_dtype_graph():
    """A q/k norm's weight is replicated on tp and read by head-sharded q and k: its gradient is partial on
    tp (an f over its FSDP gather). The f moves onto the shard (summed by the runtime after the reduce-scatter)
    and the cast after it folds into the gather: bf16 bytes, as every other gather (it moved float32)."""
    report = fxpar.plan(_qk_norm_model(), {"fsdp": 2, "tp": 2}, example_inputs=(torch.randn(4, 8, 32),),
                        mp_policy=BF16)
    gm = report.graph_module
    params = {str(n.target): n for n in gm.graph.nodes if n.op == "get_attr"}
    for fqn in QK_NORMS:
        node = params[fqn]
        (gather,) = [u for u in node.users if u.target is GATHER]
        assert gather.args[5] == torch.bfloat16 and gather.args[6] == torch.float32, (fqn, gather.args)
        assert not any(u.target in (F_OP, torch.ops.aten._to_copy.default) for u in gather.users), \
            (fqn, list(gather.users))
        assert get_info(node).grad_sync.dims == ("tp",), (fqn, get_info(node).grad_sync)
    assert all(g.args[5] == torch.bfloat16 for g in gm.graph.nodes if g.target is GATHER)


def _qk_norm_steps() -> tuple[dict, dict]:
    mesh = torch.distributed.device_mesh.init_device_mesh("cpu", (2, 2), mesh_dim_names=("fsdp", "tp"))
    return _qk_norm_step(mesh, False), _qk_norm_step(mesh, True)


def _qk_norm_step(mesh, fold: bool) -> dict:
    from fxpar.passes import bucket_grad_sync

    model = _qk_norm_model()
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(4, 8, 32, generator=g), torch.randn(4, 8, 32, generator=g)
    # the graph before: bucket_grad_sync left out keeps the f over the gather (and the cast after it), as
    # without sequence parallel it did for every tp f
    passes = None if fold else [p for p in fxpar.default_passes() if p is not bucket_grad_sync]
    pm = fxpar.parallelize(model, mesh, example_inputs=(x,), mp_policy=BF16, passes=passes)
    with fxpar.count_comms() as comms:
        out = pm(x)
        loss = mse(out.float(), t)
        loss.backward()
    gathered = [c for c in comms if c.op == "all_gather" and c.mesh_dim == "fsdp" and c.direction == "forward"]
    ref = copy.deepcopy(model).double()
    mse(ref(x.double()), t.double()).backward()
    return {"out": out.detach(), "loss": loss.item(), "grads": pm.full_grads(),
            "ref": {k: p.grad for k, p in ref.named_parameters()},
            "gather_bytes": sum(c.nbytes for c in gathered), "gather_dtypes": {c.dtype for c in gathered},
            "norm_numel": sum(p.numel() for k, p in model.named_parameters() if k in QK_NORMS)}


def test_gather_under_a_tp_f_halves_its_bytes_and_keeps_the_bf16_result():
    for rank, (b, a) in enumerate(rank_pool(4).run(_qk_norm_steps, timeout=180)):
        # the q/k norms' gathers move bf16 (half their bytes): every forward gather is bf16 now
        assert a["gather_dtypes"] == {torch.bfloat16}, a["gather_dtypes"]
        assert b["gather_dtypes"] == {torch.bfloat16, torch.float32}, b["gather_dtypes"]
        shard = a["norm_numel"] // 2  # each rank sends its fsdp shard of the q/k norms: 4 bytes each, now 2
        assert b["gather_bytes"] - a["gather_bytes"] == (4 - 2) * shard, (b["gather_bytes"], a["gather_bytes"])
        # a cast commutes with a gather: the same bf16 forward, bit for bit; the gradients' sums over tp and
        # fsdp of bf16-exact parts round once in either order: bit-equal too
        assert torch.equal(a["out"], b["out"]) and a["loss"] == b["loss"], rank
        for k, v in a["grads"].items():
            assert torch.equal(v, b["grads"][k]), (rank, k, (v - b["grads"][k]).abs().max().item())
            err = ((v.double() - a["ref"][k]).abs().max() / a["ref"][k].abs().max()).item()
            assert err < 5e-2, (rank, k, err)  # bf16 compute against the float64 model


def _qk_norm_float64() -> dict:
    mesh = torch.distributed.device_mesh.init_device_mesh("cpu", (2, 2), mesh_dim_names=("fsdp", "tp"))
    model = _qk_norm_model().double()
    g = torch.Generator().manual_seed(1)
    x, t = (torch.randn(4, 8, 32, generator=g, dtype=torch.float64) for _ in range(2))
    pm = fxpar.parallelize(model, mesh, example_inputs=(x,))
    report = fxpar.verify(model, pm, x, target=t, loss_fn=mse, rtol=1e-10, atol=1e-12)
    synced = {str(n.target): get_info(n).grad_sync.dims for n in pm.graph_module.graph.nodes
              if n.op == "get_attr" and get_info(n) is not None and get_info(n).grad_sync}
    return {"ok": report.ok, "report": str(report), "synced": synced}


def test_tp_sum_moved_onto_the_shard_is_exact_in_float64():
    """The q/k norms' tp sum, moved from the full gradient onto the shard after the reduce-scatter: every
    gradient equal to the unsplit model in float64."""
    for rank, r in enumerate(rank_pool(4).run(_qk_norm_float64, timeout=180)):
        assert r["ok"], f"rank {rank}:\n{r['report']}"
        assert {k: r["synced"].get(k) for k in QK_NORMS} == dict.fromkeys(QK_NORMS, ("tp",)), r["synced"]
