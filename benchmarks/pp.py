"""Section 2: pipeline parallel, fxpar's automatic split vs torch.distributed.pipelining.

Two comparisons, both on pp = 4 ranks with M microbatches, GPipe and 1F1B:

- A real model (the Llama-style one): fxpar `parallelize(model, mesh(pp),
  plan=Plan(pp=4, schedule=...))`, which chooses the cut points with its cost
  model, vs torch's `pipeline()` tracer with split points placed by hand at
  even layer boundaries (manual `StageSlice` stages if `pipeline()` fails).
  Step time, loss, bytes sent, and stage balance: fxpar's predicted per-stage
  cost shares and, measured, max / mean over ranks of each rank's CPU seconds
  per step.
- Sleeping stages (`models.SleepNet`): each stage sleeps t_f forward and
  2 t_f backward instead of computing, so the step time measures schedule
  overhead, not CPU contention. Both GPipe and 1F1B then ideally take

      T = (M + p - 1) (t_f + t_b),   t_b = 2 t_f

  (M microbatches, p stages; the fill and drain bubbles are p - 1 slots of
  each kind). Reported: step / T for fxpar and for torch's schedules on
  hand-made stages.
"""

from __future__ import annotations

import copy
import time
from typing import Any

import torch
import torch.distributed as dist

from benchmarks import harness as H
from benchmarks.models import ModelConfig, SleepNet, StageSlice, batch, build, cross_entropy, mse

__all__ = ["run", "pp_rank", "sleep_rank", "SCHEDULES"]

SCHEDULES = ("gpipe", "1f1b")  # the default; opts["schedules"] may pick fewer (--quick)


