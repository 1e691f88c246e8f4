"""Saved plans round-trip the styles passes record beyond colwise / rowwise / fused sections.

* fused MoE experts ('experts: ...', `ExpertsStyle`): placed by the mesh (ep by index, tp by feature)
  on reload, as in the automatic plan; `resolve_plan` used to raise PlanError on them;
* uneven attention heads ('colwise (uneven heads: ...)', `HeadsStyle`): cut by `unflatten_heads` on
  reload, so the same graph, the same collectives and the same explain lines;
* a Linear cut unevenly ('colwise (uneven: ...)'): the plain style, cut again by the pass.
"""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.nn.functional as F

import fxpar
from fxpar.analysis.plan_io import ExpertsStyle, HeadsStyle, parse_style
from fxpar.core.plan import TPStyle
from fxpar.core.stages import stage_info
from fxpar.testing import rank_pool

from tests.models import TitanMoEStack, mse

transformers = pytest.importorskip("transformers")

X = torch.randn(4, 4, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


def _codes(report) -> list[str]:
    gm = report.graph_module
    split = stage_info(gm)
    return [gm.code] + ([gm.get_submodule(f"stage_{k}").code for k in range(split.num_stages)] if split else [])


def _collectives(report) -> dict[str, int]:
    out: dict[str, int] = {}
    for node in report.graph_module.graph.nodes:
        name = getattr(node.target, "__name__", str(node.target))
        if node.op == "call_function" and any(k in name for k in ("all_reduce", "all_gather", "reduce_scatter",
                                                                   "all_to_all", "moe_experts")):
            out[name] = out.get(name, 0) + 1
    return out


def _reload(report, tmp_path, model, mesh, inputs):
    loaded = fxpar.load_plan(fxpar.save_plan(report.plan, tmp_path / "plan.json"), model=model)
    assert loaded == report.plan
    return loaded, fxpar.plan(model, mesh, example_inputs=inputs, plan=loaded)


def test_style_texts_parse():
    assert parse_style("experts: experts by index over ep (4 / 2)") == \
        (ExpertsStyle("replicate", "experts: experts by index over ep (4 / 2)"), None)
    assert parse_style("experts: each expert colwise (gate, up) and rowwise (down); not sharded on fsdp: x")[0] \
        == ExpertsStyle("replicate", "experts: each expert colwise (gate, up) and rowwise (down)")
    heads = parse_style("rowwise (uneven heads: 3 heads of 2+1 over tp=2)")[0]
    assert heads == HeadsStyle("rowwise", "uneven heads: 3 heads of 2+1 over tp=2")
    assert str(heads) == "rowwise (uneven heads: 3 heads of 2+1 over tp=2)"
    assert parse_style("colwise (uneven: 50 in chunks of 25 over tp=2)") == (TPStyle("colwise"), None)
    with pytest.raises(fxpar.PlanError, match="uneven heads apply"):
        HeadsStyle("replicate", "uneven heads: 3 heads of 2+1 over tp=2")


@pytest.mark.parametrize("mesh", [{"tp": 2}, {"ep": 2}, {"dp": 2, "ep": 2}, {"fsdp": 2, "tp": 2}])
def test_fused_experts_plan_round_trips(mesh, tmp_path):
    model = TitanMoEStack().double()
    first = fxpar.plan(model, mesh, example_inputs=(X,))
    assert all(isinstance(s, ExpertsStyle) for k, s in first.plan.tp if k.endswith("experts"))
    assert {k for k, s in first.plan.tp if isinstance(s, ExpertsStyle)} == {"moes.0.experts", "moes.1.experts"}
    loaded, again = _reload(first, tmp_path, model, mesh, (X,))
    assert _codes(again) == _codes(first) and again.plan == first.plan
    placements = lambda r: {n.target: (tuple(n.meta["val"].shape), str(n.meta["fxpar"].spec.placements))  # noqa: E731
                            for n in r.graph_module.graph.nodes if n.op == "get_attr" and "experts" in str(n.target)}
    assert placements(again) == placements(first)


def _run_saved(shape: tuple, names: tuple, path: str) -> dict:
    mesh = torch.distributed.device_mesh.init_device_mesh("cpu", shape, mesh_dim_names=names)
    torch.manual_seed(0)
    model = TitanMoEStack().double()
    y = torch.randn(4, 4, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    auto = fxpar.parallelize(model, mesh, example_inputs=(X,))
    fxpar.save_plan(auto.plan, path)
    saved = fxpar.parallelize(model, mesh, example_inputs=(X,), plan=fxpar.load_plan(path, model=model))
    report = fxpar.verify(model, saved, X, target=y, loss_fn=mse, rtol=1e-10, atol=1e-13)
    losses = [pm.step(X, target=y, loss_fn=mse) for pm in (auto, saved)]
    grads = [{n: p.grad for n, p in pm.named_parameters()} for pm in (auto, saved)]
    return {"ok": report.ok, "report": str(report), "same_plan": saved.plan == auto.plan,
            "shapes": [[tuple(p.shape) for p in pm.parameters()] for pm in (auto, saved)],
            "loss_equal": bool(torch.equal(torch.as_tensor(losses[0]), torch.as_tensor(losses[1]))),
            "grads_equal": grads[0].keys() == grads[1].keys() and all(
                torch.equal(grads[0][k], grads[1][k]) for k in grads[0])}


@pytest.mark.parametrize("shape,names", [((2,), ("tp",)),  # ep: the same saved-experts path, in the slow run
                                         pytest.param((2,), ("ep",), marks=pytest.mark.slow)])
def test_saved_experts_plan_runs_the_same_step(shape, names):
    with tempfile.TemporaryDirectory() as folder:
        for r in rank_pool(2).run(_run_saved, shape, names, os.path.join(folder, "plan.json")):
            assert r["ok"], r["report"]
            assert r["same_plan"] and r["shapes"][0] == r["shapes"][1]
            assert r["loss_equal"] and r["grads_equal"]


def _gpt2(heads: int) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=8 * heads, n_head=heads, vocab_size=64, n_positions=32,
                                  use_cache=False, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).double().eval()


@pytest.mark.parametrize("heads,tp,fsdp", [(3, 2, 1), pytest.param(12, 8, 1, marks=pytest.mark.slow),  # 8 ranks: slow
                                            (3, 2, 2)])
def test_uneven_heads_plan_round_trips(heads, tp, fsdp, tmp_path):
    model, ids = _gpt2(heads), torch.zeros(2, 8, dtype=torch.long)
    mesh = {"fsdp": fsdp, "tp": tp} if fsdp > 1 else {"tp": tp}
    first = fxpar.plan(model, mesh, example_inputs=(ids,))
    styles = dict(first.plan.tp)
    assert isinstance(styles["transformer.h.0.attn.c_attn"], HeadsStyle)
    assert isinstance(styles["transformer.h.1.attn.c_proj"], HeadsStyle)
    loaded, again = _reload(first, tmp_path, model, mesh, (ids,))
    assert again.plan == first.plan and _codes(again) == _codes(first)
    assert _collectives(again) == _collectives(first)
    lines = lambda r: [ln for ln in r.explain().splitlines() if "uneven heads" in ln]  # noqa: E731
    assert lines(first) and lines(again) == lines(first)
    c_attn = lambda r: dict(r.graph_module.named_parameters())["transformer.h.0.attn.c_attn.weight"].shape  # noqa: E731
    assert c_attn(again) == c_attn(first)
    assert c_attn(first)[1:] == (3, -(-heads // tp), 8) and c_attn(first)[0] == 8 * heads // fsdp


def test_an_explicit_plan_cuts_only_the_attention_it_names_by_heads():
    """A plan naming one block's attention with the heads style leaves the other block's replicated."""
    model, ids = _gpt2(3), torch.zeros(2, 8, dtype=torch.long)
    first = fxpar.plan(model, {"tp": 2}, example_inputs=(ids,))
    block0 = {k: s for k, s in first.plan.tp if k.startswith("transformer.h.0.attn")}
    report = fxpar.plan(model, {"tp": 2}, example_inputs=(ids,), plan=fxpar.Plan(block0))
    params = dict(report.graph_module.named_parameters())
    assert params["transformer.h.0.attn.c_attn.weight"].shape == (24, 3, 2, 8)
    assert params["transformer.h.1.attn.c_attn.weight"].shape == (24, 72)  # untouched: replicated
    assert {k: str(s) for k, s in report.plan.tp if k.startswith("transformer.h.0.attn")} == \
        {k: str(s) for k, s in block0.items()}


def test_uneven_heads_from_a_saved_plan_are_exact(tmp_path):
    from fxpar.testing import sim_world

    model = _gpt2(3)
    g = torch.Generator().manual_seed(1)
    ids, target = torch.randint(0, 64, (2, 8), generator=g), torch.randint(0, 64, (2, 8), generator=g)
    plan = fxpar.load_plan(fxpar.save_plan(fxpar.plan(model, {"tp": 2}, example_inputs=(ids,)).plan,
                                           tmp_path / "p.json"))
    world = sim_world({"tp": 2})
    pms = world.parallelize(model, example_inputs=(ids,), plan=plan)

    def ce(out, t):
        logits = out.logits if hasattr(out, "logits") else out[0]
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), t.reshape(-1))

    reports = world.run(lambda r: fxpar.verify(model, pms[r], ids, target=target, loss_fn=ce, rtol=1e-10,
                                               atol=1e-10))
    assert all(rep.ok for rep in reports), [str(r) for r in reports]
    assert [tuple(dict(pm.graph_module.named_parameters())["transformer.h.0.attn.c_attn.weight"].shape)
            for pm in pms] == [(24, 3, 2, 8), (24, 3, 1, 8)]
