"""Plans as data: pm.plan is the resolved plan, saved as JSON, loaded back into the same graph, refused on change."""

from __future__ import annotations

import json
import logging

import pytest
import torch
import torch.nn as nn

import fxpar
from fxpar.core.stages import stage_info
from fxpar.core.plan import TPStyle
from fxpar.analysis.plan_io import FORMAT, ModelFingerprint, ResolvedPlan, SectionedStyle, parse_style

from tests.models import tiny_gpt2

transformers = pytest.importorskip("transformers")


def gpt2(n_layer: int = 2, n_embd: int = 32, device: str = "cpu") -> nn.Module:
    return tiny_gpt2(n_layer, n_embd, device=device)


IDS = torch.zeros(8, 8, dtype=torch.long)
X = torch.randn(4, 16)


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 16))


def codes(report) -> list[str]:
    gm = report.graph_module
    split = stage_info(gm)
    return [gm.code] + ([gm.get_submodule(f"stage_{k}").code for k in range(split.num_stages)] if split else [])


@pytest.fixture(scope="module")
def meta_gpt2():
    return gpt2(device="meta")


_DRY: dict = {}


def dry(model: nn.Module, mesh: dict):
    """One dry run per model and mesh for the whole module (they are deterministic)."""
    key = (id(model), tuple(mesh.items()))
    if key not in _DRY:
        _DRY[key] = fxpar.plan(model, mesh, example_inputs=(IDS,))
    return _DRY[key]


@pytest.mark.parametrize("mesh", [{"tp": 2}, {"pp": 2, "tp": 2}])
def test_saved_plan_compiles_to_the_identical_graph(meta_gpt2, mesh, tmp_path):
    """GPT-2: fused qkv (strided shards), tied embeddings, the balancer's pipeline cuts."""
    first = dry(meta_gpt2, mesh)
    path = fxpar.save_plan(first.plan, tmp_path / "plan.json")
    loaded = fxpar.load_plan(path, model=meta_gpt2)
    assert loaded == first.plan
    again = fxpar.plan(meta_gpt2, mesh, example_inputs=(IDS,), plan=loaded)
    assert codes(again) == codes(first)
    assert again.plan == first.plan  # and it resolves to itself


def test_saved_fsdp_plan_compiles_to_the_identical_graph(tmp_path):
    model, mesh = mlp(), {"fsdp": 2, "tp": 2}
    first = fxpar.plan(model, mesh, example_inputs=(X,))
    again = fxpar.plan(model, mesh, example_inputs=(X,),
                       plan=fxpar.load_plan(fxpar.save_plan(first, tmp_path / "p.json")))
    assert codes(again) == codes(first)


def test_resolved_plan_names_every_automatic_choice(meta_gpt2):
    plan = dry(meta_gpt2, {"pp": 2, "tp": 2}).plan
    styles = {k: str(v) for k, v in plan.tp}
    assert styles["transformer.h.0.attn.c_attn"] == "colwise (fused x3)"
    assert isinstance(plan.styles["transformer.h.0.attn.c_attn"], SectionedStyle)
    assert styles["transformer.h.1.mlp.c_proj"] == "rowwise" and styles["lm_head"] == "colwise"
    assert plan.auto_tp is False and plan.mesh == (("pp", 2), ("tp", 2))
    assert plan.pp == ("transformer.h.1",) and plan.schedule == "1f1b" and plan.microbatches == 2
    assert plan.model.model_class == "GPT2LMHeadModel"


def test_pm_plan_of_a_real_run_is_resolved(make_fake_mesh):
    model = mlp()
    pm = fxpar.parallelize(model, make_fake_mesh((2,), ("tp",)), example_inputs=(X,))
    assert isinstance(pm.plan, ResolvedPlan) and pm.requested_plan.auto_tp
    assert {k: str(v) for k, v in pm.plan.tp} == {"0": "colwise", "2": "rowwise"}
    assert pm.plan == fxpar.plan(model, {"tp": 2}, example_inputs=(X,)).plan


def test_json_is_diffable_and_round_trips(meta_gpt2):
    plan = dry(meta_gpt2, {"tp": 2}).plan
    text = plan.to_json()
    data = json.loads(text)
    assert data["format"] == FORMAT and list(data)[:4] == ["format", "fxpar_version", "mesh", "tp"]
    assert '    "transformer.h.0.attn.c_attn": "colwise (fused x3)",\n' in text  # one entry per line
    assert data["model"]["tensors"]["transformer.wte.weight"] == "128x32"
    assert ResolvedPlan.from_json(text) == plan
    # Changing one style changes one line.
    edited = ResolvedPlan.from_json(text.replace('"transformer.h.1.mlp.c_fc": "colwise"',
                                                 '"transformer.h.1.mlp.c_fc": "replicate"', 1))
    assert [k for (k, a), (_, b) in zip(plan.tp, edited.tp) if a != b] == ["transformer.h.1.mlp.c_fc"]


