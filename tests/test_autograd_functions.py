"""Custom autograd.Functions: their backward would be dropped by the capture, so they are refused with
the fix named; a torch.library.custom_op with register_autograd is kept whole (its own backward) and runs."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import fxpar
from fxpar.testing import rank_pool


class STE(torch.autograd.Function):
    """Round in the forward, identity gradient in the backward (not round's derivative, which is 0)."""

    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, g):
        return g


@torch.library.custom_op("fxpar_test::ste_round", mutates_args=())
def ste_round(x: torch.Tensor) -> torch.Tensor:
    return torch.round(x)


@ste_round.register_fake
def _(x):
    return torch.empty_like(x)


ste_round.register_autograd(lambda ctx, g: g)


class Quantized(nn.Module):
    def __init__(self, custom_op: bool = False) -> None:
        super().__init__()
        self.custom_op = custom_op
        self.up, self.down = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x):
        h = self.up(x)
        return self.down(ste_round(h) if self.custom_op else STE.apply(h))


def test_custom_autograd_function_is_refused_naming_it():
    with pytest.raises(fxpar.CaptureError, match=r"autograd.Function STE.*drops STE.backward.*custom_op"):
        fxpar.capture(Quantized(), (torch.randn(4, 8),))


def _run() -> dict:
    mesh = torch.distributed.device_mesh.init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))
    torch.manual_seed(0)
    model = Quantized(custom_op=True).double()
    x = torch.randn(4, 8, dtype=torch.double) * 3
    pm = fxpar.parallelize(model, mesh, example_inputs=(x,))
    report = fxpar.verify(model, pm, x, target=torch.zeros(4, 8, dtype=torch.double),
                          loss_fn=lambda out, t: ((out - t) ** 2).mean())
    return {"ok": report.ok, "report": str(report), "explain": pm.explain()}


def test_custom_op_with_its_own_backward_runs_exactly():
    for rank, r in enumerate(rank_pool(2).run(_run)):
        assert r["ok"], f"rank {rank}:\n{r['report']}"
        assert "fxpar_test.ste_round" in r["explain"]  # listed: it has no rule, it runs replicated
