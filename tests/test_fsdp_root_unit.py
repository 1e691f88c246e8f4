"""FSDP2's root unit under fsdp_unit='block' (issue 19): the parameters outside the blocks are one unit, kept.

torch's FSDP2 with `fully_shard` per block and then on the model puts the root's parameters (the tied
wte / lm_head, ln_f) in one group, gathered once at the start of the forward and not resharded after it
(its post_forward_mesh_info is None), reduce-scattered once at the end of the backward. fxpar's
`apply_fsdp` builds the same unit ("<root>"): one gather per parameter (a tied weight's serves all its
uses), consecutive (one collective), kept by the eager runtime and by the compiled partitioner.

Checked on a small tied GPT (no learned positions: see `TiedGPT`), 2 gloo ranks, float64: collectives per
training step equal to torch FSDP2's on the same model, counted the same way; outputs and gradients equal
to the unsplit model; the gathered-parameter peak within the in-flight estimate; and under
compile="aot_eager" the same numbers and the root's gather saved for the backward, not re-gathered.
"""

from __future__ import annotations

import collections
import copy
import dataclasses

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import Replicate

import fxpar
from benchmarks.models import GPT, ModelConfig, cross_entropy
from fxpar.analysis.invariants import check_graph
from fxpar.analysis.overlap import in_flight_estimate
from fxpar.core.spec import FSDP_ROOT_UNIT, get_info, set_info
from fxpar.testing import rank_pool

F64 = torch.float64
CFG = ModelConfig(kind="gpt2", layers=2, dim=32, heads=4, hidden=64, vocab=64, batch=4, seq=8, max_seq=16)
GATHER = torch.ops.fxpar.fsdp_all_gather.default
ROOT_PARAMS = {"ln_f.weight", "ln_f.bias", "lm_head.weight"}  # wte.weight is lm_head.weight (tied)


