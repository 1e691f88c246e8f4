"""Issue 14.8: Hugging Face models with their default config (use_cache=True) capture.

Before: torch.export failed on the DynamicCache output ("Found DynamicCache in output, which is
not a known type"), so the README's dry-run snippet with a default GPT2Config failed. Capture
now binds use_cache=False when the forward takes it and the caller did not pass it, and says so
in explain() and the log.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn.functional as F

import fxpar
from fxpar.testing import rank_pool

transformers = pytest.importorskip("transformers")


def _default_gpt2(**kw):
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=128, n_positions=64, **kw)
    assert cfg.use_cache  # the default this test is about
    return transformers.GPT2LMHeadModel(cfg)


def test_dry_run_of_default_config_as_in_the_readme(caplog):
    with torch.device("meta"):
        model = _default_gpt2()
    ids = torch.zeros(4, 16, dtype=torch.long, device="meta")
    with caplog.at_level(logging.WARNING, logger="fxpar.capture.export"):
        report = fxpar.plan(model, mesh_shape={"dp": 2, "pp": 2, "tp": 2}, example_inputs=(ids,))
    text = report.explain()
    assert "use_cache=False" in text
    assert any("use_cache=False" in r.getMessage() for r in caplog.records)


def test_use_cache_given_by_the_caller_is_kept():
    model = _default_gpt2().eval()
    ids = torch.randint(0, 128, (2, 8))
    gm = fxpar.capture(model, (ids,), {"use_cache": False})
    assert gm.meta["fxpar"].notes == ()


def _ce(out, target):
    return F.cross_entropy(out.logits.reshape(-1, out.logits.size(-1)), target.reshape(-1))


def _tp2() -> dict:
    mesh = torch.distributed.device_mesh.init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))
    torch.manual_seed(0)
    model = _default_gpt2(attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0).double()
    ref = copy.deepcopy(model)
    ids, target = torch.randint(0, 128, (2, 8)), torch.randint(0, 128, (2, 8))
    pm = fxpar.parallelize(model, mesh, example_inputs=(ids,))
    out = pm(ids)
    loss = pm.step(ids, target=target, loss_fn=_ce)
    ref_loss = _ce(ref(ids), target)
    ref_loss.backward()
    grads = pm.full_grads()
    grad_err = max(((grads[k] - p.grad).abs().max() / p.grad.abs().max()).item() for k, p in ref.named_parameters())
    return {"out": (out.logits - ref(ids).logits).abs().max().item(), "loss": abs(loss.item() - ref_loss.item()),
            "grads": grad_err, "note": "use_cache=False" in pm.explain(), "past": out.past_key_values is None}


def test_default_config_trains_at_tp2():
    for r in rank_pool(2).run(_tp2):
        assert r["note"] and r["past"]
        assert max(r["out"], r["loss"], r["grads"]) < 1e-10, r
