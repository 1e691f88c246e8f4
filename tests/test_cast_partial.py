"""A cast that narrows the dtype must not see partial sums: rounding each partial and adding is not rounding the sum.

Found on a float64 Llama with tied embeddings at tp=2: the vocab-parallel embedding's Partial output reached
RMSNorm's `.to(float32)` and the logits were off by 7e-8 (float32 rounding) without a word.
"""

from __future__ import annotations

import torch

import fxpar
from fxpar.testing import rank_pool


def _tied_llama_error():
    import transformers as T

    torch.manual_seed(0)
    config = T.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                           num_key_value_heads=4, vocab_size=96, max_position_embeddings=64, use_cache=False,
                           tie_word_embeddings=True, bos_token_id=0, eos_token_id=0)
    model = T.LlamaForCausalLM(config).double().eval()
    mesh = torch.distributed.device_mesh.init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))
    ids, target = torch.randint(0, 96, (2, 8)), torch.randint(0, 96, (2, 8))
    pm = fxpar.parallelize(model, mesh, example_inputs=(ids,))

    def ce(out, t):
        return torch.nn.functional.cross_entropy(out.logits.reshape(-1, 96), t.reshape(-1))

    report = fxpar.verify(model, pm, ids, target=target, loss_fn=ce, rtol=1e-12, atol=1e-12)
    return report.ok, max(t.max_rel for t in report.tensors)


def test_tied_llama_float64_is_exact_at_tp2():
    for ok, worst in rank_pool(2).run(_tied_llama_error):
        assert ok and worst < 1e-12, worst
