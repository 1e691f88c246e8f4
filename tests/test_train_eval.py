"""Issue 14.8: `pm.train()` / `pm.eval()` switch dropout and batch norm as on the original model.

Before: both raised the exported GraphModule's NotImplementedError. The graph holds the mode the
model was captured in; the other mode's graph is compiled on first use and shares the parameters
and buffers, so running statistics and gradients carry over. Checked in float64 on tp2 and dp2:
outputs, every gradient and BatchNorm's running statistics after training steps, then eval
outputs (which use those statistics), then training again.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

import fxpar
from fxpar.testing import rank_pool


class NormNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(8, 16)
        self.bn = nn.BatchNorm1d(16)
        self.drop = nn.Dropout(0.0)
        self.down = nn.Linear(16, 4)

    def forward(self, x):
        h = self.drop(torch.relu(self.bn(self.up(x))))
        if self.training:  # a Python branch on the mode: the other mode's graph must not bake it in
            h = h * 2.0
        return self.down(h)


def _mse(out, target):
    return ((out - target) ** 2).mean()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def _modes(dim: str) -> dict:
    mesh = torch.distributed.device_mesh.init_device_mesh("cpu", (2,), mesh_dim_names=(dim,))
    torch.manual_seed(0)
    model = NormNet().double()
    ref = copy.deepcopy(model)
    x, target = torch.randn(8, 8, dtype=torch.float64), torch.randn(8, 4, dtype=torch.float64)
    pm = fxpar.parallelize(model, mesh, example_inputs=(x,))
    worst = {}

    def train_step(tag: str) -> None:
        for p in pm.parameters():
            p.grad = None
        ref.zero_grad()
        loss = pm.step(x, target=target, loss_fn=_mse)
        ref_loss = _mse(ref(x), target)
        ref_loss.backward()
        worst[f"{tag} loss"] = _rel(loss, ref_loss.detach())
        grads, state = pm.full_grads(), pm.full_state_dict()
        # relative to the largest gradient: up.bias's is analytically zero (it precedes BatchNorm)
        scale = max(p.grad.abs().max().item() for p in ref.parameters())
        worst[f"{tag} grads"] = max((grads[k] - p.grad).abs().max().item() / scale
                                    for k, p in ref.named_parameters())
        worst[f"{tag} running stats"] = max(_rel(state[f"bn.{k}"].double(), getattr(ref.bn, k).double())
                                            for k in ("running_mean", "running_var", "num_batches_tracked"))

    train_step("train")
    pm.eval()
    ref.eval()
    assert not pm.training
    with torch.no_grad():
        worst["eval out"] = _rel(pm(x), ref(x))
    worst["eval out (grad)"] = _rel(pm(x).detach(), ref(x).detach())
    pm.train()
    ref.train()
    train_step("train again")
    assert model.training and all(m.training for m in model.modules())  # the user's model: untouched
    return worst


def test_train_eval_tp2_and_dp2():
    pool = rank_pool(2)
    for dim in ("tp", "dp"):
        for worst in pool.run(_modes, dim):
            bad = {k: v for k, v in worst.items() if v > 1e-10}
            assert not bad, (dim, worst)


def _eval_first() -> dict:
    mesh = torch.distributed.device_mesh.init_device_mesh("cpu", (2,), mesh_dim_names=("dp",))
    torch.manual_seed(0)
    model = NormNet().double()
    model.bn.running_mean.uniform_()
    model.eval()
    ref = copy.deepcopy(model)
    x = torch.randn(8, 8, dtype=torch.float64)
    pm = fxpar.parallelize(model, mesh, example_inputs=(x,))
    assert not pm.training
    out_eval = _rel(pm(x), ref(x))
    pm.train()
    ref.train()
    out_train = _rel(pm(x), ref(x))
    stats = _rel(pm.full_state_dict()["bn.running_mean"], ref.bn.running_mean)
    return {"eval": out_eval, "train": out_train, "stats": stats, "user model eval": not model.training}


def test_captured_in_eval_switches_to_train():
    for r in rank_pool(2).run(_eval_first):
        assert r["user model eval"]
        assert max(r["eval"], r["train"], r["stats"]) < 1e-10, r
