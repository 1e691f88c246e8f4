"""explain(): collectives per transformer block, for the example sizes or any other."""

from __future__ import annotations

import pytest
import torch

import fxpar
from fxpar.core.fmt import fmt_bytes

transformers = pytest.importorskip("transformers")


def test_per_block_collectives_for_given_batch_and_sequence(make_fake_mesh):
    mesh = make_fake_mesh((2,), ("tp",))
    T = transformers
    model = T.LlamaForCausalLM(T.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=4, vocab_size=128,
                                             max_position_embeddings=64, use_cache=False, bos_token_id=0,
                                             eos_token_id=0)).eval()
    pm = fxpar.parallelize(model, mesh, example_inputs=(torch.randint(0, 128, (2, 8)),))
    text = pm.explain()
    # 2 x 8 tokens x 32 hidden x 4 bytes = 2 KiB per all-reduce
    assert "  model.layers.0: bwd all_reduce x2 4.00 KiB; fwd all_reduce x2 4.00 KiB" in text
    assert "  model.layers.1: bwd all_reduce x2 4.00 KiB; fwd all_reduce x2 4.00 KiB" in text
    # the same compiled module, priced for 8 x 1024 tokens: 1 MiB per all-reduce
    big = pm.explain(torch.zeros(8, 1024, dtype=torch.long))
    assert "  model.layers.0: bwd all_reduce x2 2.00 MiB; fwd all_reduce x2 2.00 MiB" in big
    assert "Fallbacks (ops without a sharding rule, run replicated): 0" in big


# --------------------------------------------------------------------------- the FSDP backward, per unit

def _fsdp_explain(**kwargs) -> list[str]:
    from tests.models import BlockStack

    pm = fxpar.plan(BlockStack(), {"fsdp": 2}, example_inputs=(torch.randn(8, 4, 32),), **kwargs).module
    text = pm.explain()
    assert "each block's re-gather issued during the block after it" not in text  # the old fixed sentence
    section = text.split("FSDP backward per unit")[1].split("\n\n")[0].splitlines()
    return pm, section[1:]


def test_fsdp_backward_per_unit_names_each_issue_wait_and_the_compute_between():
    pm, units = _fsdp_explain()
    assert [u.split(":")[0].strip() for u in units] == ["blocks.3", "blocks.2", "blocks.1", "blocks.0"]
    # the last block: nothing prefetches it, its re-gather blocks before its first matmul's backward (down)
    assert units[0].startswith("  blocks.3: re-gather (32.88 KiB) blocking, before the backward of %linear_7;")
    module = {n.name: n.meta["fxpar"].module_fqn for n in pm.graph_module.graph.nodes if "fxpar" in n.meta}
    for k, line in zip((3, 2, 1, 0), units):
        regather, rs = line.split("; reduce-scatter ")
        if k < 3:  # issued once half of block k+1's gradients are in, waited at block k's down projection
            up = f"linear_{2 * (k + 1)}"  # block k+1's up projection: its backward comes after its down's
            assert f"re-gather (32.88 KiB) issued after the backward of %{up} (half of blocks.{k + 1}'s " \
                   f"gradients), waited before the backward of %linear_{2 * k + 1}: under it 2 backward ops of " \
                   f"blocks.{k + 1}.norm, blocks.{k}" in regather, regather
            assert module[up] == f"blocks.{k + 1}.up" and module[f"linear_{2 * k + 1}"] == f"blocks.{k}.down"
        norm = f"layer_norm_{k}" if k else "layer_norm"
        assert rs.startswith(f"(32.88 KiB) issued after the backward of %{norm} (blocks.{k}'s last gradient), ")
        if k > 1:  # in flight during half of block k-1's backward, waited when block k-2's re-gather is issued
            assert f"waited when blocks.{k - 2}'s re-gather is issued: under it 4 backward ops of " \
                   f"blocks.{k - 1}, blocks.{k - 1}.down, blocks.{k - 1}.up" in rs, rs
        elif k:  # block 0 prefetches nothing: in flight during its whole backward, waited when its own is issued
            assert "waited when blocks.0's reduce-scatter is issued: under it 5 backward ops of " \
                   "blocks.0, blocks.0.down, blocks.0.up, blocks.0.norm" in rs, rs
        else:
            assert rs.endswith("waited at the end of the backward: no compute under it"), rs


def test_fsdp_backward_per_unit_without_overlap_and_kept_gathered():
    from fxpar.passes import schedule_overlap

    _, units = _fsdp_explain(passes=[p for p in fxpar.default_passes() if p is not schedule_overlap])
    assert len(units) == 4 and all(u.count("blocking") == 2 and "under it" not in u for u in units), units
    assert "reduce-scatter (32.88 KiB) blocking, after the backward of %layer_norm_2" in units[1]
    _, units = _fsdp_explain(reshard_after_forward=False)
    assert all("no re-gather (kept gathered from the forward: reshard_after_forward=False)" in u for u in units)
    assert all("reduce-scatter (32.88 KiB) issued after" in u for u in units)


