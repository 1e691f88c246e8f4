"""split_stages without processes: where the cuts go, what each stage holds, the cost model, bad input.

The pass runs in dry runs (no pp coordinate: every stage local) and on torch's
fake backend (a pp coordinate: other stages hold stand-ins).
"""

from __future__ import annotations

import operator

import pytest
import sympy
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import fxpar
from fxpar.core.mesh import MeshInfo
from fxpar.core.pass_api import PassContext
from fxpar.compiler import PassManager
from fxpar.core.stages import SCHEDULES, PipelineMeshInfo, resolve_stages, stage_info
from fxpar.analysis.schedule import bubble_fraction
from fxpar.analysis.cost import DeviceModel, balance, evaluate, node_cost

from tests.models import BlockStack, NormBlock, tiny_gpt2

aten = torch.ops.aten


class TiedLM(nn.Module):
    """Embedding, blocks, a head tied to the embedding."""

    def __init__(self, vocab: int = 64, dim: int = 16, depth: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList([NormBlock(dim, 2 * dim) for _ in range(depth)])
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def _split(model: nn.Module, x: torch.Tensor, plan: fxpar.Plan, pp: int | None = None) -> fx.GraphModule:
    """Runs the default passes (split_stages last) in a dry run: every stage stays on this process."""
    gm = fxpar.capture(model, (x,))
    ctx = PassContext(mesh=MeshInfo((), ()), plan=plan, options={"pp": PipelineMeshInfo(pp) if pp else None})
    return PassManager(fxpar.default_passes(), check=True).run(gm, ctx)


# --------------------------------------------------------------------------- balance


@pytest.mark.parametrize("stages", [2, 3, 4, 8])
def test_uniform_blocks_balance_and_cut_between_blocks(stages):
    gm = _split(BlockStack(depth=8), torch.randn(4, 8, 32), fxpar.Plan(pp=stages, schedule="gpipe"))
    split = stage_info(gm)
    assert split.num_stages == stages and split.balanced
    # 8 blocks over 3 stages is 3 / 3 / 2 at best: 3 / (8 / 3) = 1.125.
    assert split.balance_ratio <= 1.15, split.balance_ratio
    if 8 % stages == 0:
        assert split.balance_ratio == pytest.approx(1.0, abs=0.01)
    cuts = [s.cut_before for s in split.stages[1:]]
    assert all(c.startswith("blocks.") and c.count(".") == 1 for c in cuts), cuts
    # Every stage runs whole blocks: its first and last module are blocks, in order.
    firsts = [int(s.first_module.split(".")[1]) for s in split.stages]
    lasts = [int(s.last_module.split(".")[1]) for s in split.stages]
    assert firsts[0] == 0 and lasts[-1] == 7
    assert all(a == b + 1 for a, b in zip(firsts[1:], lasts[:-1]))


def test_split_graph_computes_the_original():
    torch.manual_seed(0)
    model = TiedLM()
    ids = torch.randint(0, 64, (4, 6))
    gm = _split(model, ids, fxpar.Plan(pp=2, schedule="1f1b"))
    torch.testing.assert_close(gm(ids), model(ids), rtol=0, atol=0)
    # The parent calls the stages in order and passes only tensors between them.
    calls = [n for n in gm.graph.nodes if n.op == "call_module"]
    assert [n.target for n in calls] == ["stage_0", "stage_1"]
    for n in gm.graph.nodes:
        if n.op == "call_function":
            assert n.target is operator.getitem and isinstance(n.meta["val"], torch.Tensor)
    # Another batch size: the stages keep the batch dim symbolic (microbatches need it).
    ids2 = torch.randint(0, 64, (2, 6))
    torch.testing.assert_close(gm(ids2), model(ids2), rtol=0, atol=0)


def test_each_stage_holds_only_its_parameters_under_original_fqns():
    model = TiedLM(depth=4)
    gm = _split(model, torch.randint(0, 64, (4, 6)), fxpar.Plan(pp=["blocks.2"], schedule="gpipe"))
    s0, s1 = gm.stage_0, gm.stage_1
    p0 = {n for n, _ in s0.named_parameters()}
    p1 = {n for n, _ in s1.named_parameters()}
    all_fqns = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    assert p0 <= all_fqns and p1 <= all_fqns
    assert any(n.startswith("blocks.0.") for n in p0) and not any(n.startswith("blocks.2.") for n in p0)
    assert any(n.startswith("blocks.3.") for n in p1) and not any(n.startswith("blocks.1.") for n in p1)
    # The tied embedding / head weight is held by both stages, and listed as tied.
    split = stage_info(gm)
    (tied_name, tied_stages), = split.tied
    assert tied_name in p0 and tied_name in p1 and tied_stages == (0, 1)
    assert split.stages[1].cut_before == "blocks.2" and not split.balanced
    # Stage 1 receives the residual stream and sends nothing back; outputs are made contiguous for p2p.
    placeholders = [n for n in s1.graph.nodes if n.op == "placeholder"]
    assert len(placeholders) == 1
    out0 = next(n for n in s0.graph.nodes if n.op == "output")
    assert all(a.target == aten.contiguous.default for a in out0.args[0])


def test_symbolic_sizes_are_recomputed_not_sent():
    class Flat(NormBlock):
        def forward(self, x):
            b, t, d = x.shape
            return x + self.down(F.gelu(self.up(x.reshape(b * t, d)))).view(b, t, d)

    class Viewing(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.ModuleList([Flat(16, 32) for _ in range(2)])

        def forward(self, x):
            for block in self.blocks:
                x = block(x)
            return x

    model = Viewing()
    gm = _split(model, torch.randn(4, 6, 16), fxpar.Plan(pp=2, schedule="gpipe"))
    s1 = gm.stage_1
    # Batch and sequence sizes are read off the received activation, not sent (a pipeline sends tensors only).
    (received,) = [n for n in s1.graph.nodes if n.op == "placeholder"]
    sizes = [n for n in s1.graph.nodes if n.target == aten.sym_size.int]
    assert sizes and all(n.args[0] is received for n in sizes)
    x = torch.randn(2, 3, 16)
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_cuts_carry_only_the_residual_stream(name):
    """Masks and rotary tables depend on sizes and buffers only: later stages recompute them, so each cut
    sends exactly the (B, T, D) activations, the analytical minimum."""
    T = pytest.importorskip("transformers")
    if name == "gpt2":
        model = tiny_gpt2(4)
    else:
        model = T.LlamaForCausalLM(T.LlamaConfig(num_hidden_layers=4, hidden_size=32, intermediate_size=64,
                                                 num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                                 use_cache=False))
    model.eval()  # dropout off: the split graph is run against the model below
    ids = torch.randint(0, 128, (4, 8))
    report = fxpar.plan(model, "pp=4", example_inputs=(ids,))
    split = stage_info(report.module.graph_module)
    for s in split.stages[1:]:
        assert len(s.inputs) == 1 and s.recv_bytes_value == 4 * 8 * 32 * 4, (s.index, s.inputs, s.recv_bytes_value)
    fxpar.check(report.module)
    gm = report.module.graph_module
    out = gm(ids)
    want = model(ids).logits
    torch.testing.assert_close(out[0] if isinstance(out, (tuple, list)) else out.logits, want)


def test_interleaved_and_v_schedules_place_stages_on_ranks():
    model = BlockStack(depth=8)
    x = torch.randn(4, 8, 32)
    loop = stage_info(_split(model, x, fxpar.Plan(schedule="interleaved_1f1b"), pp=2))
    assert loop.num_stages == 4 and [s.rank for s in loop.stages] == [0, 1, 0, 1]
    v = stage_info(_split(model, x, fxpar.Plan(schedule="zbv"), pp=2))
    assert [s.rank for s in v.stages] == [0, 1, 1, 0]


def test_stage_graphs_pass_the_invariant_checks_on_the_fake_backend(make_fake_mesh):
    mesh = make_fake_mesh((2, 2), ("pp", "tp"), rank=2)
    torch.manual_seed(0)
    model = BlockStack(depth=4, dim=16, hidden=32)
    plan = fxpar.Plan({"blocks.*.up": "colwise", "blocks.*.down": "rowwise"}, schedule="gpipe", microbatches=2)
    pm = fxpar.parallelize(model, mesh, example_inputs=(torch.randn(4, 16),), plan=plan)
    fxpar.check(pm)
    assert pm.split.local_stages == (1,) and len(pm.stage_modules) == 1
    # This rank holds stage 1's tensor-parallel shards only; stage 0 is a storage-free stand-in.
    local = {n: p.shape for n, p in pm.named_parameters()}
    assert local and all(n.startswith("stage_modules.0.blocks.2") or n.startswith("stage_modules.0.blocks.3")
                         for n in local)
    assert local["stage_modules.0.blocks.2.up.weight"] == (16, 16)
    stand_in = pm.graph_module.stage_0.get_parameter("blocks.0.up.weight")
    assert stand_in.shape == (16, 16) and stand_in.untyped_storage().nbytes() == 4
    text = pm.explain()
    assert "Pipeline: 2 stages on pp=2" in text and "cut 0->1 before 'blocks.2'" in text
    assert "expected bubble fraction" in text and "fwd all_reduce(tp, n=2)" in text


# --------------------------------------------------------------------------- cost model


def test_cost_model_is_symbolic_in_batch_and_sequence():
    gm = fxpar.capture(nn.Linear(32, 64), (torch.randn(4, 8, 32),))
    lin = next(n for n in gm.graph.nodes if n.target == aten.linear.default)
    cost = node_cost(lin)
    syms = sorted(cost.flops.free_symbols, key=str)
    assert len(syms) == 2  # batch and sequence
    b, t = syms
    assert sympy.expand(cost.flops - 2 * 32 * 64 * b * t) == 0
    hints = {s: 4 if i == 0 else 8 for i, s in enumerate(syms)}
    assert evaluate(cost.flops, hints) == 2 * 32 * 64 * 32
    # Bytes: x, weight, bias read, output written (float32).
    assert evaluate(cost.mem_bytes, hints) == 4 * (32 * 32 + 64 * 32 + 64 + 32 * 64)
    t_expr = DeviceModel().time(cost)
    assert t_expr.free_symbols == set(syms)


def test_balance_minimizes_the_slowest_stage_then_bytes():
    # Four equal units: two stages cut in the middle.
    assert balance([1, 1, 1, 1], [0, 0, 0, 0, 0], 2) == [2]
    assert balance([4, 1, 1, 1, 1], [0] * 6, 2) == [1]
    assert balance([1, 1, 1, 1, 1, 1], [0] * 7, 3) == [2, 4]
    # Equally balanced either way: the cut where fewer bytes cross wins.
    assert balance([2, 1, 1, 2], [0, 0, 9, 1, 0], 2, slack=0.0) == [2]
    # Within the slack, fewer bytes beat perfect balance; beyond it, they do not.
    assert balance([1, 1, 1, 1], [0, 5, 9, 1, 0], 2, slack=0.5) == [3]
    assert balance([1, 1, 1, 1], [0, 5, 9, 1, 0], 2, slack=0.05) == [2]
    with pytest.raises(ValueError):
        balance([1, 1], [0, 0, 0], 3)


def test_bubble_fraction_of_gpipe_matches_the_formula():
    from torch.distributed.pipelining.schedules import _Action, _ComputationType

    F_, B_ = _ComputationType.FORWARD, _ComputationType.FULL_BACKWARD
    p, m = 4, 8
    order = {r: [_Action(r, F_, i) for i in range(m)] + [_Action(r, B_, i) for i in range(m)] for r in range(p)}
    # F = 1, B = 2: busy 3m per rank; makespan 3m + 3(p - 1).
    assert bubble_fraction(order, p) == pytest.approx(1 - 3 * m / (3 * m + 3 * (p - 1)))


# --------------------------------------------------------------------------- bad input


def test_more_stages_than_blocks_is_a_schedule_error():
    with pytest.raises(fxpar.ScheduleError, match=r"only 4 blocks.*use at most 4 stages"):
        _split(BlockStack(depth=4, dim=16, hidden=32), torch.randn(4, 16), fxpar.Plan(pp=6, schedule="interleaved_1f1b"),
               pp=2)


def test_cut_point_that_names_no_module_lists_the_nearest():
    with pytest.raises(fxpar.PlanError, match=r"'blocks\.9' names no module.*blocks\.") as e:
        _split(BlockStack(depth=4, dim=16, hidden=32), torch.randn(4, 16), fxpar.Plan(pp=["blocks.9"]))
    assert isinstance(e.value, ValueError)


def test_cut_points_that_leave_a_stage_empty():
    with pytest.raises(fxpar.PlanError, match="would run no module's ops"):
        _split(BlockStack(depth=4, dim=16, hidden=32), torch.randn(4, 16), fxpar.Plan(pp=["blocks.0"]))


def test_static_batch_dim_is_a_schedule_error():
    with pytest.raises(fxpar.ScheduleError, match="static batch size 1"):
        _split(BlockStack(depth=2, dim=16, hidden=32), torch.randn(1, 16), fxpar.Plan(pp=2))


@pytest.mark.parametrize("plan, pp, match", [
    (fxpar.Plan(pp=3, schedule="1f1b"), 2, "do not divide over 2 pp ranks"),
    (fxpar.Plan(pp=4, schedule="1f1b"), 2, "runs 1 stage.*interleaved_1f1b"),
    (fxpar.Plan(pp=2, schedule="interleaved_1f1b"), 2, "two or more stages per rank"),
    (fxpar.Plan(pp=6, schedule="zbv"), 2, "runs 2 stage.*use 4 stages"),
    (fxpar.Plan(schedule="1f1b", microbatches=1), 2, "at least as many microbatches as stages"),
])
def test_stage_counts_that_do_not_fit_the_schedule(plan, pp, match):
    with pytest.raises(fxpar.ScheduleError, match=match):
        resolve_stages(plan, PipelineMeshInfo(pp))


def test_plan_pp_fields_are_validated():
    assert fxpar.Plan(pp=["a", "b"]).pp == ("a", "b")
    assert fxpar.Plan(schedule="Interleaved").schedule == "interleaved_1f1b"
    for bad in (dict(pp=0), dict(pp=["a", "a"]), dict(pp=[""]), dict(schedule="pipedream"), dict(microbatches=0)):
        with pytest.raises(fxpar.PlanError):
            fxpar.Plan(**bad)
    assert set(SCHEDULES) == set(fxpar.core.plan.PP_SCHEDULES)


def test_pipeline_plan_without_pp_mesh_dim(make_fake_mesh):
    mesh = make_fake_mesh((2,), ("tp",))
    with pytest.raises(fxpar.PlanError, match="has no 'pp' dim"):
        fxpar.parallelize(BlockStack(depth=2, dim=16, hidden=32), mesh, example_inputs=(torch.randn(4, 16),),
                          plan=fxpar.Plan(pp=2))
