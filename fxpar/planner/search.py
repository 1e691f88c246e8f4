"""autoplan: the mesh, per-module styles, schedule, microbatches, precision and memory savers for a number of devices.

The space, for W devices with D per node and a model of L blocks:

    meshes     dp x fsdp x pp x tp = W with tp <= D (tensor parallel stays inside a node),
               pp <= L / 2 (two blocks or more per stage), and the data ranks dp x fsdp dividing the global
               batch; the data ranks split three ways: all dp, all fsdp, or fsdp inside the node's
               remaining devices and dp across (HSDP); for a model with experts (the MoE layers
               `fuse_experts` recognises) also ep x (the rest all fsdp or all dp), ep dividing the
               data ranks and the number of experts (ep borrows data ranks: tokens split, experts by index)
    styles     per Megatron pair and lone projection: sharded on tp as the automatic plan shards it, or
               replicated: an integer program per tp mesh (`fxpar.planner.styles`, solved by HiGHS
               through `fxpar.planner.solve`) under the memory the rest of the mesh leaves
    pipelines  schedule in (1f1b, gpipe) x microbatches in (pp, 2 pp, 4 pp, 8 pp) dividing the
               local batch
    precision  the model's dtype, or bfloat16 compute (FSDP2's MixedPrecisionPolicy, float32 master
               weights and gradient reductions) for a float32 model (`mixed_precision=False`: not searched)
    memory     activation checkpointing in (None, selective, full) without a pipeline (parallelize
               refuses it with one); a pipeline whose time-balanced stages do not fit is cut again
               under memory (`fxpar.planner.cuts`: an exact min-max partition of the blocks)

Each mesh is compiled once with the automatic plan (the passes on one capture of the model, as a
dry run compiles it), and every pipeline, precision and memory variant of it is priced on that graph
by `fxpar.planner.estimate_module` (the graphs do not depend on them). Where the style program
replicates some units (and not all: a tp dim that carries nothing copies a smaller mesh), the mesh is
compiled again with that plan and priced the same way. In two phases: every (tp, pp) with all its
data ranks FSDP first, pp growing per tp while the best step improves (past the best pp the bubble,
transfers and per-microbatch gathers only grow), then the other data splits of the best `TOP_TP_PP`
(tp, pp) shapes within `FINALIST_SLACK` of the best only: the data split trades gather time for
memory within a shape and rarely reorders the shapes. A mesh whose parameters, gradients and AdamW
state alone exceed the budget, 4 P / (tp pp fsdp) bytes for float32 parameters, is dropped before
compiling; with ep, the expert weights' share of it is divided by ep too. A (tp, ep) whose pipelines fit
nothing stops adding stages once its least memory stops shrinking (`autoplan`'s loop, with the numbers).
The winner is the fastest predicted step within the memory budget (ties: less memory). A shape is
(tp, pp, ep): expert parallelism is a phase-1 dim of its own, not only a data split of the finalists.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from torch.distributed.fsdp import MixedPrecisionPolicy

from fxpar.api import parallelize
from fxpar.capture import capture
from fxpar.compiler import compile_model
from fxpar.core.errors import FxparError, PlanError, block_of
from fxpar.core.plan import Plan
from fxpar.dryrun import _split_pp_dry, dry_mesh
from fxpar.passes.fuse_experts import _expert_modules
from fxpar.planner.cuts import block_costs, memory_aware_cuts
from fxpar.planner.devices import DeviceProfile, device_profile
from fxpar.planner.predict import ACTIVATION_CHECKPOINTING, Estimate, estimate_module
from fxpar.planner.solve import solver_available
from fxpar.planner.styles import choose_styles, replicated_modules

__all__ = ["Candidate", "AutoPlan", "autoplan", "MESH_ORDER"]

MESH_ORDER = ("dp", "pp", "fsdp", "ep", "tp")
"""Mesh dims from outermost to innermost: tensor parallel, expert parallel and FSDP on the fastest links."""
DATA_DIMS = ("dp", "fsdp", "ep")
"""The dims that split the batch (ep borrows data ranks: tokens split, experts by index)."""

SCHEDULE_CHOICES = ("1f1b", "gpipe")
MICROBATCH_FACTORS = (1, 2, 4, 8)
TOP_TP_PP = 3
"""(tp, pp) shapes whose other data splits are compiled too (phase 2 of the search)..."""
FINALIST_SLACK = 1.25
"""... if their best step is within this factor of the best shape's."""
PIPELINE_MEMORY_SLACK = 0.75
"""A pipeline is not compiled when `_pipelined_memory`'s guess exceeds the budget by 1 / this: a third
over leaves room for the guess's error (about 1% on Llama-3 70B) and for stages unlike the average."""


