"""Llama-3 on the meta device, for dry runs and the planner (no weights, no process group).

    fxpar plan --auto --world 64 --device h100 examples/llama_dryrun.py:llama3_8b
    fxpar plan --auto --world 512 --device h100 examples/llama_dryrun.py:llama3_70b
    fxpar explain examples/llama_dryrun.py:llama3_8b --mesh fsdp=8,tp=8

The configurations are Meta's published ones (Llama-3 8B: 32 layers, 4096 wide, 32 heads, 8 kv heads,
14336 MLP; 70B: 80 layers, 8192 wide, 64 heads, 8 kv heads, 28672 MLP; 128256 tokens), with
8,192-token sequences and one sequence per device (torchtitan's training setting: local batch 1).
"""

from __future__ import annotations

import torch

SEQ = 8192


def _llama(layers: int, dim: int, heads: int, mlp: int, batch: int):
    import transformers as T

    config = T.LlamaConfig(hidden_size=dim, intermediate_size=mlp, num_hidden_layers=layers, num_attention_heads=heads,
                           num_key_value_heads=8, vocab_size=128256, max_position_embeddings=SEQ, use_cache=False,
                           rope_theta=500000.0)
    with torch.device("meta"):
        model = T.LlamaForCausalLM(config).to(torch.bfloat16)  # trained in bf16, as torchtitan's runs
    return model, (torch.zeros(batch, SEQ, dtype=torch.long, device="meta"),)


def llama3_8b(batch: int = 64):
    """Llama-3 8B, a global batch of 64 sequences (64 devices x 1)."""
    return _llama(32, 4096, 32, 14336, batch)


def llama3_70b(batch: int = 512):
    """Llama-3 70B, a global batch of 512 sequences (512 devices x 1)."""
    return _llama(80, 8192, 64, 28672, batch)


if __name__ == "__main__":
    import fxpar

    model, args = llama3_8b()
    print(fxpar.autoplan(model, 64, example_inputs=args, device="h100").explain())