# --------------------------------------------------------------------------- compiled modules (inductor's order)

def _traced(name: str) -> str:
    return f'  File "<eval_with_key>.3", line 9, in forward\n    {name} = fxpar_ops_traceable_fsdp_fsdp_gather_unit(2)'


def test_compiled_schedule_names_each_collectives_wait_and_the_kernels_between():
    from types import SimpleNamespace

    from fxpar._torch.inductor import ScheduledNode
    from fxpar.analysis.compiled_schedule import build_schedule, compiled_schedule_lines

    def node(name, kind, op="", *, writes=(), reads=(), args=(), nbytes=0, traced="", modules=()):
        return ScheduledNode(name, kind, op, (), nbytes, args, frozenset(reads), frozenset(writes),
                             (_traced(traced),) if traced else (), modules)

    ag, rs, wait = ("_c10d_functional.all_gather_into_tensor.default", "_c10d_functional.reduce_scatter_tensor.default",
                    "_c10d_functional.wait_tensor.default")
    order = [node("op0", "compute", modules=("blocks.0.norm",)),
             node("op1", "collective", ag, writes={"buf1"}, args=("2", "g0"), nbytes=4416,
                  traced="fsdpgather_unit_blocks_1"),
             node("op2", "nop", traced="fsdpgather_unit_blocks_1"),
             node("op3", "compute", "extern_kernels.addmm", modules=("blocks.0.up",)),
             node("op4", "compute", modules=("blocks.0",)),
             node("op5", "wait", wait, reads={"buf1"}),
             node("op6", "collective", rs, writes={"buf6"}, args=("sum", "2", "g0"), nbytes=8832,
                  traced="fsdpgather_unit_blocks_0"),
             node("op7", "wait", wait, reads={"buf6", "buf1"})]
    labels = {"fsdpgather_unit_blocks_1": "fsdp unit blocks.1", "fsdpgather_unit_blocks_0": "fsdp unit blocks.0"}
    s = build_schedule(order, "backward", labels, {"g0": "fsdp"})
    assert s.kernels == 3 and [c.what for c in s.collectives] == ["blocks.1", "blocks.0"]
    gather, scatter = s.collectives
    assert (gather.op, gather.mesh_dim, gather.nbytes, gather.issue, gather.wait) == \
        ("all_gather_into_tensor", "fsdp", 4416, "op1", "op5")
    assert (gather.issue_at, gather.wait_at) == (1, 4)  # the no-op view kernel is not counted
    assert gather.kernels == ("op3 extern_kernels.addmm", "op4") and gather.modules == ("blocks.0.up", "blocks.0")
    assert (scatter.wait, scatter.kernels) == ("op7", ())
    assert [e[0] for e in s.order] == [ag, rs]  # what check_compiled_order compares across ranks

    pm = SimpleNamespace(compile_backend="inductor")
    assert "not recorded yet" in "\n".join(compiled_schedule_lines(pm))
    pm.compiled_schedules = {"backward": s}
    lines = compiled_schedule_lines(pm)
    assert "  backward graph: 3 compute kernels, 2 collectives" in lines
    assert "    all_gather_into_tensor(fsdp) of blocks.1 (4.31 KiB): issued at op1 (kernel 1), waited at op5 " \
           "(kernel 4): under it 2 compute kernels (1 extern: addmm) of blocks.0.up, blocks.0" in lines
    assert "    reduce_scatter_tensor(fsdp) of blocks.0 (8.62 KiB): issued at op6 (kernel 5), waited at op7 " \
           "(kernel 6): nothing under it (waited at once)" in lines


def test_compiled_module_before_its_first_step_says_so(make_fake_mesh):
    from tests.models import BlockStack

    mesh = make_fake_mesh((2,), ("fsdp",))
    pm = fxpar.parallelize(BlockStack(), mesh, example_inputs=(torch.randn(8, 4, 32),), compile=True)
    text = pm.explain()
    assert "Compiled schedule (torch.compile backend 'inductor'" in text and "not recorded yet" in text
    # the eager runtime's prefetch and backward are not what runs: not described
    assert "Overlap (fxpar.passes.schedule_overlap" not in text and "FSDP backward per unit" not in text


