"""Section 1: tensor parallel, fxpar's automatic plan vs torch's DTensor `parallelize_module`.

Per model, in the same 4 rank processes: fxpar `parallelize(model, mesh)` (no
plan) and torch's hand-written plans (`models.torch_tp_plan`) are built from
the same seeded model; the loss of each is checked against the unsplit model
and their gradients against each other; then training steps (forward +
backward) and forward-only steps are timed interleaved (`harness.interleave`),
bytes per step are counted (torch's with CommDebugMode, fxpar's with
`fxpar.count_comms()` and the same CommDebugMode counter), and parameter,
gradient and Adam-state bytes per rank are read from the tensors.
"""

from __future__ import annotations

import copy
import time
from typing import Any

import torch
import torch.distributed as dist

from benchmarks import harness as H
from benchmarks.models import ModelConfig, batch, build, cross_entropy, megatron_tp_bytes, ring_bytes, torch_tp_plan

__all__ = ["run", "tp_rank", "fxpar_memory"]

FX, FX2 = "fxpar", "fxpar (again)"


def _styles(cfg: ModelConfig) -> list[str]:
    return ["megatron", "torchtitan"] if cfg.kind == "llama" else ["megatron"]


def _torch_name(style: str) -> str:
    return f"torch TP ({style} plan)"


def fxpar_memory(pm: Any, model: torch.nn.Module) -> dict[str, Any]:
    """Parameter bytes of a ParallelModule on this rank, split into sharded and replicated tensors.

    A tensor counts as sharded when its local size is below its full size; the
    shard ratio is local / (full / n) for those (1.0 = a perfect 1/n shard).
    """
    n = dist.get_world_size()
    sharded_local = sharded_full = replicated = 0
    worst = 0.0
    seen: set[int] = set()
    replicated_tensors: list[tuple[str, int]] = []
    for fqn, p in pm.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        local = p.numel() * p.element_size()
        try:
            full = model.get_parameter(fqn.removeprefix("graph_module."))
            full_bytes = full.numel() * full.element_size()
        except AttributeError:
            full_bytes = local
        if local < full_bytes:
            sharded_local += local
            sharded_full += full_bytes
            worst = max(worst, local / (full_bytes / n))
        else:
            replicated += local
            replicated_tensors.append((fqn.removeprefix("graph_module."), local))
    replicated_tensors.sort(key=lambda t: -t[1])
    return {"sharded_local": sharded_local, "sharded_full": sharded_full, "replicated": replicated,
            "worst_shard_ratio": worst, "replicated_largest": replicated_tensors[:3]}


def _model_bytes(model: torch.nn.Module) -> int:
    return H.tensor_bytes(model.parameters())


def _grad_err(pm: Any, tm: torch.nn.Module) -> float:
    """max |fxpar grad - torch grad| over every parameter, relative to the largest torch gradient entry.

    Relative to the global scale, not per tensor: some gradients are zero in
    exact arithmetic (a key bias cancels in softmax) and only rounding noise.
    """
    fx = pm.full_grads()
    diff = scale = 0.0
    for fqn, p in tm.named_parameters():
        if p.grad is None or fqn not in fx:
            continue
        g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        diff = max(diff, (fx[fqn] - g).abs().max().item())
        scale = max(scale, g.abs().max().item())
    return diff / scale if scale else float("nan")


