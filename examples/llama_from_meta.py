"""Demo: a Llama too large for one rank, built on the meta device, never whole on any rank.

Each rank builds the model from its config on `meta` (no memory), `fxpar.parallelize`
allocates only its shards, and:

1. `pm.init_weights(seed)` initializes the shards as the whole model would be on one
   process after `torch.manual_seed(seed)` (checked against that model);
2. `fxpar.checkpoint.save_hf` writes a Hugging Face folder (rank 0, one tensor at a time),
   `load_hf` reads it back slice by slice after a different init (bit-equal again);
3. one training step with activation checkpointing (each block recomputed in the backward),
   gradients compared with the whole model's (float32; bf16 compute under a MixedPrecisionPolicy
   does not run on Llama yet: its rotary cos / sin keep their captured float32 cast);
4. the trained shards saved again and loaded by `from_pretrained`: equal to the parallel model.

    python examples/llama_from_meta.py                  # fsdp=2 x tp=2, 4 local ranks (gloo, CPU)
    python examples/llama_from_meta.py --mesh fsdp=2    # 2 ranks
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.nn.functional as F
import transformers
from torch.distributed.device_mesh import init_device_mesh

import fxpar
from fxpar.testing import run_ranks

SEED = 3


def config() -> transformers.LlamaConfig:
    return transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, vocab_size=128, max_position_embeddings=64,
                                    tie_word_embeddings=False, use_cache=False, attn_implementation="sdpa",
                                    bos_token_id=0, eos_token_id=0, pad_token_id=0)


def reference(seed: int) -> torch.nn.Module:
    """The whole model initialized on one process by its own init after manual_seed(seed), as the shards must be."""
    model = transformers.LlamaForCausalLM(config()).eval()
    for obj in [*model.modules(), *model.parameters()]:  # Hugging Face skips what it initialized once
        if getattr(obj, "_is_hf_initialized", False):
            del obj._is_hf_initialized
    torch.manual_seed(seed)
    model.init_weights()
    return model


def cross_entropy(out, target: torch.Tensor) -> torch.Tensor:
    logits = out.logits if hasattr(out, "logits") else out
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), target.reshape(-1))


def worst(full: dict, ref: torch.nn.Module) -> float:
    return max((full[k].double() - v.double()).abs().max().item() for k, v in ref.named_parameters())


def demo(mesh_shape: dict[str, int], folder: str) -> dict:
    mesh = init_device_mesh("cpu", tuple(mesh_shape.values()), mesh_dim_names=tuple(mesh_shape))
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config()).eval()
    g = torch.Generator().manual_seed(1)
    ids, target = torch.randint(0, 128, (4, 32), generator=g), torch.randint(0, 128, (4, 32), generator=g)
    pm = fxpar.parallelize(model, mesh, example_inputs=(ids,), activation_checkpointing="full")
    total = sum(p.numel() for p in model.parameters())
    local = sum(p.numel() for p in pm.parameters())

    pm.init_weights(seed=SEED)
    ref = reference(SEED)
    init_err = worst(pm.full_state_dict(), ref)

    src = os.path.join(folder, "init")
    fxpar.checkpoint.save_hf(pm, src)
    pm.init_weights(seed=SEED + 1)  # other values, then the folder's
    fxpar.checkpoint.load_hf(pm, src)
    load_err = worst(pm.full_state_dict(), ref)

    loss = pm.step(ids, target=target, loss_fn=cross_entropy)
    ref_loss = cross_entropy(ref(ids), target)
    ref_loss.backward()
    grads = pm.full_grads()
    grad_rel = max(((grads[k] - p.grad).norm() / p.grad.norm()).item() for k, p in ref.named_parameters())
    opt = torch.optim.AdamW(pm.parameters(), lr=1e-3)
    opt.step()

    dst = os.path.join(folder, "trained")
    fxpar.checkpoint.save_hf(pm, dst)
    dist.barrier()
    back = transformers.LlamaForCausalLM.from_pretrained(dst)
    save_err = worst(pm.full_state_dict(), back)
    return {"rank": dist.get_rank(), "local_fraction": local / total, "init": init_err, "load": load_err,
            "loss": loss.item(), "ref_loss": ref_loss.item(), "grad_rel": grad_rel, "save": save_err,
            "dtypes": {str(p.dtype) for p in pm.parameters()},
            "explain": pm.explain() if dist.get_rank() == 0 else ""}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mesh", default="fsdp=2,tp=2", help="mesh dims, e.g. fsdp=2,tp=2")
    args = parser.parse_args(argv)
    mesh_shape = {k: int(v) for k, v in (part.split("=") for part in args.mesh.split(","))}
    world = 1
    for v in mesh_shape.values():
        world *= v
    with tempfile.TemporaryDirectory() as folder:
        results = run_ranks(demo, world, mesh_shape, folder, timeout=600)
    r0 = results[0]
    print("\n".join(l for l in r0["explain"].splitlines() if l.startswith(("fxpar plan", "Activation",
                                                                              "Parameter memory", "  every rank",
                                                                              "    training step"))))
    ok = True
    for r in results:
        print(f"rank {r['rank']}: holds {r['local_fraction']:.3f} of the model; init vs one process {r['init']:.1e}, "
              f"load_hf {r['load']:.1e}, step loss {r['loss']:.6f} (whole model {r['ref_loss']:.6f}), "
              f"worst gradient rel {r['grad_rel']:.2e}, save_hf -> from_pretrained {r['save']:.1e}")
        ok &= (r["init"] == 0.0 and r["load"] == 0.0 and r["save"] == 0.0 and r["grad_rel"] < 1e-4
               and r["dtypes"] == {"torch.float32"} and abs(r["loss"] - r["ref_loss"]) < 1e-5 * r["ref_loss"])
    print("VERIFIED" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