def _compiled_fsdp_schedule():
    import re

    from torch._inductor.utils import run_and_get_code

    from fxpar.analysis.compiled_schedule import compiled_schedules
    from fxpar.analysis.timeline import rank_timeline
    from tests.models import BlockStack, mse

    mesh = torch.distributed.device_mesh.init_device_mesh("cpu", (2,), mesh_dim_names=("fsdp",))
    torch.manual_seed(0)
    model = BlockStack(2, 16, 32).double()
    x = torch.randn(4, 8, 16, dtype=torch.float64)
    pm = fxpar.parallelize(model, mesh, example_inputs=(x,), compile=True)
    before = pm.explain()
    before_title = rank_timeline(pm).title
    _, codes = run_and_get_code(lambda: pm.step(x, target=torch.randn_like(x), loss_fn=mse))
    block_bytes = sum(p.numel() * p.element_size() for p in model.blocks[0].parameters())
    # the calls of each compiled graph's generated code, in order: what the recorder must have seen last
    calls = [re.findall(r"(extern_kernels\.\w+|_c10d_functional\.\w+)\.?\w*\(", code[code.index("def call("):])
             for code in codes]
    return dict(before=before, after=pm.explain(), schedules=dict(compiled_schedules(pm)), block_bytes=block_bytes,
                calls=calls, before_title=before_title, timeline=rank_timeline(pm))


@pytest.mark.slow  # inductor's C++ compile of a forward and a backward on 2 gloo ranks: about 40 s
def test_compiled_fsdp_explain_shows_inductors_order_forward_and_backward():
    from fxpar.testing import rank_pool

    results = rank_pool(2).run(_compiled_fsdp_schedule, timeout=600)
    for r in results:
        assert "not recorded yet" in r["before"] and "not recorded yet" not in r["after"]
        fwd, bwd = r["schedules"]["forward"], r["schedules"]["backward"]
        shard, full = r["block_bytes"] // 2, r["block_bytes"]
        assert [(c.op, c.what, c.mesh_dim, c.nbytes) for c in fwd.collectives] == [
            ("all_gather_into_tensor", "blocks.0", "fsdp", shard), ("all_gather_into_tensor", "blocks.1", "fsdp", shard)]
        # the forward: block 1's gather in flight while block 0 computes (its matmuls among the kernels under it)
        under = fwd.collectives[1]
        assert any("addmm" in k for k in under.kernels) and any(m.startswith("blocks.0.") for m in under.modules)
        # the backward: block 0 re-gathered before block 1's reduce-scatter is issued (prefetch_fsdp_gathers), and
        # each reduce-scatter (full flat gradients in, shards out; on gloo an all-to-all and a sum of the blocks
        # received, fxpar.ops.traceable.reduce_scatter_flat) waited after its issue
        assert [(c.op, c.what) for c in bwd.collectives] == [
            ("all_gather_into_tensor", "blocks.1"), ("all_gather_into_tensor", "blocks.0"),
            ("all_to_all_single", "blocks.1"), ("all_to_all_single", "blocks.0")]
        assert [c.nbytes for c in bwd.collectives] == [shard, shard, full, full]
        assert all(c.wait and c.issue_at < c.wait_at for c in (*fwd.collectives, *bwd.collectives))
        rs1 = bwd.collectives[2]
        assert rs1.kernels and any(m.startswith("blocks.0") for m in rs1.modules)  # block 0's backward under it
        assert f"    all_gather_into_tensor(fsdp) of blocks.1 ({fmt_bytes(shard)}): issued at {under.issue} " \
               f"(kernel {under.issue_at}), waited at {under.wait}" in r["after"]
        assert "FSDP backward per unit" not in r["after"]  # the eager runtime's backward is not what runs
        # the recorded order is the order the generated code runs: extern kernels, collectives and waits
        recorded = [[op.rsplit(".", 1)[0] if op.startswith("_c10d") else op for op in s.ops if op]
                    for s in (fwd, bwd)]
        assert recorded == r["calls"], (recorded, r["calls"])
        assert [c.split(".")[1] for c in r["calls"][1] if c.startswith("_c10d")].count("wait_tensor") == 4
        assert sum(c.startswith("extern_kernels.") for c in r["calls"][1]) >= 6  # the backward's matmuls
        # the timeline draws that order: before the step the eager graph, after it each recorded collective on the
        # comm lane in order with its bytes, and under it the kernels explain() lists; every kernel costed
        assert "compiled kernel order is shown once the module has run" in r["before_title"]
        t, recorded = r["timeline"], [(role, c) for role in ("forward", "backward") for c in (fwd, bwd)[
            role == "backward"].collectives]
        assert "inductor's kernel order of the compiled forward and backward graphs" in t.title
        assert [(b.label, b.nbytes) for b in t.lane("comm")] == [
            (f"{c.op}({c.mesh_dim}) of {c.what} ({role} graph)", c.nbytes) for role, c in recorded]
        assert [(o.issue, o.wait, o.ops) for o in t.overlaps] == [
            (f"{role}.{c.issue}", f"{role}.{c.wait}", tuple(f"{role}.{k.split()[0]}" for k in c.kernels))
            for role, c in recorded]
        assert all(o.start <= o.end for o in t.overlaps)
        assert all(k.cost is not None and k.cost[1] > 0 for s in (fwd, bwd) for k in s.steps if k.kind == "compute")
        assert len([b for b in t.lane("compute") if b.kind in ("forward", "backward")]) == fwd.kernels + bwd.kernels
    assert [s.order for s in results[0]["schedules"].values()] == [s.order for s in results[1]["schedules"].values()]
