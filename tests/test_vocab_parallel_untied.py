"""Untied token embeddings are vocab parallel by default, their lookup reduced right after it (issue 17.3).

Llama-style models (untied embed_tokens) at tp=2 hold half their parameters per
rank (0.7 with the embedding replicated), cost exactly one more forward
all-reduce than Megatron's two per block (none with sequence parallel: the
lookup is reduce-scattered into sequence shards), and equal one process in
float64 with every gradient, float64 norms that downcast to float32 included.
"""

from __future__ import annotations

import collections

import pytest
import torch
import torch.nn.functional as F

import fxpar
from fxpar.analysis.explain import param_memory
from fxpar.testing import SimWorld
from fxpar.testing.simulate import simulate_parallelize

from tests.models import TitanLlama

transformers = pytest.importorskip("transformers")

B, T, V, LAYERS = 4, 8, 256, 2


def ce(out, target):
    logits = out if isinstance(out, torch.Tensor) else out.logits
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1))


def _hf_llama():
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS,
                                   num_attention_heads=4, num_key_value_heads=4, vocab_size=V,
                                   max_position_embeddings=64, use_cache=False, bos_token_id=0, eos_token_id=0)
    return transformers.LlamaForCausalLM(cfg).double().eval()


MODELS = {"hf-llama": _hf_llama, "titan-llama": lambda: TitanLlama(vocab=V, n_layers=LAYERS).double()}
# torchtitan's rotary runs in float32 (xq.float()) even in a float64 model: a last-bit difference in a
# float64 row sum (rms_norm on a sequence shard reduces in another order) can round across a float32
# boundary there, so its gradients agree to float32's precision, not float64's.
RTOL = {"hf-llama": 1e-10, "titan-llama": 1e-6}


_SLOW = pytest.mark.slow  # transformers' Llama compiles for ~50 s here


@pytest.mark.parametrize("name, sp", [
    pytest.param("titan-llama", False, id="titan-tp"),
    pytest.param("titan-llama", True, id="titan-tp+sp", marks=_SLOW),
    pytest.param("hf-llama", False, id="hf-tp", marks=_SLOW),
    pytest.param("hf-llama", True, id="hf-tp+sp", marks=_SLOW),
])
def test_untied_embedding_is_vocab_parallel_exact_with_one_reduction(name, sp):
    torch.manual_seed(0)
    model = MODELS[name]()
    ids, target = torch.randint(0, V, (B, T)), torch.randint(0, V, (B, T))
    with SimWorld({"tp": 2}) as world:
        pms = simulate_parallelize(model, world, example_inputs=(ids,), loss_fn=ce, example_target=target,
                                   plan=fxpar.Plan(auto_tp=True, sequence_parallel=sp), check=True)
        with fxpar.count_comms() as records:
            results = world.run(lambda rank: (pms[rank].step(ids, target=target), pms[rank].full_grads()))
    ref = ce(model(ids), target)
    ref.backward()
    for loss, grads in results:
        torch.testing.assert_close(loss, ref.detach(), rtol=RTOL[name], atol=0)
        for fqn, g in grads.items():
            torch.testing.assert_close(g, model.get_parameter(fqn).grad, rtol=RTOL[name], atol=RTOL[name] * 1e-3,
                                       msg=fqn)
    full, local = param_memory(pms[0].graph_module)
    assert local / full < 0.51, local / full
    explain = pms[0].explain()
    embed = next(fqn for fqn, m in model.named_modules() if isinstance(m, torch.nn.Embedding))
    assert "rowwise" in next(line for line in explain.splitlines() if line.strip().startswith(embed + ":"))
    act = B * T * 32 * 8
    fwd = collections.Counter((r.op, r.nbytes) for r in records if r.direction == "forward" and r.nbytes >= act // 2)
    per_rank = {k: v // 2 for k, v in fwd.items()}
    if sp:  # the lookup reduce-scatters like every block output; the loss never gathers the logits
        assert per_rank == {("reduce_scatter", act): 2 * LAYERS + 1, ("all_gather", act // 2): 2 * LAYERS + 1}
    else:  # Megatron's two all-reduces per block and the embedding's one
        assert per_rank == {("all_reduce", act): 2 * LAYERS + 1}
