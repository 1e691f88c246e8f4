"""Demo: a Llama too large for one rank, built on the meta device, never whole on any rank.

Each rank builds the model from its config on `meta` (no memory), `fxpar.parallelize`
allocates only its shards, and:

1. `pm.init_weights(seed)` initializes the shards as the whole model would be on one
   process after `torch.manual_seed(seed)` (checked against that model);
2. `fxpar.checkpoint.save_hf` writes a Hugging Face folder (rank 0, one tensor at a time),
   `load_hf` reads it back slice by slice after a different init (bit-equal again);
3. one training step in bf16 (torch's `MixedPrecisionPolicy(param_dtype=bfloat16,
   reduce_dtype=float32)`, FSDP2's meaning: float32 shards, gradients and AdamW state, compute in
   bfloat16) with activation checkpointing (each block recomputed in the backward); its loss and
   gradients compared with the whole model run as FSDP2 runs it eagerly (parameters cast to
   bfloat16; the model's float32 norm statistics and rotary table stay float32) and with the whole
   float32 model (within bf16 rounding, and not equal: the compute really is bf16);
4. the trained shards saved again and loaded by `from_pretrained`: equal to the parallel model.

    python examples/llama_from_meta.py                  # fsdp=2 x tp=2, 4 local ranks (gloo, CPU)
    python examples/llama_from_meta.py --mesh fsdp=2    # 2 ranks
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.nn.functional as F
import transformers
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy

import fxpar
from fxpar.testing import run_ranks

SEED = 3
BF16 = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


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


def eager_bf16(model: torch.nn.Module) -> torch.nn.Module:
    """The whole model as FSDP2 computes it under BF16 on one process: parameters cast to bfloat16
    (buffers not), the module run eagerly; its gradients are the bfloat16 ones FSDP2 reduces."""
    model = copy.deepcopy(model)
    for p in model.parameters():
        p.data = p.data.to(BF16.param_dtype)
    return model


def rel(grads: dict, ref: torch.nn.Module) -> float:
    """The worst relative (Frobenius) difference of a parameter's gradient."""
    return max(((grads[k] - p.grad.float()).norm() / p.grad.float().norm()).item() for k, p in ref.named_parameters())


def worst(full: dict, ref: torch.nn.Module) -> float:
    return max((full[k].double() - v.double()).abs().max().item() for k, v in ref.named_parameters())


def demo(mesh_shape: dict[str, int], folder: str) -> dict:
    mesh = init_device_mesh("cpu", tuple(mesh_shape.values()), mesh_dim_names=tuple(mesh_shape))
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config()).eval()
    g = torch.Generator().manual_seed(1)
    ids, target = torch.randint(0, 128, (4, 32), generator=g), torch.randint(0, 128, (4, 32), generator=g)
    pm = fxpar.parallelize(model, mesh, example_inputs=(ids,), mp_policy=BF16, activation_checkpointing="full")
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
    half = eager_bf16(ref)
    half_loss = cross_entropy(half(ids), target)
    half_loss.backward()
    ref_loss = cross_entropy(ref(ids), target)
    ref_loss.backward()
    grads = pm.full_grads()
    grad_dtypes = {str(p.grad.dtype) for p in pm.parameters() if p.grad is not None}
    opt = torch.optim.AdamW(pm.parameters(), lr=1e-3)
    opt.step()

    dst = os.path.join(folder, "trained")
    fxpar.checkpoint.save_hf(pm, dst)
    dist.barrier()
    back = transformers.LlamaForCausalLM.from_pretrained(dst)
    save_err = worst(pm.full_state_dict(), back)
    return {"rank": dist.get_rank(), "local_fraction": local / total, "init": init_err, "load": load_err,
            "loss": loss.item(), "ref_loss": ref_loss.item(), "bf16_loss": half_loss.item(),
            "grad_rel": rel(grads, ref), "grad_rel_bf16": rel(grads, half), "bf16_vs_fp32": rel(
                {k: p.grad.float() for k, p in half.named_parameters()}, ref), "save": save_err,
            "dtypes": {str(p.dtype) for p in pm.parameters()}, "grad_dtypes": grad_dtypes,
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
    print("\n".join(l for l in r0["explain"].splitlines() if l.startswith(("fxpar plan", "Activation", "Mixed",
                                                                              "Parameter memory", "  every rank",
                                                                              "    training step"))))
    ok = True
    for r in results:
        print(f"rank {r['rank']}: holds {r['local_fraction']:.3f} of the model; init vs one process {r['init']:.1e}, "
              f"load_hf {r['load']:.1e}, bf16 step loss {r['loss']:.6f} (whole model: FSDP2-style bf16 "
              f"{r['bf16_loss']:.6f}, float32 {r['ref_loss']:.6f}), worst gradient rel vs bf16 "
              f"{r['grad_rel_bf16']:.2e}, vs float32 {r['grad_rel']:.2e} (bf16 vs float32 {r['bf16_vs_fp32']:.2e}), "
              f"save_hf -> from_pretrained {r['save']:.1e}")
        # bf16 bounds: the gradients within bf16 rounding of both references (2^-8 = 3.9e-3 per rounding,
        # accumulated over a few roundings, and the batch split's partial sums), not equal to float32's;
        # the loss nearer the bf16 reference than bf16 is to float32.
        ok &= (r["init"] == 0.0 and r["load"] == 0.0 and r["save"] == 0.0
               and r["dtypes"] == r["grad_dtypes"] == {"torch.float32"}
               and 1e-4 < r["grad_rel"] <= 5e-2 and r["grad_rel_bf16"] <= 2.5e-2
               and abs(r["loss"] - r["bf16_loss"]) <= 0.25 * abs(r["bf16_loss"] - r["ref_loss"]))
    print("VERIFIED" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
