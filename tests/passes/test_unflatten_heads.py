"""unflatten_heads: attention whose heads do not divide tp stores its weights by heads, cut unevenly."""

from __future__ import annotations

import pytest
import torch
from torch.distributed.tensor.placement_types import Shard

import fxpar
from fxpar.capture.export import capture_info
from fxpar.core.spec import get_spec

from pass_harness import calls, param, run_upto

transformers = pytest.importorskip("transformers")

aten = torch.ops.aten


def llama(heads: int) -> torch.nn.Module:
    T = transformers
    cfg = T.LlamaConfig(hidden_size=8 * heads, intermediate_size=32, num_hidden_layers=1, num_attention_heads=heads,
                        num_key_value_heads=heads, vocab_size=64, max_position_embeddings=32, use_cache=False,
                        bos_token_id=0, eos_token_id=0)
    return T.LlamaForCausalLM(cfg).double().eval()


def _ids():
    return torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))


def test_pass_stores_heads_as_a_dim_and_keeps_the_function():
    torch.manual_seed(0)
    model = llama(3)
    ids = _ids()
    gm = run_upto("unflatten_heads", model, (ids,), {"tp": 2})
    gm.graph.lint()
    # q, k, v and o become einsums on (H, D, C) / (C, H, D) weights; the projections' linears are gone
    assert len(calls(gm, aten.einsum.default)) == 4
    prefix = "model.layers.0.self_attn."
    for name, shape, dim in (("q_proj", (3, 8, 24), 0), ("k_proj", (3, 8, 24), 0), ("v_proj", (3, 8, 24), 0),
                             ("o_proj", (24, 3, 8), 1)):
        node = param(gm, prefix + name + ".weight")
        assert tuple(node.meta["val"].shape) == shape
        assert get_spec(node).placements == (Shard(dim),)
    assert capture_info(gm).param_shapes[prefix + "q_proj.weight"] == (24, 24)
    # the MLP's projections keep their linears
    assert len(calls(gm, aten.linear.default)) == 4  # gate, up, down, lm_head
    # one process: the rewritten graph computes the model's logits
    with torch.no_grad():
        got = gm(ids)
        want = model(ids).logits
    got = got.logits if hasattr(got, "logits") else got[0]
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)


def test_pass_leaves_divisible_heads_and_named_modules_alone():
    torch.manual_seed(0)
    ids = _ids()
    assert not calls(run_upto("unflatten_heads", llama(4), (ids,), {"tp": 2}), aten.einsum.default)
    plan = fxpar.Plan(tp={"model.layers.*.self_attn.*": "replicate"}, auto_tp=True)
    assert not calls(run_upto("unflatten_heads", llama(3), (ids,), {"tp": 2}, plan), aten.einsum.default)