@dataclass(frozen=True)
class Candidate:
    """One point of the search and its prediction.

    Attributes:
        mesh: {dim: size} in MESH_ORDER, size-1 dims left out.
        schedule, microbatches: the pipeline's (None without pp).
        activation_checkpointing: None, 'selective' or 'full'.
        mp_dtype: mixed precision's param_dtype (compute and activations; parameters stay float32), or None.
        cuts: pipeline cut points chosen under memory (`fxpar.planner.cuts`); () for split_stages' own.
        replicate: the modules the style ILP replicates where the automatic plan shards them on tp.
        estimate: the prediction (None when the mesh did not compile).
        fits: predicted memory within the budget.
        reason: why it was dropped, if it was.
    """

    mesh: dict
    schedule: str | None = None
    microbatches: int | None = None
    activation_checkpointing: str | None = None
    estimate: Estimate | None = None
    fits: bool = False
    reason: str = ""
    mp_dtype: torch.dtype | None = None
    replicate: tuple[str, ...] = ()
    cuts: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        mesh = " x ".join(f"{k}{v}" for k, v in self.mesh.items()) or "1"
        pp = f", {self.schedule} m={self.microbatches}" if self.schedule else ""
        ac = f", ac={self.activation_checkpointing}" if self.activation_checkpointing else ""
        mp = f", {str(self.mp_dtype).replace('torch.', '')}" if self.mp_dtype else ""
        styles = f", ilp: {len(self.replicate)} replicated" if self.replicate else ""
        cuts = ", cuts under memory" if self.cuts else ""
        return mesh + pp + ac + mp + styles + cuts


