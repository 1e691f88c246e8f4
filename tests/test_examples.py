"""Every example runs end to end and reports success."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_tp_mlp_demo_verifies():
    out = subprocess.run([sys.executable, str(ROOT / "examples/tp_mlp_demo.py"), "--tp", "2", "--steps", "2"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "VERIFIED" in out.stdout and "fwd all_reduce(tp, n=2)" in out.stdout


def test_gpt2_demo_verifies():
    out = subprocess.run([sys.executable, str(ROOT / "examples/gpt2_demo.py"), "--steps", "2"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "VERIFIED" in out.stdout and "Fallbacks (ops without a sharding rule, run replicated): 0" in out.stdout


import pytest  # noqa: E402  (for the slow mark below)


def test_custom_pass_example_verifies():
    out = subprocess.run([sys.executable, str(ROOT / "examples/custom_pass.py"), "--tp", "2"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "with keep_replicated: {'blocks.0.norm': 'replicate', 'blocks.0.up': 'replicate'" in out.stdout
    assert "pm.plan reproduces the graph without the pass: True" in out.stdout
    assert "VERIFIED" in out.stdout


@pytest.mark.slow
def test_gpt2_dryrun_example_round_trips_its_plan(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "examples/gpt2_dryrun.py"), "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "= 256 ranks" in out.stdout and "PLAN ROUND-TRIP OK" in out.stdout
    assert {p.name for p in tmp_path.iterdir()} == {"gpt2.plan.json", "memory.png", "schedule.png", "graph.svg"}


def test_custom_pass_unit_test_from_the_guide():
    """docs/custom_passes.md, section 5: the pass drops the pinned block's collectives, and pm.plan records it."""
    import importlib.util

    from fxpar.ops.collectives import COLLECTIVE_OPS

    import fxpar

    spec = importlib.util.spec_from_file_location("custom_pass_example", ROOT / "examples/custom_pass.py")
    example = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = example  # dataclasses look their module up there
    spec.loader.exec_module(example)
    model, (x,) = example.build()
    before = fxpar.plan(model, {"tp": 2}, example_inputs=(x,))
    after = fxpar.plan(model, {"tp": 2}, example_inputs=(x,), passes=example.passes_with_pin())
    count = lambda r: sum(n.target in COLLECTIVE_OPS for n in r.graph_module.graph.nodes)  # noqa: E731
    assert count(after) < count(before)
    assert str(after.plan.styles["blocks.0.up"]) == "replicate"
    with pytest.raises(fxpar.PlanError, match=r"\[keep_replicated\] 'blocks.9.\*' matches no module"):
        fxpar.plan(model, {"tp": 2}, example_inputs=(x,), passes=[*fxpar.default_passes()[:2],
                                                                  example.KeepReplicated(("blocks.9.*",)),
                                                                  *fxpar.default_passes()[2:]])


# Slow: a fresh interpreter and two fresh rank sets (about 20 s). The default run keeps the same path,
# GPT-2 on fsdp2 x pp2 with gpipe, exact over 20 steps: test_pipeline_data_parallel.py::
# test_gpt2_trains_20_steps_like_one_process[fsdp2xpp2-gpipe].
@pytest.mark.slow
def test_pipeline_example_with_fsdp_verifies():
    pytest.importorskip("transformers")
    out = subprocess.run([sys.executable, str(ROOT / "examples/pipeline_gpt2.py"), "--fsdp", "2", "--pp", "2",
                          "--layers", "2", "--steps", "2", "--schedule", "gpipe"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "VERIFIED" in out.stdout and "fsdp" in out.stdout


# Slow: a fresh interpreter and two fresh rank sets (about 20 s). The default run keeps the same path,
# GPT-2 saved on tp2 and resumed on pp2 with AdamW, equal to one process: test_checkpoint.py::
# test_resume_on_another_mesh_equals_one_process[pp2].
@pytest.mark.slow
def test_resume_example_equals_an_uninterrupted_run():
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "resume.py")], capture_output=True, text=True,
                          timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "OK: the resumed run equals the uninterrupted one" in done.stdout


@pytest.mark.slow
def test_llama_from_meta_example_verifies():
    """A Llama built on meta on fsdp2 x tp2: init_weights and load_hf equal the whole model, one checkpointed
    bf16 step's gradients within bf16 rounding of the whole model's, save_hf -> from_pretrained round-trips."""
    out = subprocess.run([sys.executable, str(ROOT / "examples/llama_from_meta.py")],
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "VERIFIED" in out.stdout and "holds 0.27" in out.stdout and "Activation checkpointing: full" in out.stdout
    assert "compute in bfloat16" in out.stdout