class TiedGPT(GPT):
    """The benchmark GPT-2 without learned positions: wte tied to lm_head, blocks `h`, ln_f.

    The full GPT-2 (`GPT`, with `wpe(arange(T))`, a lookup replicated on fsdp) is checked beside it: its
    position table joins the root unit (`insert_collectives._partial_gradient_cones`)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        del self.wpe

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.wte(ids)
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def _model_and_batch(cls=TiedGPT):
    torch.manual_seed(0)
    model = cls(CFG).to(F64).eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, CFG.vocab, (CFG.batch, CFG.seq), generator=g)
    return model, ids, torch.randint(0, CFG.vocab, (CFG.batch, CFG.seq), generator=g)


def test_root_parameters_are_one_unit_gathered_once_before_their_first_use():
    model, ids, _ = _model_and_batch()
    pm = fxpar.plan(model, {"fsdp": 2}, example_inputs=(ids[:2],)).module
    nodes = list(pm.graph_module.graph.nodes)
    gathers = [n for n in nodes if n.target is GATHER]
    root = [n for n in gathers if get_info(n).fsdp_bucket == FSDP_ROOT_UNIT]
    assert {str(n.args[0].target) for n in root} == ROOT_PARAMS  # the tied weight once, ln_f beside it
    assert len({get_info(n).fsdp_bucket for n in gathers}) == 1 + CFG.layers
    # consecutive among the gathers (one collective), all before the first use of any of them
    at = [gathers.index(n) for n in root]
    assert at == list(range(at[0], at[0] + len(root)))
    first_use = min(nodes.index(u) for n in root for u in n.users)
    assert max(nodes.index(n) for n in root) < first_use
    tied = next(n for n in root if str(n.args[0].target) == "lm_head.weight")
    assert sorted(str(u.target) for u in tied.users) == ["aten.embedding.default", "aten.linear.default"]
    text = pm.explain()
    assert "run as 3 collectives each way" in text and "the root unit (3 parameters outside the blocks" in text


def test_position_table_joins_the_root_unit():
    """GPT-2's `wpe(arange(T))` is a lookup replicated on fsdp (its indices are not batch-sharded) feeding
    the batch-sharded token embedding: the gradient reaching it is each rank's batch share, which the root
    unit's reduce-scatter sums. So at T >= half the table's rows (here 8 of 16) wpe is gathered and
    reduce-scattered with the root, with no plain all_gather of the table and no all-reduce of the lookup's
    gradient (FSDP2's root holds wpe alike)."""
    model, ids, _ = _model_and_batch(GPT)
    pm = fxpar.plan(model, {"fsdp": 2}, example_inputs=(ids[:2],)).module
    nodes = list(pm.graph_module.graph.nodes)
    root = [n for n in nodes if n.target is GATHER and get_info(n).fsdp_bucket == FSDP_ROOT_UNIT]
    assert {str(n.args[0].target) for n in root} == ROOT_PARAMS | {"wpe.weight"}
    others = collections.Counter(str(n.target) for n in nodes if n.target in (
        torch.ops.fxpar.all_gather.default, torch.ops.fxpar.grad_all_reduce.default))
    assert not others, others
    # fxpar.check's dual invariant takes the sum at the unit's reduce-scatter; a replicated reader of the
    # lookup (here: the graph's output) would get a full gradient added to the partial ones: refused
    check_graph(pm.graph_module, pm.mesh_info, frozenset({"specs", "collectives"}))
    wpe = next(n for n in root if str(n.args[0].target) == "wpe.weight")
    lookup = next(iter(wpe.users))
    out = next(n for n in nodes if n.op == "output")
    out.args = ((out.args[0], lookup),)
    info = get_info(out)
    set_info(out, dataclasses.replace(info, input_placements=(*info.input_placements, (Replicate(),))))
    with pytest.raises(fxpar.GraphInvariantError, match=f"consumes %{lookup.name} as Replicate on mesh dim 'fsdp'.*partial sum"):
        check_graph(pm.graph_module, pm.mesh_info, frozenset({"specs", "collectives"}))
    # with one gather per parameter (fsdp_unit='param') there is no unit to sum in; and a sequence shorter than
    # half the table (4 of 16 rows) would reduce-scatter more bytes than the all-reduce of the rows it uses:
    # both keep the table's plain gather and that all-reduce
    for kwargs, x in (({"fsdp_unit": "param"}, ids[:2]), ({}, ids[:2, :4])):
        pm = fxpar.plan(model, {"fsdp": 2}, example_inputs=(x,), **kwargs).module
        targets = collections.Counter(n.target for n in pm.graph_module.graph.nodes)
        assert targets[torch.ops.fxpar.all_gather.default] == 1, kwargs
        assert targets[torch.ops.fxpar.grad_all_reduce.default] == 1, kwargs


def _positions_on(shape, names) -> dict:
    mesh = torch.distributed.device_mesh.init_device_mesh("cpu", shape, mesh_dim_names=names)
    model, ids, tgt = _model_and_batch(GPT)
    pm = fxpar.parallelize(copy.deepcopy(model), mesh, example_inputs=(ids,), check=True)
    fxpar.check(pm)
    joined = any(n.target is GATHER and str(n.args[0].target) == "wpe.weight" for n in pm.graph_module.graph.nodes)
    loss = pm.step(ids, target=tgt, loss_fn=cross_entropy)
    ref = copy.deepcopy(model)
    ref_loss = cross_entropy(ref(ids), tgt)
    ref_loss.backward()
    grads = pm.full_grads()
    # relative to the largest gradient: a key bias's is 0 up to rounding (softmax ignores a shift), and the
    # sums over dp and fsdp add in another order than the unsplit model's
    scale = max(p.grad.abs().max().item() for p in ref.parameters())
    return {"joined": joined, "loss_err": abs(loss.item() - ref_loss.item()),
            "grad_err": max((grads[k] - p.grad).abs().max().item() for k, p in ref.named_parameters()) / scale}


@pytest.mark.parametrize("shape,names", [((2, 2), ("dp", "fsdp")), ((2, 2), ("fsdp", "tp"))], ids=["hsdp", "fsdpxtp"])
def test_position_table_in_the_root_unit_is_exact_beside_dp_and_tp(shape, names):
    """The table's gradient, partial on fsdp, is summed over fsdp by the root's reduce-scatter and over dp by
    the runtime's sync (HSDP), or beside tp's own collectives: equal to the unsplit model in float64."""
    for r in rank_pool(4).run(_positions_on, shape, names, timeout=300):
        assert r["joined"], r
        assert r["loss_err"] <= 1e-13 and r["grad_err"] <= 1e-12, r


@pytest.mark.slow  # the old path: tests/test_fsdp_compile.py and test_hsdp_memory keep fsdp_unit='param' cases
def test_fsdp_unit_param_keeps_one_gather_per_use():
    model, ids, _ = _model_and_batch()
    pm = fxpar.plan(model, {"fsdp": 2}, example_inputs=(ids[:2],), fsdp_unit="param").module
    gathers = [n for n in pm.graph_module.graph.nodes if n.target is GATHER]
    assert all(get_info(n).fsdp_bucket is None for n in gathers)
    assert sum(str(n.args[0].target) == "lm_head.weight" for n in gathers) == 2  # per block, as before


def _torch_fsdp2_counts(mesh, model, ids, tgt) -> collections.Counter:
    """torch FSDP2: fully_shard per block then the root, each rank its batch shard; a warm step, then counted."""
    from benchmarks.harness import CommBytesMode
    from torch.distributed.fsdp import fully_shard

    for block in model.h:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    r, b = dist.get_rank(), CFG.batch // dist.get_world_size()
    x, y = ids[r * b:(r + 1) * b], tgt[r * b:(r + 1) * b]
    cross_entropy(model(x), y).backward()
    with CommBytesMode(track_modules=False) as mode:
        cross_entropy(model(x), y).backward()
    return collections.Counter((c.op, c.direction) for c in mode.records)


def _eager_case(cls=TiedGPT) -> dict:
    from fxpar.runtime.fsdp_state import peak_gathered_bytes, reset_peak_gathered_bytes

    mesh = torch.distributed.device_mesh.init_device_mesh("cpu", (2,), mesh_dim_names=("fsdp",))
    model, ids, tgt = _model_and_batch(cls)
    pm = fxpar.parallelize(copy.deepcopy(model), mesh, example_inputs=(ids,))
    fxpar.check(pm)
    pm.step(ids, target=tgt, loss_fn=cross_entropy)  # warm: the first step also exchanges fingerprints
    for p in pm.parameters():
        p.grad = None
    reset_peak_gathered_bytes()
    hooked = []  # gradients autograd hands a shard: none, a bucket's shards get theirs from its reduce-scatter
    handles = [p.register_hook(lambda g: hooked.append(g) if g is not None else None) for p in pm.parameters()]
    posted = []  # post-accumulate-grad hooks (optimizer-in-backward): run once the reduce-scattered .grad is in
    handles += [p.register_post_accumulate_grad_hook(lambda q: posted.append((q, q.grad.clone())))
                for p in pm.parameters()]
    with fxpar.count_comms() as comms:
        loss = pm.step(ids, target=tgt, loss_fn=cross_entropy)
    for h in handles:
        h.remove()
    first = [p.grad.clone() for p in pm.parameters()]
    posted_once = sorted(id(q) for q, _ in posted) == sorted(id(p) for p in pm.parameters()) and all(
        torch.equal(g, q.grad) for q, g in posted)
    storages = {p.grad.untyped_storage().data_ptr() for p in pm.parameters()}
    pm.step(ids, target=tgt, loss_fn=cross_entropy)  # accumulated into the views, as into any .grad
    doubled = all(torch.equal(p.grad, 2 * g) for p, g in zip(pm.parameters(), first))
    for p, g in zip(pm.parameters(), first):
        p.grad = g
    ref = copy.deepcopy(model)
    ref_loss = cross_entropy(ref(ids), tgt)
    ref_loss.backward()
    grads = pm.full_grads()
    with torch.no_grad():
        out_err = (pm(ids) - ref(ids)).abs().max().item()
    return {"mine": collections.Counter((c.op, c.direction) for c in comms),
            "theirs": _torch_fsdp2_counts(mesh, copy.deepcopy(model), ids, tgt),
            "loss_err": abs(loss.item() - ref_loss.item()), "out_err": out_err,
            "grad_err": max((grads[k] - p.grad).abs().max().item() / p.grad.abs().max().item()
                            for k, p in ref.named_parameters()),
            "peak": peak_gathered_bytes(), "estimate": in_flight_estimate(pm.graph_module),
            "hooked": len(hooked), "grad_storages": len(storages), "buckets": len(pm._fsdp_buckets),
            "doubled": doubled, "posted_once": posted_once,
            "root_bytes": sum(p.numel() * 8 for k, p in ref.named_parameters()
                              if k in ROOT_PARAMS | {"wte.weight", "wpe.weight"})}


# pm.step's global loss: an all-reduce of the loss value FSDP2's side does not make (it returns the local one)
LOSS_REDUCE = ("all_reduce", "forward")


@pytest.mark.parametrize("cls", [TiedGPT, GPT], ids=["tied", "positions"])
def test_eager_step_issues_torch_fsdp2s_collectives_and_equals_the_unsplit_model(cls):
    for r in rank_pool(2).run(_eager_case, cls, timeout=300):
        mine = r["mine"]
        assert mine.pop(LOSS_REDUCE) == 1, r
        # root + 2 blocks gathered, 2 blocks re-gathered (the root is kept), root + 2 blocks reduce-scattered
        assert mine == r["theirs"] == {("all_gather", "forward"): 3, ("all_gather", "backward"): 2,
                                       ("reduce_scatter", "backward"): 3}, r
        assert r["loss_err"] <= 1e-13 and r["out_err"] <= 1e-13 and r["grad_err"] <= 1e-12, r
        assert r["root_bytes"] <= r["peak"] <= r["estimate"], r
        # no zeros from autograd: each shard's .grad is a view of its unit's reduce-scatter output (FSDP2's
        # sharded gradients), and a second backward adds into it exactly
        assert r["hooked"] == 0 and r["grad_storages"] == r["buckets"] == 3 and r["doubled"], r
        # post-accumulate-grad hooks run once per shard, with its final gradient (FSDP2 runs them the same way)
        assert r["posted_once"], r


def _compiled_case() -> dict:
    from functorch.compile import make_boxed_func, min_cut_rematerialization_partition
    from torch._dynamo.backends.common import aot_autograd

    from fxpar._torch.c10d import functional as funcol
    from fxpar.ops.traceable import traceable_graph_module
    from fxpar.ops.traceable_fsdp import fsdp_group_names, reshard_fsdp_gathers, traceable_fsdp_graph_module

    mesh = torch.distributed.device_mesh.init_device_mesh("cpu", (2,), mesh_dim_names=("fsdp",))
    model, ids, tgt = _model_and_batch()
    out = {}
    # pm itself, compiled: values equal to the unsplit model
    pm = fxpar.parallelize(copy.deepcopy(model), mesh, example_inputs=(ids,), compile="aot_eager")
    loss = pm.step(ids, target=tgt, loss_fn=cross_entropy)
    ref = copy.deepcopy(model)
    ref_loss = cross_entropy(ref(ids), tgt)
    ref_loss.backward()
    grads = pm.full_grads()
    out["loss_err"] = abs(loss.item() - ref_loss.item())
    out["grad_err"] = max((grads[k] - p.grad).abs().max().item() / p.grad.abs().max().item()
                          for k, p in ref.named_parameters())
    # the graphs AOT autograd hands the compiler, partitioned by min-cut (inductor's): the collectives per step
    pm = fxpar.parallelize(copy.deepcopy(model), mesh, example_inputs=(ids,))
    lowered = traceable_fsdp_graph_module(traceable_graph_module(pm.graph_module))
    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm)
        return make_boxed_func(gm)

    backend = aot_autograd(fw_compiler=keep, bw_compiler=keep, partition_fn=min_cut_rematerialization_partition)
    compiled = torch.compile(lowered, backend=backend, dynamic=False)
    r, b = dist.get_rank(), CFG.batch // 2
    with reshard_fsdp_gathers(fsdp_group_names(lowered), reshard=True):
        cross_entropy(compiled(ids), tgt[r * b:(r + 1) * b]).backward()
    # on gloo a unit's reduce-scatter is an all-to-all and a sum (fxpar.ops.traceable.reduce_scatter_flat)
    ops = {funcol.all_gather_into_tensor.default: "all_gather", funcol.reduce_scatter_tensor.default: "reduce_scatter",
           funcol.all_to_all_single.default: "reduce_scatter"}
    out["counts"] = collections.Counter((ops[n.target], direction) for gm, direction in zip(graphs, ("forward", "backward"))
                                        for n in gm.graph.nodes if n.target in ops)
    return out


@pytest.mark.slow  # two compiles of a GPT step (about 25 s); the eager case above keeps the counts and values
def test_compiled_step_keeps_the_root_unit_and_equals_the_unsplit_model():
    for r in rank_pool(2).run(_compiled_case, timeout=300):
        assert r["loss_err"] <= 1e-13 and r["grad_err"] <= 1e-12, r
        # the blocks re-gathered in the backward, the root saved from the forward: FSDP2's 8 collectives
        assert r["counts"] == {("all_gather", "forward"): 3, ("all_gather", "backward"): 2,
                               ("reduce_scatter", "backward"): 3}, r
