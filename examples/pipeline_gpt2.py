"""Demo: GPT-2 (transformers, a small config) pipelined over `pp` ranks, tensor parallel over `tp`,
optionally data parallel (`dp`) or fully sharded (`fsdp`) on top: a 3-D mesh.

fxpar captures the model, plans tensor parallelism automatically, cuts the
rewritten graph into pipeline stages balanced by its cost model, and trains it
with torch.distributed.pipelining's schedules. The result is verified against
the unsplit model (loss and every gradient, the tied embedding / lm_head
included), then a few SGD steps are compared parameter by parameter.

On one machine (CPU, gloo; ranks are started for you):

    python examples/pipeline_gpt2.py                          # pp=2
    python examples/pipeline_gpt2.py --pp 2 --tp 2 --schedule interleaved_1f1b
    python examples/pipeline_gpt2.py --dp 2 --pp 2 --tp 2          # 8 ranks: dp x pp x tp
    python examples/pipeline_gpt2.py --fsdp 2 --pp 2               # fsdp x pp

Under torchrun, the same script on one or several nodes (NCCL on GPUs, gloo on CPU):

    torchrun --standalone --nproc-per-node 4 examples/pipeline_gpt2.py --pp 2 --tp 2
    # two nodes with 4 GPUs each: run on every node
    torchrun --nnodes 2 --nproc-per-node 4 --rdzv-backend c10d --rdzv-endpoint $HEAD_NODE:29500 \\
        examples/pipeline_gpt2.py --pp 4 --tp 2 --schedule 1f1b
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh

import fxpar
from fxpar.testing import run_ranks


def cross_entropy(out, target: torch.Tensor) -> torch.Tensor:
    logits = out.logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))


def mesh_dims(dp: int, fsdp: int, pp: int, tp: int) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """The mesh: data dims (where > 1) outermost, then pp, then tp (innermost: the fastest links)."""
    dims = [(n, s) for n, s in (("dp", dp), ("fsdp", fsdp)) if s > 1] + [("pp", pp), ("tp", tp)]
    return tuple(s for _, s in dims), tuple(n for n, _ in dims)


def demo(pp: int, tp: int, schedule: str, microbatches: int, steps: int, layers: int, dp: int = 1,
         fsdp: int = 1) -> dict:
    import transformers

    device = "cuda" if torch.cuda.is_available() and dist.get_backend() == "nccl" else "cpu"
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", dist.get_rank() % torch.cuda.device_count())))
    shape, names = mesh_dims(dp, fsdp, pp, tp)
    mesh = init_device_mesh(device, shape, mesh_dim_names=names)
    torch.manual_seed(0)  # the same model and data on every rank
    config = transformers.GPT2Config(n_layer=layers, n_embd=64, n_head=4, vocab_size=256, n_positions=64,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False,
                                     bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config).to(device).eval()
    batch = 4 * microbatches * dp * fsdp  # every data rank gets 4 rows of each microbatch
    tokens = torch.randint(0, 256, (batch, 16), device=device)
    labels = torch.randint(0, 256, (batch, 16), device=device)

    plan = fxpar.Plan(schedule=schedule, microbatches=microbatches, auto_tp=True)
    pm = fxpar.parallelize(model, mesh, example_inputs=(tokens,), plan=plan)
    fxpar.check(pm)
    report = fxpar.verify(model, pm, tokens, target=labels, loss_fn=cross_entropy)

    # Train both for a few steps: SGD with momentum on this rank's stage shards vs. on the whole model.
    ref = copy.deepcopy(model)
    opt = torch.optim.SGD(pm.parameters(), lr=0.1, momentum=0.9)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        losses.append(pm.step(tokens, target=labels, loss_fn=cross_entropy).item())
        opt.step()
        ref_opt.zero_grad()
        cross_entropy(ref(tokens), labels).backward()
        ref_opt.step()
    full = pm.full_state_dict()
    drift = max(float((full[k] - p.detach()).abs().max()) for k, p in ref.named_parameters(remove_duplicate=False))
    return {
        "rank": dist.get_rank(),
        "explain": pm.explain() if dist.get_rank() == 0 else "",
        "report": str(report),
        "ok": report.ok,
        "losses": losses,
        "drift": drift,
        "stages": pm.split.local_stages,
        "local_params": sum(p.numel() for p in pm.parameters()),
        "full_params": sum(p.numel() for p in model.parameters()),
    }


def summarize(results: list[dict], steps: int) -> int:
    print(results[0]["explain"])
    print()
    print(results[0]["report"])
    ok = all(r["ok"] for r in results)
    for r in results:
        print(f"rank {r['rank']}: stages {list(r['stages'])}, {r['local_params']:,} of {r['full_params']:,} "
              f"parameters, losses {[round(v, 5) for v in r['losses']]}, max parameter drift after {steps} "
              f"SGD steps {r['drift']:.2e}")
    drift_ok = all(r["drift"] < 1e-4 for r in results)
    print()
    print("VERIFIED: loss, every gradient and the trained parameters match the unsplit model"
          if ok and drift_ok else "MISMATCH: see the report above")
    return 0 if ok and drift_ok else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pp", type=int, default=2, help="pipeline ranks (default 2)")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks per stage (default 1)")
    parser.add_argument("--dp", type=int, default=1, help="data-parallel replicas of the pipeline (default 1)")
    parser.add_argument("--fsdp", type=int, default=1, help="fully sharded data-parallel ranks (default 1)")
    parser.add_argument("--schedule", default="1f1b", help="gpipe, 1f1b, interleaved_1f1b, zbv, dualpipev, ...")
    parser.add_argument("--microbatches", type=int, default=4, help="microbatches per step (default 4)")
    parser.add_argument("--layers", type=int, default=4, help="GPT-2 blocks (default 4)")
    parser.add_argument("--steps", type=int, default=5, help="SGD steps to compare (default 5)")
    args = parser.parse_args()
    body = (args.pp, args.tp, args.schedule, args.microbatches, args.steps, args.layers, args.dp, args.fsdp)
    world = args.dp * args.fsdp * args.pp * args.tp

    if "RANK" in os.environ:  # under torchrun: this process is one rank
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        if dist.get_world_size() != world:
            raise SystemExit(f"torchrun started {dist.get_world_size()} ranks but --dp {args.dp} x --fsdp "
                             f"{args.fsdp} x --pp {args.pp} x --tp {args.tp} needs {world}")
        result = demo(*body)
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, result)
        code = summarize(gathered, args.steps) if dist.get_rank() == 0 else 0
        dist.destroy_process_group()
        return code
    return summarize(run_ranks(demo, world, *body, timeout=300.0), args.steps)


if __name__ == "__main__":
    sys.exit(main())
