"""Convolutional nets on real gloo ranks: a ResNet and a conv1d net at tp, dp, fsdp, dp x tp and fsdp x tp.

tp shards channels (conv output channels colwise, the next conv's input channels rowwise, the batch
norm between them per channel); dp keeps the batch sharded where batch_norm allows it (eval), and
gathers it for training-mode batch statistics. Outputs, every gradient, the input gradient and the
running statistics equal one process in float64.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

import fxpar
from fxpar.testing import rank_pool
from fxpar.core.spec import get_spec
from models import ConvNeXtBlock, ConvNet1d, MobileNetLike, ResNet, mse

MODELS = {
    # name: (factory, input shape, target shape)
    "resnet": (ResNet, (4, 3, 8, 8), (4, 10)),
    "conv1d": (ConvNet1d, (4, 4, 12), (4, 6)),
}


def _run(name: str, train: bool, dims: tuple[int, ...], names: tuple[str, ...]) -> dict:
    # dp / fsdp shard the batch of 4; training-mode batch norms gather it for global statistics
    factory, xs, ts = MODELS[name]
    mesh = torch.distributed.device_mesh.init_device_mesh("cpu", dims, mesh_dim_names=names)
    torch.manual_seed(0)
    model = factory().double().train(train)
    x, t = torch.randn(*xs, dtype=torch.double), torch.randn(*ts, dtype=torch.double)
    pm = fxpar.parallelize(model, mesh, example_inputs=(x,))
    fxpar.check(pm)
    ref = factory().double().train(train)
    ref.load_state_dict(model.state_dict())
    ref(x), ref(x)  # the running statistics after verify's two forwards of pm (outputs, then a step)
    report = fxpar.verify(model, pm, x, target=t, loss_fn=mse)
    full = pm.full_state_dict()
    stats = {k: v for k, v in ref.state_dict().items() if "running" in k or "num_batches" in k}
    stat_err = max(((full[k] - v).abs().max() / v.abs().max().clamp_min(1e-30)).item() for k, v in stats.items()) \
        if stats else 0.0
    ref.load_state_dict(model.state_dict())
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    mse(ref(xa), t).backward()
    with fxpar.count_comms() as comms:
        mse(pm(xb), t).backward()
    total = sum(p.numel() for p in model.parameters())
    local = sum(p.numel() for p in pm.parameters())
    return {"ok": report.ok, "report": str(report), "n": len(report.tensors),
            "input_grad_err": ((xb.grad - xa.grad).abs().max() / xa.grad.abs().max()).item(),
            "stat_err": stat_err, "n_stats": len(stats), "fraction": local / total,
            "fwd_all_reduce": sum(1 for c in comms if c.op == "all_reduce" and c.direction == "forward"),
            "all_reduce_bytes": {d: sum(c.nbytes for c in comms if c.op == "all_reduce" and c.direction == d)
                                 for d in ("forward", "backward")},
            "fallbacks": pm.explain().count("Fallbacks (ops without a sharding rule, run replicated): 0")}


MESHES = {"tp2": ((2,), ("tp",)), "dp2": ((2,), ("dp",)), "dp2xtp2": ((2, 2), ("dp", "tp")),
          "fsdp2": ((2,), ("fsdp",)), "fsdp2xtp2": ((2, 2), ("fsdp", "tp"))}
# parameters per rank at most, of the model: channels sharded by tp hold half of the 3x3 convs and the
# batch norms between them (the stem, shortcuts and the norms after row-parallel convs stay
# replicated); fsdp shards every parameter
MAX_FRACTION = {"tp2": 0.53, "dp2": 1.0, "dp2xtp2": 0.53, "fsdp2": 0.52, "fsdp2xtp2": 0.27}


@pytest.mark.parametrize("mesh", sorted(MESHES))
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_convnet_equals_one_process(name, train, mesh):
    dims, names = MESHES[mesh]
    results = rank_pool(math.prod(dims)).run(_run, name, train, dims, names)
    for rank, r in enumerate(results):
        assert r["ok"], f"rank {rank}:\n{r['report']}"
        assert r["input_grad_err"] <= 1e-10, f"rank {rank}: input gradient off by {r['input_grad_err']}"
        assert r["stat_err"] <= 1e-10, f"rank {rank}: running statistics off by {r['stat_err']}"
        assert r["fallbacks"] == 1, f"rank {rank}: ops ran replicated without a rule"
    r = results[0]
    if name == "resnet":
        assert r["n_stats"] == 3 * 10  # ten batch norms: mean, var, count
    assert r["fraction"] <= MAX_FRACTION[mesh], r["fraction"]


def test_resnet_tp_one_all_reduce_per_block():
    results = rank_pool(2).run(_run, "resnet", True, (2,), ("tp",))
    assert results[0]["fwd_all_reduce"] == 4  # one per basic block (its row-parallel conv2), nothing else
    # the analytical minimum of channel-parallel blocks, float64: forward, each block's output
    # (4, 8, 4, 4) x 2 and (4, 16, 2, 2) x 2; backward, each block's input gradient (4, 8, 4, 4) x 3
    # and (4, 16, 2, 2), and the colwise fc's input gradient (4, 16)
    assert results[0]["all_reduce_bytes"] == {"forward": (512 * 2 + 256 * 2) * 8,
                                              "backward": (512 * 3 + 256 + 64) * 8}


def _run_grouped(name: str, train: bool, plan) -> dict:
    mesh = torch.distributed.device_mesh.init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("tp",))
    torch.manual_seed(0)
    model = {"mobilenet": MobileNetLike, "convnext": ConvNeXtBlock}[name]().double().train(train)
    x = torch.randn(4, 8 if name == "convnext" else 3, 6, 6, dtype=torch.double)
    pm = fxpar.parallelize(model, mesh, example_inputs=(x,), plan=plan)
    fxpar.check(pm)
    t = torch.randn(*((4, 10) if name == "mobilenet" else x.shape), dtype=torch.double)  # no forward: BN stats
    report = fxpar.verify(model, pm, x, target=t, loss_fn=mse)
    groups = {str(n.target): get_spec(n).placements[0] for n in pm.graph_module.graph.nodes
              if n.op == "get_attr" and ("dw" in str(n.target)) and get_spec(n) is not None}
    local_groups = [n.args[6] for n in pm.graph_module.graph.nodes
                    if n.target == torch.ops.aten.conv2d.default and len(n.args) > 6 and n.args[6] > 1]
    return {"ok": report.ok, "report": str(report), "placements": {k: str(v) for k, v in groups.items()},
            "local_groups": local_groups,
            "fraction": sum(p.numel() for p in pm.parameters()) / sum(p.numel() for p in model.parameters())}


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_depthwise_and_grouped_convs_shard_by_groups_inside_a_pair(train):
    """MobileNet's inverted residuals at tp=2: the depthwise (32 groups) and grouped (4 groups) convs
    between the 1x1 expand (colwise) and project (rowwise) convs run on each rank's groups."""
    results = rank_pool(2).run(_run_grouped, "mobilenet", train, None)
    for rank, r in enumerate(results):
        assert r["ok"], f"rank {rank}:\n{r['report']}"
    r = results[0]
    assert r["placements"] == {"blocks.0.dw.weight": "S(0)", "blocks.1.dw.weight": "S(0)",
                               "blocks.1.dw.bias": "S(0)"}, r["placements"]
    assert r["local_groups"] == [16, 2]  # 32 / 2 depthwise, 4 / 2 grouped
    assert r["fraction"] <= 0.55, r["fraction"]


def test_convnext_depthwise_conv_colwise_by_plan():
    """A depthwise conv before a channels-last LayerNorm, sharded by the plan: its channels are
    gathered for the norm; exact in float64."""
    results = rank_pool(2).run(_run_grouped, "convnext", True, {"dwconv": "colwise", "pwconv1": "colwise",
                                                                "pwconv2": "rowwise"})
    for rank, r in enumerate(results):
        assert r["ok"], f"rank {rank}:\n{r['report']}"
    assert results[0]["placements"] == {"dwconv.weight": "S(0)", "dwconv.bias": "S(0)"}
    assert results[0]["local_groups"] == [4]
