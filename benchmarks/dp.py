"""Section 3: data parallel and FSDP, fxpar vs torch DDP and FSDP2 (`fully_shard`).

Each rank gets its own quarter of the global batch (`input_layout="local"`
for fxpar, as a data loader would feed it). Sides: torch DDP, torch FSDP2
(every block and the root wrapped, reshard after forward), and -- where
`fxpar.parallelize` accepts a `dp` / `fsdp` mesh and reproduces the unsplit
loss -- fxpar on a ("dp",) and a ("fsdp",) mesh. An fxpar side that fails
(on any rank: the ranks agree by an all-reduce before going on) or gives a
different loss is reported as not landed, with the reason, and left out of
the timing; if it breaks the run, torch's sides are measured again alone. A
new fxpar side is one entry in `_fxpar_sides`.

Analytical bytes per step, per rank, for P parameter bytes on n ranks, by
phase (payload: the bytes a rank puts into collectives):

    gradient reduction     G = gradient bytes that can be nonzero (`models.live_grad_bytes`):
                           all-reduced by data parallel, reduce-scattered by FSDP
    forward gather (FSDP)  P / n: every rank's shard of every parameter, once
    backward re-gather     at most P / n: the parameters autograd saved, gathered again
                           (reshard after forward); reported, not a target
"""

from __future__ import annotations

import copy
import time
from typing import Any

import torch
import torch.distributed as dist

from benchmarks import harness as H
from benchmarks.models import ModelConfig, batch, build, cross_entropy, live_grad_bytes

__all__ = ["run", "dp_rank"]

_fxpar_sides = {"fxpar dp": "dp", "fxpar fsdp": "fsdp"}  # name -> mesh dim name


def _torch_ddp(model: torch.nn.Module) -> torch.nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(copy.deepcopy(model))


def _torch_fsdp2(model: torch.nn.Module, mesh) -> torch.nn.Module:
    from torch.distributed.fsdp import fully_shard

    m = copy.deepcopy(model)
    blocks = m.h if hasattr(m, "h") else list(m.layers.values())
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(m, mesh=mesh)
    return m


def _global_mean(x: torch.Tensor) -> float:
    t = x.detach().clone()
    dist.all_reduce(t)
    return (t / dist.get_world_size()).item()


def dp_rank(cfg: ModelConfig, opts: dict) -> dict:
    """Rank body of section 3 (every rank runs it)."""
    import fxpar
    from fxpar.analysis.memory import memory_per_rank
    from torch.distributed.device_mesh import init_device_mesh

    n, rank = dist.get_world_size(), dist.get_rank()
    model = build(cfg)
    ids, target = batch(cfg)
    local_ids, local_target = ids.chunk(n)[rank], target.chunk(n)[rank]
    with torch.no_grad():
        ref = cross_entropy(model(ids), target).item()
    out: dict[str, Any] = {"loss_ref": ref, "losses": {}, "status": {}, "comms": {}, "memory": {},
                           "setup_bytes": {}, "model_bytes": H.tensor_bytes(model.parameters()),
                           "state_tensors": len(list(model.parameters())) + len(list(model.buffers()))}

    sides: dict[str, tuple[Any, Any]] = {}  # name -> (step fn, module)
    for name, dim in opts["fxpar_sides"].items():
        try:
            mesh = init_device_mesh("cpu", (n,), mesh_dim_names=(dim,))
            with H.CommBytesMode(track_modules=False) as mode:
                pm = fxpar.parallelize(model, mesh, example_inputs=(local_ids,), input_layout="local", check=False)
            out["setup_bytes"][name] = H.summarize_comms(mode.records)["payload"]
            loss = pm.step(local_ids, target=local_target, loss_fn=cross_entropy).item()
            error = ""
        except Exception as e:  # noqa: BLE001 - not landed yet is a result
            error = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        # Every rank must agree before the next collective: one rank's failure is every rank's.
        flag = torch.tensor([0 if error else 1])
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        if not flag.item():
            out["status"][name] = f"not landed: {error or 'failed on another rank'}"
            out["setup_bytes"].pop(name, None)
            continue
        out["losses"][name] = loss
        if abs(loss - ref) > 1e-4 * abs(ref):  # the same on every rank: the loss is global
            out["status"][name] = f"not landed: loss {loss:.6f} != unsplit {ref:.6f}"
            continue
        out["status"][name] = "ok"
        sides[name] = ((lambda p: lambda: p.step(local_ids, target=local_target, loss_fn=cross_entropy))(pm), pm)

    mesh = init_device_mesh("cpu", (n,), mesh_dim_names=("dp",))
    for name, make in (("torch DDP", lambda: _torch_ddp(model)), ("torch FSDP2", lambda: _torch_fsdp2(model, mesh))):
        with H.CommBytesMode(track_modules=False) as mode:
            m = make()
        out["setup_bytes"][name] = H.summarize_comms(mode.records)["payload"]
        loss = cross_entropy(m(local_ids), local_target)
        loss.backward()
        out["losses"][name] = _global_mean(loss)
        out["status"][name] = "ok"
        sides[name] = ((lambda mm: lambda: cross_entropy(mm(local_ids), local_target).backward())(m), m)

    for name, (step, m) in sides.items():
        m.zero_grad(set_to_none=True)
        with H.CommBytesMode(track_modules=False) as mode, fxpar.count_comms() as own:
            step()
        # fxpar's sides by fxpar's own counter: the dispatch mode sees one fsdp_all_gather op per
        # parameter, not the one collective per block the runtime issues for them
        records = H.fxpar_comms(own, n) if name in opts["fxpar_sides"] else mode.records
        out["comms"][name] = H.summarize_comms(records)
        params = list(m.parameters())
        out["memory"][name] = {"params": H.tensor_bytes(params), "grads": H.tensor_bytes(p.grad for p in params)}
        # The step's peak from the tensors: gathered parameters, activations, gradients (all created by it),
        # and for fxpar the memory model's prediction of it (explain()'s "training step").
        m.zero_grad(set_to_none=True)
        with H.StepLiveBytes(H.fsdp_bucket_tensors(m) if name in opts["fxpar_sides"] else None) as live:
            step()
        out["memory"][name]["step_peak"] = live.peak
        if name in opts["fxpar_sides"]:
            out["memory"][name]["predicted_step_peak"] = memory_per_rank(m)[0].step_peak

    variants = [H.Variant(name, step, (lambda mm: lambda: mm.zero_grad(set_to_none=True))(m))
                for name, (step, m) in sides.items()]
    first = variants[0]
    variants.append(H.Variant(f"{first.name} (again)", first.run, first.prepare))
    out["times"] = H.interleave(variants, warmup=opts["warmup"], iters=opts["dp_iters"])
    out["names"] = [v.name for v in variants]
    return out


