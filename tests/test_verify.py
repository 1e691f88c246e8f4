"""fxpar.verify: tolerances from dtype and fan-in, the report, one optimizer step, and bisect."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxpar
from fxpar.testing.simulate import SimWorld
from fxpar.verify import default_tolerances, fan_in, working_dtype
from models import MLPStack, mse

from tests.models import tiny_gpt2

MEGATRON = {"layers.*.up": "colwise", "layers.*.down": "rowwise"}


def _compiled(model, mesh=None, plan=MEGATRON, shape=(4, 16), dtype=torch.float64):
    torch.manual_seed(0)
    model = model.to(dtype)
    x, y = torch.randn(*shape, dtype=dtype), torch.randn(*shape, dtype=dtype)
    world = SimWorld(mesh or {"tp": 2})
    return model, world, world.parallelize(model, example_inputs=(x,), plan=plan), x, y


def test_tolerances_come_from_the_dtype_and_grow_with_the_fan_in():
    assert default_tolerances(torch.float64) == (1e-10, 1e-12)
    assert default_tolerances(torch.float64, 4096) == (1e-10, 1e-12)  # rounding stays far below the bar
    r32, a32 = default_tolerances(torch.float32, 4096)
    assert r32 > default_tolerances(torch.float32)[0] and r32 == pytest.approx(8 * 2 ** -24 * 64)
    assert default_tolerances(torch.float32, 4) == default_tolerances(torch.float32)  # small: the base holds
    assert default_tolerances(torch.bfloat16, 10 ** 6)[0] > default_tolerances(torch.float16, 10 ** 6)[0]


def test_fan_in_is_the_largest_reduction_of_the_graph():
    model, world, pms, x, y = _compiled(MLPStack(dim=16, hidden=64), shape=(2, 3, 16))
    assert fan_in(pms[0].graph_module) == 64  # down's contraction over the hidden dim (global size)
    model, world, pms, x, y = _compiled(MLPStack(dim=16, hidden=32), shape=(10, 20, 16))
    assert fan_in(pms[0].graph_module) == 200  # a weight gradient sums over the 200 tokens


def test_tolerances_follow_the_working_precision_of_mixed_precision_graphs():
    class Rotary(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.up = nn.Linear(16, 16)
            self.register_buffer("table", torch.polar(torch.ones(8), torch.arange(8.0)))  # complex64

        def forward(self, x):
            z = torch.view_as_complex(self.up(x).reshape(*x.shape[:-1], 8, 2)) * self.table
            return torch.view_as_real(z).flatten(-2)

    model = Rotary().double()  # .double() leaves the complex64 table as it is
    x = torch.randn(4, 16, dtype=torch.float64)
    world = SimWorld({"tp": 2})
    pms = world.parallelize(model, example_inputs=(x,))
    assert working_dtype(pms[0].graph_module) == torch.float32
    reports = world.run(lambda r: fxpar.verify(model, pms[r], x))
    assert all(r.ok for r in reports)
    model, world, pms, x, y = _compiled(MLPStack(depth=1))
    assert working_dtype(pms[0].graph_module) == torch.float64


def test_the_report_names_every_tensor_by_original_fqn():
    model, world, pms, x, y = _compiled(MLPStack(depth=2))
    reports = world.run(lambda r: fxpar.verify(model, pms[r], x, target=y, loss_fn=mse))
    names = [t.name for t in reports[0].tensors]
    fqns = [n for n, _ in model.named_parameters()]
    assert names == [f"param {f}" for f in fqns] + ["output[0]", "loss"] + [f"grad {f}" for f in fqns] \
        + ["grad input[0]"]
    assert reports[0].ok and reports[0].bisect is None and reports[0].fan_in == 32
    assert str(reports[0]).startswith("verify: OK, 19 tensors compared")


def test_a_mismatch_is_reported_worst_first_with_where_and_how_much_and_strict_raises():
    model, world, pms, x, y = _compiled(MLPStack(depth=1))
    for pm in pms:
        with torch.no_grad():
            pm.graph_module.get_submodule("layers.0.down").bias.mul_(3)
    reports = world.run(lambda r: fxpar.verify(model, pms[r], x))
    worst = reports[0].worst[0]
    assert not reports[0].ok and worst.name == "param layers.0.down.bias"
    assert "(parallel = 3 x original throughout)" in worst.detail
    assert [t.name for t in reports[0].failed] == ["param layers.0.down.bias", "output[0]"]
    with pytest.raises(fxpar.FxparError, match="MISMATCH"):
        world.run(lambda r: fxpar.verify(model, pms[r], x, strict=True))


def test_one_optimizer_step_is_compared_and_the_parallel_parameters_are_restored():
    model, world, pms, x, y = _compiled(MLPStack(depth=2))
    before = [p.detach().clone() for p in pms[0].parameters()]
    reports = world.run(lambda r: fxpar.verify(model, pms[r], x, target=y, loss_fn=mse,
                                                optimizer=lambda ps: torch.optim.AdamW(ps, lr=0.1)))
    steps = [t for t in reports[0].tensors if t.name.endswith("(step)")]
    assert len(steps) == len(list(model.parameters())) and all(t.ok for t in steps)
    assert all(torch.equal(a, b) for a, b in zip(before, pms[0].parameters()))


def test_float32_passes_with_derived_tolerances_on_a_wide_model():
    model, world, pms, x, y = _compiled(MLPStack(dim=64, hidden=1024, depth=2), shape=(64, 64),
                                        dtype=torch.float32)
    reports = world.run(lambda r: fxpar.verify(model, pms[r], x, target=y, loss_fn=mse))
    assert all(r.ok for r in reports), reports[0]


def test_bisect_finds_nothing_on_a_correct_graph():
    model, world, pms, x, y = _compiled(MLPStack(depth=2))
    reports = world.run(lambda r: fxpar.verify(model, pms[r], x, target=y, loss_fn=mse, bisect=True))
    b = reports[0].bisect
    assert b.node is None and b.compared > 20 and "no node diverges" in str(reports[0])


class Scaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(16, 32), nn.Linear(32, 16)

    def forward(self, x):
        return self.down(F.relu(self.up(x)) * 0.5)


@pytest.mark.parametrize("mesh, placements, local", [({"tp": 2}, "[S(1)]", (4, 16)),
                                                     ({"dp": 2, "tp": 2}, "[S(0), S(1)]", (2, 16))])
def test_bisect_names_the_first_diverging_node_with_placements_and_pass(mesh, placements, local):
    model, world, pms, x, y = _compiled(Scaled(), mesh=mesh, plan={"up": "colwise", "down": "rowwise"})
    for pm in pms:
        mul = next(n for n in pm.graph_module.graph.nodes if n.target == torch.ops.aten.mul.Tensor)
        mul.args = (mul.args[0], 0.25)  # a wrong constant in the rewritten graph
        pm.graph_module.recompile()
    reports = world.run(lambda r: fxpar.verify(model, pms[r], x, target=y, loss_fn=mse, bisect=True))
    b = reports[0].bisect
    assert (b.node, b.direction, b.placements, b.origin) == ("mul", "forward", placements, "propagate_sharding")
    assert b.local_shape == local and b.shape == (4, 32)
    assert b.inputs == (f"%relu {placements}",) and b.module == ""
    assert "first diverging value: %mul = aten.mul.Tensor" in str(reports[0])


transformers = pytest.importorskip("transformers")


def _hf(name: str) -> nn.Module:
    T = transformers
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=128,
                 max_position_embeddings=64, use_cache=False, bos_token_id=0, eos_token_id=0)
    if name == "gpt2":
        return tiny_gpt2()
    if name == "llama":
        return T.LlamaForCausalLM(T.LlamaConfig(**small, num_key_value_heads=4)).eval()
    if name == "bert":
        small = {k: v for k, v in small.items() if k not in ("use_cache", "bos_token_id", "eos_token_id")}
        return T.BertForMaskedLM(T.BertConfig(**small)).eval()
    if name == "titan":
        from models import TitanLlama

        return TitanLlama(vocab=128, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden=64).eval()
    return T.Qwen2ForCausalLM(T.Qwen2Config(**small, num_key_value_heads=2)).eval()


def _ce(out, target):
    logits = out if isinstance(out, torch.Tensor) else out.logits if hasattr(out, "logits") else out[0]
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1))


@pytest.mark.parametrize("name", ["gpt2", "llama", "qwen2", "bert", "titan"])
def test_transformers_verify_and_bisect_names_a_planted_bug(name):
    """The models of the transformer work (tests/test_transformers.py), simulated on tp=2 in float64."""
    torch.manual_seed(0)
    model = _hf(name).double()
    ids, target = torch.randint(0, 128, (2, 8)), torch.randint(0, 128, (2, 8))
    world = SimWorld({"tp": 2})
    pms = world.parallelize(model, example_inputs=(ids,))
    reports = world.run(lambda r: fxpar.verify(model, pms[r], ids, target=target, loss_fn=_ce))
    assert all(r.ok for r in reports), reports[0]
    assert sum(t.name.startswith("grad ") for t in reports[0].tensors) == \
        len(list(model.named_parameters(remove_duplicate=False)))  # tied weights under each FQN
    # Plant: the first attention's softmax scale halved on every rank.
    for pm in pms:
        sdpa = next(n for n in pm.graph_module.graph.nodes
                    if n.target == torch.ops.aten.scaled_dot_product_attention.default)
        sdpa.kwargs = {**sdpa.kwargs, "scale": 0.5 / 8 ** 0.5}
        pm.graph_module.recompile()
    reports = world.run(lambda r: fxpar.verify(model, pms[r], ids, bisect=True))
    b = reports[0].bisect
    assert not reports[0].ok and b.node == sdpa.name and b.direction == "forward"
    assert b.target == "aten.scaled_dot_product_attention.default" and b.placements == "[S(1)]"
    assert "attn" in b.module or "attention" in b.module