@dataclass(frozen=True)
class AutoPlan:
    """What `autoplan` chose, and what it compared.

    Attributes:
        mesh_shape, mesh_dim_names: the mesh to build (`init_device_mesh(device, mesh_shape,
            mesh_dim_names=mesh_dim_names)`).
        plan: the plan to pass to parallelize (a ResolvedPlan: `fxpar.save_plan` writes it).
        activation_checkpointing: the memory saver chosen (pass it to parallelize).
        mp_policy: the MixedPrecisionPolicy chosen (bfloat16 compute, float32 gradient reductions), or
            None (pass it to parallelize as mp_policy=).
        predicted_step_s, predicted_memory_gib: the winner's estimate (memory of the most loaded rank).
        candidates: every point priced, fastest first.
        device: the device profile's name; memory_budget_gib: the budget used.
        seconds: wall time of capture, compiles and pricing.
    """

    mesh_shape: tuple[int, ...]
    mesh_dim_names: tuple[str, ...]
    plan: Any
    activation_checkpointing: str | None
    predicted_step_s: float
    predicted_memory_gib: float
    candidates: tuple[Candidate, ...] = ()
    device: str = ""
    memory_budget_gib: float = 0.0
    seconds: dict = field(default_factory=dict)
    mp_policy: Any = None

    def parallelize_kwargs(self) -> dict:
        """The keywords to pass to `fxpar.parallelize` besides the mesh: plan, mp_policy, activation_checkpointing."""
        return {"plan": self.plan, "mp_policy": self.mp_policy, "activation_checkpointing": self.activation_checkpointing}

    @property
    def best(self) -> Candidate:
        return self.candidates[0]

    def explain(self, top: int = 8) -> str:
        """The best candidates side by side, and why the winner won."""
        fits = [c for c in self.candidates if c.fits]
        lines = [f"autoplan on {len(fits)} fitting of {len(self.candidates)} candidates, device {self.device}, "
                 f"budget {self.memory_budget_gib:.1f} GiB per device ("
                 + ", ".join(f"{k} {v:.1f} s" for k, v in self.seconds.items()) + ")",
                 f"  {'candidate':44s} {'step ms':>10s} {'memory GiB':>11s} {'comm MiB':>10s} {'bubble':>7s}"]
        for c in [*fits[:top], *[c for c in self.candidates if not c.fits and c.estimate][:2]]:
            e = c.estimate
            bubble = e.breakdown.get("bubble")
            lines.append(f"  {c.label:44s} {e.step_s * 1e3:10.3f} {e.memory_gib:11.2f} "
                         f"{e.breakdown['comm_bytes'] / 2 ** 20:10.2f} {'' if bubble is None else f'{bubble:.3f}':>7s}"
                         + ("" if c.fits else "  (over budget)"))
        if len(fits) > 1:
            win, second = fits[0].estimate, fits[1].estimate
            terms = ("compute_s", "recompute_s", "tp_comm_s", "ep_comm_s", "fsdp_exposed_s", "dp_exposed_s", "p2p_s")
            gaps = sorted(((second.breakdown.get(k) or 0.0) - (win.breakdown.get(k) or 0.0), k) for k in terms)
            why = ", ".join(f"{k[:-2]} {d * 1e3:+.3f} ms" for d, k in reversed(gaps) if d > 0)
            lines.append(f"chosen: {fits[0].label}; the runner-up ({fits[1].label}) is "
                         f"{second.step_s / win.step_s:.2f} x slower" + (f" ({why})" if why else ""))
        elif fits:
            lines.append(f"chosen: {fits[0].label}, the only candidate within the budget")
        mp = (f"MixedPrecisionPolicy(param_dtype={self.mp_policy.param_dtype}, "
              f"reduce_dtype={self.mp_policy.reduce_dtype})" if self.mp_policy is not None else "None")
        lines.append(f"apply: mesh {dict(zip(self.mesh_dim_names, self.mesh_shape))}, mp_policy={mp}, "
                     f"activation_checkpointing={self.activation_checkpointing!r}"
                     + (f", {len(self.best.replicate)} modules replicated by the style ILP "
                        f"({', '.join(self.best.replicate[:4])}{', ...' if len(self.best.replicate) > 4 else ''})"
                        if self.best.replicate else ""))
        lines.append(self.best.estimate.explain() if self.best.estimate else "")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.explain()


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _rebatch(inputs: tuple, global_batch: int | None) -> tuple:
    if global_batch is None:
        return inputs
    out = []
    for x in inputs:
        if isinstance(x, torch.Tensor) and x.dim() > 0:
            shape = (global_batch, *x.shape[1:])
            x = x.new_empty(shape) if x.device.type == "meta" else torch.zeros(shape, dtype=x.dtype, device=x.device)
        out.append(x)
    return tuple(out)


def _data(mesh: dict) -> int:
    """How many ways the batch is split."""
    n = 1
    for d in DATA_DIMS:
        n *= mesh.get(d, 1)
    return n