def test_changed_model_structure_is_refused_listing_the_changes(meta_gpt2, tmp_path):
    path = fxpar.save_plan(dry(meta_gpt2, {"tp": 2}), tmp_path / "p.json")
    other = gpt2(n_layer=3, n_embd=64, device="meta")
    with pytest.raises(fxpar.PlanError) as e:
        fxpar.plan(other, {"tp": 2}, example_inputs=(IDS,), plan=fxpar.load_plan(path))
    text = str(e.value)
    assert "structure differs" in text and "transformer.wte.weight: shape 128x32 -> 128x64" in text
    assert "(41 changes)" in text and "new transformer.h.2.ln_1.weight 64" in text
    assert "... and 25 more like it" in text and "... and 8 more like it" in text
    assert "plan this model again" in text
    with pytest.raises(fxpar.PlanError, match="structure differs"):
        fxpar.load_plan(path, model=other)  # refused at load when the model is given


def test_other_mesh_is_refused_unless_asked(tmp_path):
    model = mlp()
    path = fxpar.save_plan(fxpar.plan(model, {"tp": 2}, example_inputs=(X,)), tmp_path / "p.json")
    with pytest.raises(fxpar.PlanError, match=r"made for mesh \(tp=2\) but the mesh is \(tp=4\)"):
        fxpar.plan(model, {"tp": 4}, example_inputs=(X,), plan=fxpar.load_plan(path))
    report = fxpar.plan(model, {"dp": 2, "tp": 4}, example_inputs=(X,), plan=fxpar.load_plan(path, any_mesh=True))
    assert str(report.plan.styles["0"]) == "colwise" and report.plan.mesh == (("dp", 2), ("tp", 4))
    # Size-1 dims do not count as a change of mesh.
    fxpar.plan(model, {"dp": 1, "tp": 2}, example_inputs=(X,), plan=fxpar.load_plan(path))


def test_other_fxpar_version_is_logged_not_refused(tmp_path, caplog):
    model = mlp()
    path = fxpar.save_plan(fxpar.plan(model, {"tp": 2}, example_inputs=(X,)), tmp_path / "p.json")
    data = json.loads(path.read_text())
    data["model"]["fxpar_version"] = "0.0.1"
    path.write_text(json.dumps(data))
    with caplog.at_level(logging.WARNING, logger="fxpar.analysis.plan_io"):
        fxpar.plan(model, {"tp": 2}, example_inputs=(X,), plan=fxpar.load_plan(path))
    assert "plan saved by fxpar 0.0.1" in caplog.text


@pytest.mark.parametrize("edit, match", [
    (lambda d: d.update(format="other/1"), "not a saved fxpar plan"),
    (lambda d: d.update(extra=1), r"unknown keys \['extra'\]"),
    (lambda d: d["tp"].update({"lm_head": "diagonal"}), "'lm_head': 'diagonal' is not a tensor-parallel style"),
    (lambda d: d["tp"].update({"lm_head": "rowwise (fused x3)"}), "fused sections apply to 'colwise'"),
    (lambda d: d["model"]["tensors"].update({"lm_head.weight": "1x1"}), "digest does not match"),
    (lambda d: d.update(mesh={"tp": 0}), "sizes are positive ints"),
    (lambda d: d.update(pp=0), "a stage count is a positive int"),
])
def test_malformed_plans_are_plan_errors(meta_gpt2, edit, match):
    data = dry(meta_gpt2, {"tp": 2}).plan.to_dict()
    edit(data)
    with pytest.raises(fxpar.PlanError, match=match):
        ResolvedPlan.from_dict(data)


def test_unreadable_files_are_plan_errors(tmp_path):
    with pytest.raises(fxpar.PlanError, match="cannot read plan file"):
        fxpar.load_plan(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(fxpar.PlanError, match="not valid JSON"):
        fxpar.load_plan(tmp_path / "bad.json")


def test_plain_plans_save_and_load(tmp_path):
    plan = fxpar.Plan({"blocks.*.up": "colwise"}, pp=2, schedule="gpipe", auto_tp=True)
    loaded = fxpar.load_plan(fxpar.save_plan(plan, tmp_path / "p.json"))
    assert loaded.tp == plan.tp and loaded.pp == 2 and loaded.schedule == "gpipe" and loaded.auto_tp
    assert loaded.model is None and loaded.mesh == ()


def test_styles_parse_from_what_passes_record():
    assert parse_style("colwise") == (TPStyle("colwise"), None)
    assert parse_style("colwise (fused x3)") == (SectionedStyle("colwise", 3), None)
    assert parse_style("replicate (not sharded: 12 heads do not divide by tp=8)") == \
        (TPStyle("replicate"), "12 heads do not divide by tp=8")
    assert parse_style("rowwise; not sharded on fsdp: dim 0 carries fused sections")[0] == TPStyle("rowwise")
    with pytest.raises(fxpar.PlanError, match="fused sections"):
        SectionedStyle("colwise", 1)


def test_fingerprint_reads_no_values_and_ignores_device_and_dtype():
    a = ModelFingerprint.of(gpt2(device="meta"))
    b = ModelFingerprint.of(gpt2().double())
    assert a.digest == b.digest and not a.differences(b)
