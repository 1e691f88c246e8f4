"""Train, stop, resume on another mesh: a run checkpointed with fxpar.checkpoint continues exactly.

A small GPT-2 trains a few AdamW steps tensor parallel (tp=2) and is saved with
its optimizer state and a step counter (fxpar.checkpoint.save, on
torch.distributed.checkpoint). The ranks exit, as a job would. A new job on
another mesh (by default a 2-stage pipeline) loads the checkpoint
(fxpar.checkpoint.load reshards it), trains the remaining steps, and the losses
and final weights are compared with one uninterrupted run of the unsplit model.

    python examples/resume.py                                  # tp=2, then pp=2
    python examples/resume.py --resume-mesh dp=2,tp=2          # then 4 ranks
    python examples/resume.py --save-mesh fsdp=2 --resume-mesh tp=2 --steps 8

Runs on CPU with gloo ranks of this machine (fxpar.testing.run_ranks); with
torchrun, call `first_job` / `second_job` in each process instead.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh

import fxpar
from fxpar.testing import run_ranks


def gpt2():
    import transformers as T

    return T.GPT2LMHeadModel(T.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=128, n_positions=64,
                                          use_cache=False, bos_token_id=0, eos_token_id=0)).eval()


def model_and_batches(steps: int):
    torch.manual_seed(0)  # the same model and data on every rank and in every job
    model = gpt2().double()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randint(0, 128, (4, 8), generator=g), torch.randint(0, 128, (4, 8), generator=g))
               for _ in range(steps)]
    return model, batches


def ce(out, target):
    logits = out if isinstance(out, torch.Tensor) else out.logits
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1))


def parse_mesh(text: str) -> dict[str, int]:
    return {name: int(size) for name, size in (part.split("=") for part in text.split(","))}


def build(mesh_sizes: dict[str, int], steps: int):
    mesh = init_device_mesh("cpu", tuple(mesh_sizes.values()), mesh_dim_names=tuple(mesh_sizes))
    model, batches = model_and_batches(steps)
    pm = fxpar.parallelize(model, mesh, example_inputs=(batches[0][0],))
    return pm, torch.optim.AdamW(pm.parameters(), lr=1e-2), batches


def train(pm, opt, batches) -> list[float]:
    losses = []
    for ids, target in batches:
        opt.zero_grad()
        losses.append(pm.step(ids, target=target, loss_fn=ce).item())
        opt.step()
    return losses


def first_job(mesh_sizes: dict[str, int], path: str, steps: int, stop_at: int) -> list[float]:
    pm, opt, batches = build(mesh_sizes, steps)
    losses = train(pm, opt, batches[:stop_at])
    fxpar.checkpoint.save(pm, path, optimizer=opt, extra={"step": stop_at})
    return losses


def second_job(mesh_sizes: dict[str, int], path: str, steps: int) -> dict:
    pm, opt, batches = build(mesh_sizes, steps)
    extra = fxpar.checkpoint.load(pm, path, optimizer=opt)
    losses = train(pm, opt, batches[extra["step"]:])
    full = pm.full_state_dict()
    return {"step": extra["step"], "losses": losses, "full": full if dist.get_rank() == 0 else None}


def uninterrupted(steps: int) -> tuple[list[float], dict[str, torch.Tensor]]:
    model, batches = model_and_batches(steps)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for ids, target in batches:
        opt.zero_grad()
        loss = ce(model(ids), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, model.state_dict()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--save-mesh", default="tp=2", help="mesh of the first job, e.g. tp=2 or dp=2,tp=2")
    parser.add_argument("--resume-mesh", default="pp=2", help="mesh of the second job")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--stop-at", type=int, default=None, help="step the first job stops after (default: half)")
    args = parser.parse_args()
    save_mesh, resume_mesh = parse_mesh(args.save_mesh), parse_mesh(args.resume_mesh)
    stop_at = args.stop_at if args.stop_at is not None else args.steps // 2
    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/checkpoint"
        first = run_ranks(first_job, math.prod(save_mesh.values()), save_mesh, path, args.steps, stop_at,
                          timeout=300)[0]
        print(f"job 1 on {args.save_mesh}: steps 1..{stop_at}, losses {[f'{x:.6f}' for x in first]}; saved")
        second = run_ranks(second_job, math.prod(resume_mesh.values()), resume_mesh, path, args.steps,
                           timeout=300)[0]
        print(f"job 2 on {args.resume_mesh}: resumed at step {second['step']}, "
              f"losses {[f'{x:.6f}' for x in second['losses']]}")
    ref_losses, ref_state = uninterrupted(args.steps)
    losses = first + second["losses"]
    loss_err = max(abs(a - b) / abs(b) for a, b in zip(losses, ref_losses))
    weight_err = max(((second["full"][k] - v).abs().max() / v.abs().max().clamp_min(1e-30)).item()
                     for k, v in ref_state.items())
    print(f"against one uninterrupted run of {args.steps} steps: losses rel err {loss_err:.2e}, "
          f"weights rel err {weight_err:.2e}")
    ok = loss_err <= 1e-9 and weight_err <= 1e-9
    print("OK: the resumed run equals the uninterrupted one" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