def phases(comms: dict) -> dict[str, int]:
    """A side's payload bytes per step by phase: forward gather, backward re-gather, gradient reduction, other."""
    by = {k: v["payload"] for k, v in comms["by_op"].items()}
    fwd = by.pop("forward all_gather", 0)
    bwd = by.pop("backward all_gather", 0)
    grad = by.pop("backward reduce_scatter", 0) + by.pop("backward all_reduce", 0)
    return {"forward_gather": fwd, "backward_gather": bwd, "grad_reduction": grad, "other": sum(by.values())}


def run(pool: Any, cfg: ModelConfig, opts: dict) -> dict:
    """Runs section 3; returns its results (JSON-ready)."""
    n = pool.world_size
    print(f"[dp] {cfg.describe()} on dp={n} ...", flush=True)
    t0 = time.perf_counter()
    try:
        ranks = pool.run(dp_rank, cfg, {**opts, "fxpar_sides": _fxpar_sides}, timeout=opts["timeout"])
        status = {}
    except Exception as e:  # noqa: BLE001 - an fxpar side that breaks the ranks: torch's sides alone
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip().startswith("rank ")]
        why = "not landed: the run failed: " + (lines[0] if lines else str(e).splitlines()[0])[:400]
        status = {name: why for name in _fxpar_sides}
        print(f"[dp] fxpar sides failed ({why[:200]}); measuring torch's sides alone", flush=True)
        ranks = pool.run(dp_rank, cfg, {**opts, "fxpar_sides": {}}, timeout=opts["timeout"])
    r0 = ranks[0]
    r0["status"] = {**status, **r0["status"]}
    times = H.aggregate([r["times"] for r in ranks])
    names = r0["names"]
    p = r0["model_bytes"]
    live = live_grad_bytes(cfg, p)
    section: dict[str, Any] = {
        "title": "Data parallel / FSDP", "dp": n, "config": cfg.describe(), "status": r0["status"],
        "loss_ref": r0["loss_ref"], "losses": r0["losses"], "model_bytes": p, "live_grad_bytes": live,
        "analytical": {"grad_reduction": live, "forward_gather": p // n},
        "comms": {k: {**v, "phases": phases(v)} for k, v in r0["comms"].items()},
        "memory": r0["memory"], "setup_bytes": {k: max(r["setup_bytes"].get(k, 0) for r in ranks)
                                                for k in r0["setup_bytes"]},
        "state_tensors": r0["state_tensors"],
        "raw": times,
        "compare": {}, "noise": H.pair_stats(times, names[0], names[-1]),
    }
    for fx_name, torch_name in (("fxpar dp", "torch DDP"), ("fxpar fsdp", "torch FSDP2")):
        if fx_name in times:
            section["compare"][f"{fx_name} / {torch_name}"] = H.pair_stats(times, fx_name, torch_name)
    section["medians"] = {name: H.percentile(times[name]["wall"], 50) for name in names}
    section["cpu_medians"] = {name: H.percentile(times[name]["cpu"], 50) for name in names}
    section["seconds"] = time.perf_counter() - t0
    print(f"[dp] done in {section['seconds']:.0f}s; status {section['status']}", flush=True)
    return section