def tp_rank(cfg: ModelConfig, opts: dict) -> dict:
    """Rank body of section 1 for one model (every rank runs it)."""
    import fxpar
    from torch.distributed.device_mesh import init_device_mesh

    n = dist.get_world_size()
    mesh = init_device_mesh("cpu", (n,), mesh_dim_names=("tp",))
    model = build(cfg)
    ids, target = batch(cfg)
    out: dict[str, Any] = {"model_bytes": _model_bytes(model)}
    phases = H.Phases()

    # ---- set-up: compile time and bytes communicated while building shards
    with H.CommBytesMode(track_modules=False) as mode, fxpar.count_comms() as own:
        c0, t0 = time.process_time(), time.perf_counter()
        pm = fxpar.parallelize(model, mesh, example_inputs=(ids,), check=False)
        out["fxpar_setup_s"] = time.perf_counter() - t0
        out["fxpar_setup_cpu_s"] = time.process_time() - c0
    out["setup_bytes"] = {FX: H.summarize_comms(mode.records)["payload"] + sum(r.nbytes for r in own)}
    out["passes_s"] = sum(r.seconds for r in pm.history)
    phases.mark("fxpar parallelize")
    torch_models = {}
    for style in _styles(cfg):
        with H.CommBytesMode(track_modules=False) as mode:
            torch_models[style] = torch_tp_plan(copy.deepcopy(model), mesh, style=style)
        out["setup_bytes"][_torch_name(style)] = H.summarize_comms(mode.records)["payload"]

    phases.mark("torch parallelize_module")
    # ---- same loss first (the first fxpar call also exchanges its collective fingerprint: counted apart)
    with torch.no_grad():
        ref = cross_entropy(model(ids), target).item()
        with H.CommBytesMode() as mode:
            losses = {FX: cross_entropy(pm(ids), target).item()}
        first_call = H.summarize_comms(mode.records)["payload"]
        for style, tm in torch_models.items():
            losses[_torch_name(style)] = cross_entropy(tm(ids), target).item()
    out["loss_ref"] = ref
    out["losses"] = losses

    phases.mark("loss check")
    # ---- bytes per step: training step and forward-only, each side counted once
    comms: dict[str, Any] = {}
    pm.zero_grad(set_to_none=True)
    with H.CommBytesMode() as mode, fxpar.count_comms() as own:
        pm.step(ids, target=target, loss_fn=cross_entropy)
    comms[f"train {FX}"] = H.summarize_comms(mode.records)
    comms[f"train {FX} (own counter)"] = H.summarize_comms(H.fxpar_comms(own, n))
    grad_err = {}
    for style, tm in torch_models.items():
        tm.zero_grad(set_to_none=True)
        with H.CommBytesMode() as mode:
            cross_entropy(tm(ids), target).backward()
        comms[f"train {_torch_name(style)}"] = H.summarize_comms(mode.records)
        grad_err[_torch_name(style)] = _grad_err(pm, tm)
    out["grad_err"] = grad_err
    with torch.no_grad():
        with H.CommBytesMode() as mode, fxpar.count_comms() as own:
            pm(ids)
        comms[f"forward {FX}"] = H.summarize_comms(mode.records)
        comms[f"forward {FX} (own counter)"] = H.summarize_comms(H.fxpar_comms(own, n))
        for style, tm in torch_models.items():
            with H.CommBytesMode() as mode:
                tm(ids)
            comms[f"forward {_torch_name(style)}"] = H.summarize_comms(mode.records)
    out["comms"] = comms
    # The first call also exchanges the collective-order fingerprint: what it sends beyond a forward.
    out["first_call_extra_bytes"] = first_call - comms[f"forward {FX}"]["payload"]

    phases.mark("counted steps, gradient check")
    # ---- timing: training steps, then forward-only, interleaved
    def train_fx():
        pm.step(ids, target=target, loss_fn=cross_entropy)

    def train_torch(tm):
        return lambda: cross_entropy(tm(ids), target).backward()

    zero_fx = lambda: pm.zero_grad(set_to_none=True)  # noqa: E731
    variants = [H.Variant(FX, train_fx, zero_fx)]
    for style, tm in torch_models.items():
        variants.append(H.Variant(_torch_name(style), train_torch(tm),
                                  (lambda m: lambda: m.zero_grad(set_to_none=True))(tm)))
    variants.append(H.Variant(FX2, train_fx, zero_fx))
    out["train"] = H.interleave(variants, warmup=opts["warmup"], iters=opts["iters"])
    phases.mark("timed training steps")

    def fwd(m):
        def go():
            with torch.no_grad():
                m(ids)
        return go

    variants = [H.Variant(FX, fwd(pm))] + [H.Variant(_torch_name(s), fwd(tm)) for s, tm in torch_models.items()]
    variants.append(H.Variant(FX2, fwd(pm)))
    out["forward"] = H.interleave(variants, warmup=opts["warmup"], iters=opts["fwd_iters"])
    phases.mark("timed forward steps")

    # ---- memory per rank from the tensors: parameters, gradients (of the last step), Adam state
    mem = {}
    pm.zero_grad(set_to_none=True)
    pm.step(ids, target=target, loss_fn=cross_entropy)
    opt = torch.optim.Adam(pm.parameters(), lr=1e-4)
    opt.step()
    params = list(pm.parameters())
    mem[FX] = {"params": H.tensor_bytes(params), "grads": H.tensor_bytes(p.grad for p in params),
               "optimizer": H.optimizer_bytes(opt), **fxpar_memory(pm, model)}
    for style, tm in torch_models.items():
        tm.zero_grad(set_to_none=True)
        cross_entropy(tm(ids), target).backward()
        opt = torch.optim.Adam(tm.parameters(), lr=1e-4)
        opt.step()
        params = list(tm.parameters())
        mem[_torch_name(style)] = {"params": H.tensor_bytes(params), "grads": H.tensor_bytes(p.grad for p in params),
                                   "optimizer": H.optimizer_bytes(opt)}
    out["memory"] = mem
    phases.mark("memory")
    out["phases"] = phases.seconds
    return out


