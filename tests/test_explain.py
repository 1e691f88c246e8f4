"""explain(): collectives per transformer block, for the example sizes or any other."""

from __future__ import annotations

import pytest
import torch

import fxpar

transformers = pytest.importorskip("transformers")


def test_per_block_collectives_for_given_batch_and_sequence(make_fake_mesh):
    mesh = make_fake_mesh((2,), ("tp",))
    T = transformers
    model = T.LlamaForCausalLM(T.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=4, vocab_size=128,
                                             max_position_embeddings=64, use_cache=False, bos_token_id=0,
                                             eos_token_id=0)).eval()
    pm = fxpar.parallelize(model, mesh, example_inputs=(torch.randint(0, 128, (2, 8)),))
    text = pm.explain()
    # 2 x 8 tokens x 32 hidden x 4 bytes = 2 KiB per all-reduce
    assert "  model.layers.0: bwd all_reduce x2 4.00 KiB; fwd all_reduce x2 4.00 KiB" in text
    assert "  model.layers.1: bwd all_reduce x2 4.00 KiB; fwd all_reduce x2 4.00 KiB" in text
    # the same compiled module, priced for 8 x 1024 tokens: 1 MiB per all-reduce
    big = pm.explain(torch.zeros(8, 1024, dtype=torch.long))
    assert "  model.layers.0: bwd all_reduce x2 2.00 MiB; fwd all_reduce x2 2.00 MiB" in big
    assert "Fallbacks (ops without a sharding rule, run replicated): 0" in big
