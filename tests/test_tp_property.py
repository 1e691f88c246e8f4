"""Property test: random MLP chains, plans and tp sizes equal the unsplit model in float64.

Hypothesis draws every example in this (driver) process and sends it to the
ranks, so all ranks run the same case and issue the same collectives.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st

import fxpar
from fxpar.testing import rank_pool
from models import Chain, mse

WIDTHS = st.sampled_from([4, 6, 8, 12, 16])
STYLES = st.sampled_from(["colwise", "rowwise", "replicate"])


@st.composite
def cases(draw):
    depth = draw(st.integers(1, 4))
    widths = draw(st.lists(WIDTHS, min_size=depth + 1, max_size=depth + 1))
    styles = draw(st.lists(STYLES, min_size=depth, max_size=depth))
    return {
        "widths": widths,
        "styles": styles,
        "bias": draw(st.booleans()),
        "act": draw(st.sampled_from(["relu", "gelu", "silu", "tanh"])),
        "batch": draw(st.sampled_from([(3,), (2, 3), (1, 2, 2)])),
        "tp": draw(st.sampled_from([2, 4])),
    }


def expected_error(case) -> bool:
    tp = case["tp"]
    for i, style in enumerate(case["styles"]):
        fan_in, fan_out = case["widths"][i], case["widths"][i + 1]
        if style == "colwise" and fan_out % tp or style == "rowwise" and fan_in % tp:
            return True
    return False


def _run(case) -> dict:
    mesh = torch.distributed.device_mesh.init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("tp",))
    torch.manual_seed(1234)
    model = Chain(case["widths"], bias=case["bias"], act=case["act"]).double()
    x = torch.randn(*case["batch"], case["widths"][0], dtype=torch.float64)
    target = torch.randn(*case["batch"], case["widths"][-1], dtype=torch.float64)
    plan = {f"layers.{i}": s for i, s in enumerate(case["styles"])}
    try:
        pm = fxpar.parallelize(model, mesh, example_inputs=(x,), plan=plan)
    except fxpar.ShardingError as e:
        return {"error": str(e)}
    report = fxpar.verify(model, pm, x, target=target, loss_fn=mse, rtol=1e-10)
    grads = [t.name for t in report.tensors if t.name.startswith("grad layers.")]
    return {"ok": report.ok, "report": str(report), "n": len(grads)}


@settings(max_examples=int(os.environ.get("FXPAR_PROPERTY_EXAMPLES", "40")))
@given(cases())
def test_random_mlp_chains_match_unsplit_model(case):
    results = rank_pool(case["tp"]).run(_run, case)
    if expected_error(case):
        for r in results:
            assert "error" in r and "does not divide by tp=" in r["error"], r
        return
    for rank, r in enumerate(results):
        assert "error" not in r, f"rank {rank}: unexpected {r}"
        assert r["ok"], f"rank {rank} case {case}:\n{r['report']}"
        assert r["n"] == len(case["styles"]) * (2 if case["bias"] else 1)  # every parameter gradient compared