def _meshes(world: int, device: DeviceProfile, blocks: int, batch: int, experts: int = 0) -> list[dict]:
    """Every mesh of the space (module docstring); with `experts` > 1, also ep carved out of the data ranks,
    ep dividing the number of experts, the rest all FSDP or all dp."""
    out = []
    for tp in _divisors(world):
        if tp > device.devices_per_node:
            continue
        for pp in _divisors(world // tp):
            if pp > 1 and pp > blocks // 2:  # a stage holds two blocks or more
                continue
            data = world // (tp * pp)
            if batch % data:
                continue
            inside = max(1, device.devices_per_node // tp)
            hybrid = max(d for d in _divisors(data) if d <= inside)
            splits = {(data, 1, 1), (1, data, 1), (data // hybrid, hybrid, 1)}
            if experts > 1:
                splits |= {s for ep in _divisors(data) if ep > 1 and experts % ep == 0
                           for s in ((data // ep, 1, ep), (1, data // ep, ep))}
            for dp, fsdp, ep in sorted(splits):
                sizes = {"dp": dp, "pp": pp, "fsdp": fsdp, "ep": ep, "tp": tp}
                out.append({k: sizes[k] for k in MESH_ORDER if sizes[k] > 1} or {"dp": 1})
    return out


def _state_bytes(model: nn.Module, experts: frozenset = frozenset()) -> tuple[float, float]:
    """Parameters, gradients and AdamW's two float32 states, a lower bound of what training holds:
    (the parameters other than `experts`, the `experts`' (FQNs) which ep also shards)."""
    total = [0.0, 0.0]
    for name, p in model.named_parameters():
        total[name in experts] += p.numel() * (2 * p.element_size() + 8)
    return total[0], total[1]


def _experts(captured: Any) -> tuple[int, frozenset]:
    """(the number of experts, the FQNs of the stacked expert weights) of the MoE layers fuse_experts recognises;
    (0, {}) without experts (the smallest count where layers differ: ep must divide every layer's)."""
    found = _expert_modules(captured)
    counts = {int(n.meta["val"].shape[0]) for named in found.values() for n in named.values()}
    names = frozenset(str(n.target) for named in found.values() for n in named.values())
    return (min(counts), names) if counts else (0, frozenset())


def _pipelined_memory(mesh: dict, flat: dict | None, candidates: list[Candidate], batch: int) -> float | None:
    """About the least memory (GiB) a pipeline on `mesh` can need, from the priced mesh `flat` of the same
    tp and ep without pp (None if that was not priced, or `mesh` takes no pipeline).

    At a fixed world size and global batch, S stages divide the data ranks by S: a rank's parameter, gradient
    and optimizer state is the same as without pp (1/S of the blocks, S times fewer FSDP shards), and its
    stage runs S times the local batch through 1/S of the blocks. 1F1B's first stage keeps min(M, S) of M
    microbatches in flight, so with the most microbatches M = S f that divide the local batch it holds
    A / f of the activations A the mesh without pp holds without checkpointing (which a pipeline cannot
    use): state + A / f. (Llama-3 70B on 512: 417.3, 309.7, 256.0, 229.2 GiB at tp = 1, 2, 4, 8 against
    414.4, 307.9, 254.7, 228.1 compiled at pp=2.)
    """
    if flat is None:
        return None
    stages = mesh["pp"]
    local = batch // _data(mesh)
    factors = [f for f in MICROBATCH_FACTORS if local % (stages * f) == 0]
    priced = [c.estimate for c in candidates if c.mesh == flat and c.estimate is not None
              and c.activation_checkpointing is None]
    if not factors or not priced:
        return None
    return min(e.memory_gib - e.breakdown["activations"] / 2 ** 30 * (1 - 1 / max(factors)) for e in priced)


def _mp_choices(model: nn.Module, mixed_precision: bool) -> tuple:
    """None (the model's dtype), and bfloat16 compute where the model trains in float32."""
    if mixed_precision and any(p.dtype == torch.float32 for p in model.parameters()):
        return (None, torch.bfloat16)
    return (None,)


def _mp_policy(dtype: torch.dtype | None) -> Any:
    return None if dtype is None else MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)


def autoplan(model: nn.Module, world_size: int, *, example_inputs: tuple = (), example_kwargs: dict | None = None,
             device: str | DeviceProfile = "local", memory_gib: float | None = None,
             global_batch: int | None = None, mixed_precision: bool = True) -> AutoPlan:
    """Chooses the mesh, per-module styles, pipeline schedule and microbatches, and memory savers for `world_size` devices.

    Args:
        model: the model (may live on the meta device); never modified.
        world_size: the number of devices.
        example_inputs, example_kwargs: one step's inputs (their dim 0 is the global batch).
        device: 'local' (this machine, measured), 'h100', 'h200', 'a100', or a DeviceProfile.
        memory_gib: memory per device to plan within (default: the device's).
        global_batch: the global batch (sequences per step), if not the example's.
        mixed_precision: whether bfloat16 compute (a MixedPrecisionPolicy, float32 master weights and
            gradient reductions) may be chosen for a float32 model; False keeps its numerics.

    Returns:
        An AutoPlan (`.mesh_shape`, `.mesh_dim_names`, `.plan`, `.mp_policy`, `.activation_checkpointing`,
        `.predicted_step_s`, `.predicted_memory_gib`, `.candidates`, `.explain()`).

    Raises:
        PlanError: no candidate fits the memory budget (the closest ones are named), or a bad argument.
    """
    if not isinstance(world_size, int) or world_size < 1:
        raise PlanError(f"world_size={world_size!r}: a positive number of devices")
    if not isinstance(example_inputs, tuple):
        example_inputs = (example_inputs,)
    profile = device_profile(device)
    budget = memory_gib if memory_gib is not None else profile.memory_gib
    inputs = _rebatch(example_inputs, global_batch)
    batch = next((x.shape[0] for x in inputs if isinstance(x, torch.Tensor) and x.dim() > 0), 1)
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    captured = capture(model, inputs, example_kwargs)
    seconds["capture"] = time.perf_counter() - start
    blocks = list(dict.fromkeys(b for name, _ in model.named_modules() if (b := block_of(name)) is not None))
    precisions = _mp_choices(model, mixed_precision)
    num_experts, expert_params = _experts(captured)
    dense_state, expert_state = _state_bytes(model, expert_params)
    candidates: list[Candidate] = []
    timing = {"compile": 0.0, "price": 0.0, "ilp": 0.0}
    ilp = solver_available()
    style_memo: dict = {}
    node_costs: dict = {}
    kept: dict = {}  # the compiled module of the fastest fitting candidate so far

    def price(mesh: dict, pm: Any, replicate: tuple[str, ...] = (), cuts: tuple[str, ...] = ()) -> list[Candidate]:
        """Every pipeline, precision and memory variant of one compiled mesh."""
        t0 = time.perf_counter()
        pp = mesh.get("pp", 1)
        local_batch = batch // _data(mesh)
        pipelines = [(None, None)] if pp == 1 else \
            [(s, pp * f) for s in SCHEDULE_CHOICES for f in MICROBATCH_FACTORS if local_batch % (pp * f) == 0]
        # parallelize refuses activation checkpointing with a pipeline
        checkpointing = ACTIVATION_CHECKPOINTING if pp == 1 else (None,)
        cache: dict = {"node_costs": node_costs}  # node costs depend on local shapes only: shared by every mesh
        out = []
        for schedule, m in pipelines:
            for mp in precisions:
                for ac in checkpointing:
                    est = estimate_module(pm, dry_mesh(mesh), profile, microbatches=m, schedule=schedule,
                                          activation_checkpointing=ac, mp_dtype=mp, cache=cache)
                    out.append(Candidate(mesh, schedule, m, ac, est, est.memory_gib <= budget, mp_dtype=mp,
                                         replicate=replicate, cuts=cuts))
        timing["price"] += time.perf_counter() - t0
        fitting = [c.estimate.step_s for c in out if c.fits]
        if fitting and min(fitting) < kept.get("step", float("inf")):  # the winner so far: its plan is read back
            kept.update(step=min(fitting), key=(tuple(mesh.items()), replicate, cuts), pm=pm)
        return out

    def compile_mesh(mesh: dict, plan: Plan | None) -> Any:
        t0 = time.perf_counter()
        try:
            return compile_model(model, None, dry_mesh(mesh), example_inputs=inputs, example_kwargs=example_kwargs,
                                 plan=plan, check=False, split_pp=_split_pp_dry, captured=captured)
        finally:
            timing["compile"] += time.perf_counter() - t0

    def evaluate(mesh: dict) -> None:
        """Compile one mesh, price its variants, and the style ILP's plan of it where that differs."""
        shards = mesh.get("tp", 1) * mesh.get("pp", 1) * mesh.get("fsdp", 1)
        lower_bound = (dense_state + expert_state / mesh.get("ep", 1)) / shards
        if lower_bound / 2 ** 30 > budget:
            candidates.append(Candidate(mesh, reason=f"parameters, gradients and optimizer state alone need "
                                                     f"{lower_bound / 2 ** 30:.1f} GiB per device"))
            return
        try:
            pm = compile_mesh(mesh, None)
        except FxparError as e:
            candidates.append(Candidate(mesh, reason=f"{type(e).__name__}: {e}"))
            return
        variants = price(mesh, pm)
        candidates.extend(variants)
        if mesh.get("pp", 1) > 1 and not any(c.fits for c in variants):
            candidates.extend(_recut(mesh, variants))
        if mesh.get("tp", 1) > 1 and ilp:
            replicate = _styles(mesh, variants)
            if replicate:
                try:
                    candidates.extend(price(mesh, compile_mesh(mesh, Plan(tp=dict.fromkeys(replicate, "replicate"),
                                                                          auto_tp=True)), replicate))
                except FxparError as e:
                    candidates.append(Candidate(mesh, reason=f"style ILP plan: {type(e).__name__}: {e}",
                                                replicate=replicate))

    def _recut(mesh: dict, variants: list[Candidate]) -> list[Candidate]:
        """A pipeline whose time-balanced stages do not fit: cut again under memory, 1F1B, the most microbatches."""
        m = max((c.microbatches for c in variants if c.schedule == "1f1b"), default=None)
        if m is None:
            return []
        if "blocks" not in style_memo:
            style_memo["blocks"] = block_costs(captured, blocks)
        try:
            ref = min((c for c in variants if c.schedule == "1f1b" and c.microbatches == m),
                      key=lambda c: c.estimate.memory_gib)
            cuts = tuple(memory_aware_cuts(style_memo["blocks"], blocks, mesh, microbatches=m,
                                           budget_bytes=budget * 2 ** 30, calibrate_gib=ref.estimate.memory_gib))
            pm = compile_mesh(mesh, Plan(pp=list(cuts), schedule="1f1b", microbatches=m, auto_tp=True))
        except FxparError as e:
            return [Candidate(mesh, "1f1b", m, reason=f"cuts under memory: {type(e).__name__}: {e}")]
        return price(mesh, pm, cuts=cuts)

    def _styles(mesh: dict, variants: list[Candidate]) -> tuple[str, ...]:
        """The style ILP for the best variant of the automatic plan (the least memory if none fits)."""
        t0 = time.perf_counter()
        fitting = [c for c in variants if c.fits]
        ref = min(fitting, key=lambda c: c.estimate.step_s) if fitting else \
            min(variants, key=lambda c: c.estimate.memory_gib)
        kept = {None: 1.0, "selective": 0.5, "full": 0.0}[ref.activation_checkpointing]
        try:
            found = choose_styles(captured, dry_mesh(mesh), profile, budget_bytes=budget * 2 ** 30,
                                  total_bytes=ref.estimate.memory_gib * 2 ** 30, activations=kept,
                                  mp_dtype=ref.mp_dtype, blocks=blocks, memo=style_memo)
        except PlanError:
            found = None  # no style choice fits: the automatic plan's candidates say by how much
        timing["ilp"] += time.perf_counter() - t0
        if not found or all(k == 1 for k in found[1].picks):
            return ()  # every unit replicated: the tp dim would carry nothing (a smaller mesh, copied)
        return replicated_modules(*found)

    # Phase 1: every (tp, pp) with its data ranks all FSDP (the least memory of its data splits).
    # Phase 2: the other data splits (all dp; FSDP in the node, dp across) of the best TOP_TP_PP of them.
    meshes = _meshes(world_size, profile, len(blocks), batch, num_experts)
    shape = lambda m: (m.get("tp", 1), m.get("pp", 1), m.get("ep", 1))  # noqa: E731
    first = {}
    for mesh in meshes:
        if shape(mesh) not in first or mesh.get("fsdp", 1) > first[shape(mesh)].get("fsdp", 1):
            first[shape(mesh)] = mesh
    best: dict[tuple, float] = {}
    least: dict[tuple, float] = {}  # the least memory of any priced variant, per shape

    def record(since: int) -> None:
        for c in candidates[since:]:
            if c.estimate is not None:
                least[shape(c.mesh)] = min(least.get(shape(c.mesh), float("inf")), c.estimate.memory_gib)
                if c.fits:
                    best[shape(c.mesh)] = min(best.get(shape(c.mesh), float("inf")), c.estimate.step_s)

    # Per tp, pp grows while the pipeline gets faster: past the best pp the bubble, the point-to-point
    # transfers and FSDP's per-microbatch gathers only grow. While nothing fits, pp grows while the
    # least memory shrinks: at a fixed world size and global batch, more stages mean fewer data ranks
    # and a larger local batch, so a stage's state and its activations in flight stay about the same
    # (Llama-3 70B on 512, tp=8: 228.1, 228.6, 229.6, 231.6 GiB at pp=2, 4, 8, 16).
    for tp, ep in sorted({(k[0], k[2]) for k in first}):
        steps: list[tuple[int, float, float]] = []  # (pp, its best fitting step, its least memory), pp ascending
        where = f"tp={tp}" + (f", ep={ep}" if ep > 1 else "")
        for key in sorted(k for k in first if (k[0], k[2]) == (tp, ep)):
            if len(steps) >= 2 and steps[-1][1] > steps[-2][1]:
                candidates.append(Candidate(first[key], reason=f"not compiled: with {where}, pp={steps[-1][0]} was "
                                                               f"slower than pp={steps[-2][0]}"))
                continue
            if len(steps) >= 2 and steps[-1][1] == steps[-2][1] == float("inf") and steps[-2][0] > 1 \
                    and steps[-1][2] >= steps[-2][2]:
                candidates.append(Candidate(first[key], reason=f"not compiled: with {where}, nothing fits at "
                                                               f"pp={steps[-1][0]} and it needs no less memory than "
                                                               f"pp={steps[-2][0]}"))
                continue
            guess = _pipelined_memory(first[key], first.get((tp, 1, ep)), candidates, batch) if key[1] > 1 else None
            if guess is not None and guess * PIPELINE_MEMORY_SLACK > budget:
                candidates.append(Candidate(first[key], reason=f"not compiled: guessed from {where} without pp, "
                                                               f"pp={key[1]} would need about {guess:.1f} GiB"))
                continue
            since = len(candidates)
            evaluate(first[key])
            record(since)
            steps.append((key[1], best.get(key, float("inf")), least.get(key, float("inf"))))
    ranked = sorted(best, key=best.get)
    # only shapes close to the best: a data split moves a shape's step by FSDP's exposed gathers, not 25%
    finalists = [k for k in ranked[:TOP_TP_PP] if best[k] <= FINALIST_SLACK * best[ranked[0]]]
    for mesh in meshes:
        if shape(mesh) in finalists and mesh is not first[shape(mesh)]:
            evaluate(mesh)
    seconds.update(timing)
    priced = [c for c in candidates if c.estimate is not None]
    priced.sort(key=lambda c: (not c.fits, c.estimate.step_s if c.fits else c.estimate.memory_gib,
                               c.estimate.memory_gib))
    ordered = tuple(priced + [c for c in candidates if c.estimate is None])
    if not ordered or not ordered[0].fits:
        closest = ", ".join(f"{c.label} ({c.estimate.memory_gib:.1f} GiB)" for c in priced[:3]) or \
            "; ".join(f"{'x'.join(map(str, c.mesh.values()))}: {c.reason}" for c in candidates[:3])
        raise PlanError(f"no plan of {world_size} devices fits {budget:.1f} GiB per device; closest: {closest}; "
                        "use more devices, a larger memory_gib, or a smaller global batch")
    win = ordered[0]
    t0 = time.perf_counter()
    plan = Plan(tp=dict.fromkeys(win.replicate, "replicate"), auto_tp=True, schedule=win.schedule,
                microbatches=win.microbatches, pp=list(win.cuts) or None)
    if "pp" not in win.mesh and kept.get("key") == (tuple(win.mesh.items()), win.replicate, win.cuts):
        # Without a pipeline the resolved plan (styles, mesh) does not depend on the precision or the
        # checkpointing the winner was priced with: read it from the module its estimate came from.
        final = kept["pm"]
    else:  # a pipeline's schedule and microbatches are the winner's own: compile it as chosen
        final = compile_model(model, None, dry_mesh(win.mesh), example_inputs=inputs, example_kwargs=example_kwargs,
                              plan=plan, check=False, split_pp=_split_pp_dry, captured=captured,
                              mp_policy=_mp_policy(win.mp_dtype),
                              activation_checkpointing=win.activation_checkpointing)
    seconds["compile"] += time.perf_counter() - t0
    seconds["total"] = time.perf_counter() - start
    return AutoPlan(tuple(win.mesh.values()), tuple(win.mesh), final.plan, win.activation_checkpointing,
                    win.estimate.step_s, win.estimate.memory_gib, ordered, profile.name, budget, seconds,
                    _mp_policy(win.mp_dtype))
