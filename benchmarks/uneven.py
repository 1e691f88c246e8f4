"""Uneven shards (issue 15.6): a GPT-2 whose vocab (50257) does not divide the mesh, before and after.

    PYTHONPATH=/work/main python -m benchmarks.uneven       # before: fsdp keeps wte whole, tp refuses the head
    PYTHONPATH=. python -m benchmarks.uneven                # after: both shard it (torch.chunk's rows, padded)

Per case, on gloo CPU ranks in float64: parameter bytes per rank (the most any rank holds, from the
tensors), the fraction of the model that is, bytes each rank sends into collectives per training step
(fxpar.ops.collectives.count_comms), the median step time over a few steps (a shared 2-core machine:
a rough figure), and the worst relative gradient error against one process.

Measured 2026-12-05 on this 2-core CPU machine (gloo, float64, batch 4 x 16; the "before" run is this
file copied out of the tree, `PYTHONPATH=/work/main python /tmp/unev_bench.py`):

    case               before (main)                               after (this branch)
    fsdp4              49.28 MiB / rank (0.988 of the model):      12.47 MiB / rank (0.250)
                       wte and lm_head (50257 rows) replicated,    every parameter sharded, 12565 rows of
                       50.24 MiB of collectives, 1192 ms / step    the vocab per rank, 68.65 MiB, 1838 ms
    tp2-head-colwise   refused: ShardingError (50257 does not      37.60 MiB / rank (0.754), 12.30 MiB,
                       divide by tp=2)                             941 ms; the head's 25129 + 25128 rows
    grad rel err       7.1e-16                                     7.1e-16 (fsdp4), 1.3e-14 (tp2)
"""

from __future__ import annotations

import copy
import statistics
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

CASES = {
    "fsdp4": ((4,), ("fsdp",), None),
    "tp2-head-colwise": ((2,), ("tp",), {"lm_head": "colwise"}),
}


def _gpt2():
    import transformers

    cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=50257, n_positions=64, use_cache=False,
                                  tie_word_embeddings=False, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg).double().eval()


def _ce(out, target):
    logits = out.logits if hasattr(out, "logits") else out
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1))


def _case(shape, names, plan, steps: int) -> dict:
    import fxpar
    from fxpar.ops.collectives import count_comms

    mesh = torch.distributed.device_mesh.init_device_mesh("cpu", shape, mesh_dim_names=names)
    model = _gpt2()
    ref = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    ids, target = torch.randint(0, 50257, (4, 16), generator=g), torch.randint(0, 50257, (4, 16), generator=g)
    try:
        pm = fxpar.parallelize(model, mesh, example_inputs=(ids,), plan=plan)
    except fxpar.FxparError as e:
        return {"refused": f"{type(e).__name__}: {str(e)[:160]}"}
    local = sum(p.numel() * p.element_size() for p in pm.parameters())
    total = sum(p.numel() * p.element_size() for p in ref.parameters())
    times = []
    for i in range(steps):
        for p in pm.parameters():
            p.grad = None
        dist.barrier()
        t0 = time.perf_counter()
        with count_comms() as records:
            pm.step(ids, target=target, loss_fn=_ce)
        times.append(time.perf_counter() - t0)
    _ce(ref(ids), target).backward()
    for p in pm.parameters():
        p.grad = None
    pm.step(ids, target=target, loss_fn=_ce)
    grads = pm.full_grads()
    err = max(((grads[k] - p.grad).abs().max() / p.grad.abs().max()).item() for k, p in ref.named_parameters())
    return {"param_bytes": local, "fraction": local / total, "comm_bytes": sum(r.nbytes for r in records),
            "step_s": statistics.median(times), "grad_rel_err": err}


def main(steps: int = 3) -> None:
    import fxpar
    from fxpar.testing import run_ranks

    print(f"fxpar from {fxpar.__file__}")
    for name, (shape, names, plan) in CASES.items():
        n = 1
        for s in shape:
            n *= s
        results = run_ranks(_case, n, shape, names, plan, steps, timeout=600)
        if "refused" in results[0]:
            print(f"{name}: refused: {results[0]['refused']}")
            continue
        worst = max(results, key=lambda r: r["param_bytes"])
        print(f"{name}: parameters per rank {worst['param_bytes'] / 2**20:.2f} MiB ({worst['fraction']:.3f} of the "
              f"model), collectives {max(r['comm_bytes'] for r in results) / 2**20:.2f} MiB per step per rank, "
              f"step {statistics.median(r['step_s'] for r in results) * 1e3:.0f} ms, "
              f"grad rel err {max(r['grad_rel_err'] for r in results):.1e}")


if __name__ == "__main__":
    main()