def _torch_schedule(name: str):
    from torch.distributed.pipelining import Schedule1F1B, ScheduleGPipe

    return {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[name]


def _torch_stage(model: torch.nn.Module, cfg: ModelConfig, mb: torch.Tensor, n: int) -> tuple[Any, str]:
    """This rank's torch PipelineStage, split by hand at even layer boundaries: (stage, how it was built)."""
    from torch.distributed.pipelining import PipelineStage, SplitPoint, pipeline

    rank = dist.get_rank()
    prefix = "h" if cfg.kind == "gpt2" else "layers"
    bounds = [cfg.layers * k // n for k in range(n + 1)]
    try:
        pipe = pipeline(copy.deepcopy(model), mb_args=(mb,),
                        split_spec={f"{prefix}.{b}": SplitPoint.BEGINNING for b in bounds[1:-1]})
        return pipe.build_stage(rank, torch.device("cpu")), "pipeline() tracer, hand-placed split points"
    except Exception as e:  # noqa: BLE001 - any tracer failure falls back to hand-made stages
        print(f"[pp] torch pipeline() failed ({type(e).__name__}: {str(e)[:200]}); using manual stages", flush=True)
    module = StageSlice(copy.deepcopy(model), bounds[rank], bounds[rank + 1], first=rank == 0, last=rank == n - 1)
    return PipelineStage(module, rank, n, torch.device("cpu")), "manual stages (pipeline() failed)"


def _torch_step(sched: Any, x: torch.Tensor, target: torch.Tensor, n: int) -> list:
    rank = dist.get_rank()
    losses: list = []
    if rank == 0:
        sched.step(x, return_outputs=False)
    elif rank == n - 1:
        sched.step(target=target, losses=losses, return_outputs=False)
    else:
        sched.step(return_outputs=False)
    return losses


def _split_summary(pm: Any) -> dict:
    split = pm.split
    total = sum(s.time_value for s in split.stages) or 1.0
    return {"cuts": [s.cut_before for s in split.stages[1:]],
            "predicted_shares": [s.time_value / total for s in split.stages],
            "predicted_balance": split.balance_ratio,
            "stage_param_bytes": [s.param_bytes for s in split.stages]}


def pp_rank(cfg: ModelConfig, opts: dict) -> dict:
    """Rank body of the real-model comparison (every rank runs it)."""
    import fxpar
    from torch.distributed.device_mesh import init_device_mesh

    n, rank, m = dist.get_world_size(), dist.get_rank(), opts["microbatches"]
    schedules = opts.get("schedules", SCHEDULES)
    mesh = init_device_mesh("cpu", (n,), mesh_dim_names=("pp",))
    model = build(cfg)
    ids, target = batch(cfg)
    with torch.no_grad():
        ref = cross_entropy(model(ids), target).item()
    out: dict[str, Any] = {"loss_ref": ref, "setup_s": {}, "split": {}, "losses": {}, "comms": {}, "memory": {},
                           "setup_bytes": {}}
    phases = H.Phases()
    fx, tv = {}, {}
    for name in schedules:
        with H.CommBytesMode(track_modules=False) as mode:
            t0 = time.perf_counter()
            fx[name] = fxpar.parallelize(model, mesh, example_inputs=(ids,), check=False,
                                         plan=fxpar.Plan(pp=n, schedule=name, microbatches=m))
            out["setup_s"][f"fxpar {name}"] = time.perf_counter() - t0
        out["setup_bytes"][f"fxpar {name}"] = H.summarize_comms(mode.records)["payload"]
        out["split"][name] = _split_summary(fx[name])
        phases.mark("fxpar parallelize")
        stage, how = _torch_stage(model, cfg, ids.chunk(m)[0], n)
        phases.mark("torch pipeline()")
        tv[name] = _torch_schedule(name)(stage, m, loss_fn=cross_entropy)  # scale_grads: mean loss, as fxpar
        out["torch_how"] = how
        out["memory"][f"fxpar {name}"] = H.tensor_bytes(fx[name].parameters())
        out["memory"][f"torch {name}"] = H.tensor_bytes(stage.submod.parameters())

    # ---- same loss first, and bytes of one step each
    for name in schedules:
        with H.CommBytesMode(track_modules=False) as mode:
            out["losses"][f"fxpar {name}"] = fx[name].step(ids, target=target, loss_fn=cross_entropy).item()
        out["comms"][f"fxpar {name}"] = H.summarize_comms(mode.records)
        with H.CommBytesMode(track_modules=False) as mode:
            losses = _torch_step(tv[name], ids, target, n)
        out["comms"][f"torch {name}"] = H.summarize_comms(mode.records)
        if losses:
            out["losses"][f"torch {name}"] = torch.stack([x.detach() for x in losses]).mean().item()

    phases.mark("loss check, counted steps")
    # ---- timing, interleaved
    variants = []
    for name in schedules:
        pm = fx[name]
        variants.append(H.Variant(f"fxpar {name}", (lambda p: lambda: p.step(ids, target=target,
                                                                              loss_fn=cross_entropy))(pm),
                                  (lambda p: lambda: p.zero_grad(set_to_none=True))(pm)))
        variants.append(H.Variant(f"torch {name}", (lambda s: lambda: _torch_step(s, ids, target, n))(tv[name]),
                                  (lambda s: lambda: s._stage.submod.zero_grad(set_to_none=True))(tv[name])))
    variants.append(H.Variant(f"fxpar {schedules[0]} (again)", variants[0].run, variants[0].prepare))
    out["times"] = H.interleave(variants, warmup=opts["warmup"], iters=opts.get("pp_iters", opts["iters"]))
    phases.mark("timed steps")
    out["rank"] = rank
    out["phases"] = phases.seconds
    return out


class _SleepStage(torch.nn.Module):
    def __init__(self, block: torch.nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


def sleep_rank(opts: dict) -> dict:
    """Rank body of the sleeping-stage comparison: one SleepBlock per stage."""
    import fxpar
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.pipelining import PipelineStage

    n, rank, m, tf = dist.get_world_size(), dist.get_rank(), opts["microbatches"], opts["sleep_s"]
    schedules = opts.get("schedules", SCHEDULES)
    mesh = init_device_mesh("cpu", (n,), mesh_dim_names=("pp",))
    torch.manual_seed(0)
    model = SleepNet(n, 16, tf)
    x, y = torch.randn(m, 16), torch.randn(m, 16)  # one row per microbatch: nothing to compute
    fx, tv, cuts = {}, {}, {}
    for name in schedules:
        fx[name] = fxpar.parallelize(model, mesh, example_inputs=(x,), check=False,
                                     plan=fxpar.Plan(pp=n, schedule=name, microbatches=m))
        cuts[name] = [s.cut_before for s in fx[name].split.stages[1:]]
        stage = PipelineStage(_SleepStage(copy.deepcopy(model.blocks[rank])), rank, n, torch.device("cpu"))
        tv[name] = _torch_schedule(name)(stage, m, loss_fn=mse)
    variants = []
    for name in schedules:
        variants.append(H.Variant(f"fxpar {name}", (lambda p: lambda: p.step(x, target=y, loss_fn=mse))(fx[name])))
        variants.append(H.Variant(f"torch {name}", (lambda s: lambda: _torch_step(s, x, y, n))(tv[name])))
    variants.append(H.Variant(f"torch {schedules[0]} (again)", variants[1].run))
    return {"times": H.interleave(variants, warmup=opts["warmup"], iters=opts["sleep_iters"]), "cuts": cuts}


def _send_bytes(comms: dict) -> int:
    return sum(v["payload"] for k, v in comms["by_op"].items() if k.endswith(" send"))


def run(pool: Any, cfg: ModelConfig, opts: dict) -> dict:
    """Runs section 2; returns its results (JSON-ready)."""
    n, m = pool.world_size, opts["microbatches"]
    schedules = opts.get("schedules", SCHEDULES)
    section: dict[str, Any] = {"title": "Pipeline parallel", "pp": n, "microbatches": m, "config": cfg.describe(),
                               "schedules": list(schedules)}
    import fxpar

    if not hasattr(fxpar, "Plan") or "pp" not in fxpar.Plan.__dataclass_fields__:
        section["status"] = "not landed: fxpar.Plan has no pp field"
        return section
    print(f"[pp] {cfg.describe()} on pp={n}, {m} microbatches ...", flush=True)
    t0 = time.perf_counter()
    try:
        ranks = pool.run(pp_rank, cfg, opts, timeout=opts["timeout"])
    except Exception as e:  # noqa: BLE001 - a pipeline that does not run yet is a result, not a crash
        section["status"] = f"failed: {type(e).__name__}: {str(e)[:2000]}"
        print(f"[pp] failed: {section['status'][:300]}", flush=True)
        return section
    section["status"] = "ok"
    r0 = ranks[0]
    times = H.aggregate([r["times"] for r in ranks])
    section["raw"] = times
    section["torch_how"] = r0["torch_how"]
    section["phases"] = r0["phases"]
    section["loss_ref"] = r0["loss_ref"]
    section["losses"] = {k: v for r in ranks for k, v in r["losses"].items()}
    section["split"] = r0["split"]
    section["setup_s"] = {k: max(r["setup_s"][k] for r in ranks) for k in r0["setup_s"]}
    section["setup_bytes"] = {k: max(r["setup_bytes"][k] for r in ranks) for k in r0["setup_bytes"]}
    # Analytical: every cut carries the (B, T, D) activations forward and their gradient backward.
    act = cfg.batch * cfg.seq * cfg.dim * 4
    section["analytical_send_bytes"] = 2 * (n - 1) * act
    comms = {}
    for key in r0["comms"]:
        sends = sum(_send_bytes(r["comms"][key]) for r in ranks)
        other = sum(r["comms"][key]["payload"] for r in ranks) - sends
        comms[key] = {"send_bytes": sends, "other_bytes": other,
                      "other_ops": sorted({k for r in ranks for k in r["comms"][key]["by_op"] if not k.endswith("send")})}
    section["comms"] = comms
    section["memory"] = {k: [r["memory"][k] for r in ranks] for k in r0["memory"]}
    cmp = {}
    for name in schedules:
        cmp[name] = H.pair_stats(times, f"fxpar {name}", f"torch {name}")
        cpu = [H.percentile([t[1] for t in r["times"][f"fxpar {name}"]], 50) for r in ranks]
        cpu_t = [H.percentile([t[1] for t in r["times"][f"torch {name}"]], 50) for r in ranks]
        cmp[name]["cpu_per_rank_fxpar"] = cpu
        cmp[name]["cpu_per_rank_torch"] = cpu_t
        cmp[name]["measured_balance_fxpar"] = max(cpu) / (sum(cpu) / len(cpu))
        cmp[name]["measured_balance_torch"] = max(cpu_t) / (sum(cpu_t) / len(cpu_t))
    cmp["noise"] = H.pair_stats(times, f"fxpar {schedules[0]}", f"fxpar {schedules[0]} (again)")
    section["compare"] = cmp

    print(f"[pp] sleeping stages, t_f = {opts['sleep_s'] * 1e3:.0f} ms ...", flush=True)
    ranks = pool.run(sleep_rank, opts, timeout=opts["timeout"])
    times = H.aggregate([r["times"] for r in ranks])
    tf = opts["sleep_s"]
    formula = (m + n - 1) * 3 * tf
    sleep: dict[str, Any] = {"t_f": tf, "t_b": 2 * tf, "formula_s": formula, "cuts": ranks[0]["cuts"], "raw": times}
    for name in schedules:
        st = H.pair_stats(times, f"fxpar {name}", f"torch {name}")
        st["fxpar_over_formula"] = st["wall_a"] / formula
        st["torch_over_formula"] = st["wall_b"] / formula
        sleep[name] = st
    sleep["noise"] = H.pair_stats(times, f"torch {schedules[0]}", f"torch {schedules[0]} (again)")
    section["sleep"] = sleep
    section["seconds"] = time.perf_counter() - t0
    print(f"[pp] done in {section['seconds']:.0f}s; " + ", ".join(
        f"{k}: fxpar/torch {cmp[k]['wall_ratio']:.3f}, sleep fxpar/formula {sleep[k]['fxpar_over_formula']:.3f}"
        for k in schedules), flush=True)
    return section