def _analytical(cfg: ModelConfig, n: int, *, backward: bool) -> dict[str, float]:
    a = megatron_tp_bytes(cfg, n, backward=backward)
    return {"count": a["count"], "payload": a["all_reduce"] + a["all_gather"],
            "sent": ring_bytes("all_reduce", a["all_reduce"], n) + ring_bytes("all_gather", a["all_gather"], n)}


def run(pool: Any, cfgs: list[ModelConfig], opts: dict) -> dict:
    """Runs section 1 for every model; returns the section's results (JSON-ready)."""
    n = pool.world_size
    section: dict[str, Any] = {"title": "Tensor parallel", "tp": n, "models": []}
    for cfg in cfgs:
        print(f"[tp] {cfg.describe()} on tp={n} ...", flush=True)
        t0 = time.perf_counter()
        ranks = pool.run(tp_rank, cfg, opts, timeout=opts["timeout"])
        r0 = ranks[0]
        train, fwd = H.aggregate([r["train"] for r in ranks]), H.aggregate([r["forward"] for r in ranks])
        torch_names = [_torch_name(s) for s in _styles(cfg)]
        res: dict[str, Any] = {
            "config": cfg.describe(), "kind": cfg.kind, "layers": cfg.layers,
            "loss_ref": r0["loss_ref"], "losses": r0["losses"], "grad_err": r0["grad_err"],
            "setup_s": max(r["fxpar_setup_s"] for r in ranks), "passes_s": max(r["passes_s"] for r in ranks),
            "setup_bytes": {k: max(r["setup_bytes"][k] for r in ranks) for k in r0["setup_bytes"]},
            "first_call_extra_bytes": r0["first_call_extra_bytes"],
            "train": {name: H.pair_stats(train, FX, name) for name in torch_names + [FX2]},
            "forward": {name: H.pair_stats(fwd, FX, name) for name in torch_names + [FX2]},
            "raw": {"train": train, "forward": fwd},
            "comms": r0["comms"],
            "analytical": {"train": _analytical(cfg, n, backward=True), "forward": _analytical(cfg, n, backward=False)},
            "memory": r0["memory"], "model_bytes": r0["model_bytes"],
            "seconds": time.perf_counter() - t0, "phases": r0["phases"],
        }
        # Every rank of a Megatron plan sends the same; check that instead of assuming it.
        res["comms_equal_on_ranks"] = all(r["comms"][f"train {FX}"]["payload"] == r0["comms"][f"train {FX}"]["payload"]
                                          for r in ranks)
        section["models"].append(res)
        print(f"[tp] {cfg.kind}: done in {res['seconds']:.0f}s; train fxpar/torch = "
              + ", ".join(f"{k}: {v['wall_ratio']:.3f}" for k, v in res["train"].items()), flush=True)
    return section
