"""Precision warnings are aggregated: one per kind of narrowing cast, naming the count and the first few.

A bf16 mixed-precision model casts every weight down; a warning per parameter printed dozens of
lines per rank on examples/llama_from_meta.py. See fxpar/analysis/precision.py.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

import fxpar


class _ManyCasts(torch.nn.Module):
    """A float64 stack: 7 linears computed in bfloat16 and 4 routers computed in float32."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.bf16 = torch.nn.ModuleList(torch.nn.Linear(width, width, bias=False) for _ in range(7))
        self.fp32 = torch.nn.ModuleList(torch.nn.Linear(width, width, bias=False) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for lin in self.bf16:
            x = F.linear(x.bfloat16(), lin.weight.bfloat16()).double()
        for lin in self.fp32:
            x = F.linear(x.float(), lin.weight.float()).double()
        return x


def test_one_warning_per_kind_of_cast_names_the_count(make_fake_mesh, caplog):
    x = torch.randn(8, 8, dtype=torch.float64)
    with caplog.at_level(logging.DEBUG, logger="fxpar.analysis.precision"):
        fxpar.parallelize(_ManyCasts().double(), make_fake_mesh((2,), ("dp",)), example_inputs=(x,))
    records = [r for r in caplog.records if r.name == "fxpar.analysis.precision"]
    warnings = [r.getMessage() for r in records if r.levelno == logging.WARNING]
    assert len(warnings) == 2, warnings  # one per (float64 -> bfloat16), (float64 -> float32)
    bf16 = next(m for m in warnings if "to torch.bfloat16" in m)
    fp32 = next(m for m in warnings if "to torch.float32" in m)
    assert bf16.startswith("7 parameters cast from torch.float64 to torch.bfloat16 ('bf16.0.weight' at %")
    assert "'bf16.1.weight'" in bf16 and "'bf16.2.weight'" in bf16 and "'bf16.3.weight'" not in bf16
    assert "and 4 more" in bf16 and "in module '<root>'" in bf16 and "data-parallel shards" in bf16
    assert fp32.startswith("4 parameters cast from torch.float64 to torch.float32 ('fp32.0.weight' at %")
    assert "and 1 more" in fp32
    # every parameter is still listed, once, at DEBUG
    debug = [r.getMessage() for r in records if r.levelno == logging.DEBUG]
    assert len(debug) == 2
    assert all(f"bf16.{i}.weight" in " ".join(debug) for i in range(7))
    assert all(f"fp32.{i}.weight" in " ".join(debug) for i in range(4))
