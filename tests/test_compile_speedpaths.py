"""compile=True speed paths: what inductor gets to see of a tp graph, and that it stays exact.

The vocab-parallel lookup reaches the compiler as plain torch ops (`tp_vocab_parallel_embedding`), not
as the opaque `fxpar::vocab_parallel_embedding` custom op that ran eagerly inside the compiled graph.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxpar
from fxpar.ops.traceable import tp_vocab_parallel_embedding, traceable_graph_module
from fxpar.testing import rank_pool
from tests.models import NormBlock

_VPE = "fxpar.vocab_parallel_embedding.default"


class TinyLM(nn.Module):
    """Token + position embeddings summed, two pre-norm blocks, a head tied to the token table (GPT's shape)."""

    def __init__(self, vocab: int = 32, dim: int = 16, seq: int = 8, padding_idx: int | None = None) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, dim, padding_idx=padding_idx)
        self.wpe = nn.Embedding(seq, dim)
        self.blocks = nn.ModuleList([NormBlock(dim, 2 * dim) for _ in range(2)])
        self.ln = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.wte(idx) + self.wpe(torch.arange(idx.size(1), device=idx.device))
        for block in self.blocks:
            h = block(h)
        return self.lm_head(self.ln(h))


def _ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), target.flatten())


def _lm(padding_idx):
    torch.manual_seed(0)
    model = TinyLM(padding_idx=padding_idx).double()
    idx = torch.randint(0, 32, (4, 8))
    if padding_idx is not None:
        idx[:, -2:] = padding_idx  # the padding row is looked up: its gradient must stay zero
    return model, idx, torch.randint(0, 32, (4, 8))


def _compiled_lm_vs_eager(backend, padding_idx):
    from torch._inductor.utils import run_and_get_code

    mesh = torch.distributed.device_mesh.init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))
    model, idx, target = _lm(padding_idx)
    eager = fxpar.parallelize(model, mesh, example_inputs=(idx,))
    compiled = fxpar.parallelize(model, mesh, example_inputs=(idx,), compile=backend)
    before = sum(str(n.target) == _VPE for n in compiled.graph_module.graph.nodes)
    after = sum(str(n.target) == _VPE for n in traceable_graph_module(compiled.graph_module).graph.nodes)
    losses = [float(pm.step(idx, target=target, loss_fn=_ce)) for pm in (eager, compiled)]
    worst = 0.0
    for (name, a), (_, b) in zip(eager.named_parameters(), compiled.named_parameters()):
        worst = max(worst, float((a.grad - b.grad).abs().max() / a.grad.abs().max().clamp_min(1e-30)))
    with torch.no_grad():
        want = eager(idx)
        got, codes = run_and_get_code(lambda: compiled(idx)) if backend is True else (compiled(idx), [])
    _ce(model(idx), target).backward()  # the unsplit model (its padding row's lookups add no gradient)
    ref = model.wte.weight.grad
    table = float((compiled.full_grads()["wte.weight"] - ref).abs().max() / ref.abs().max())
    return {"vpe_nodes": (before, after), "losses": losses, "worst_grad": worst,
            "out": float((want - got).abs().max() / want.abs().max()), "codes": codes, "table_grad": table}


@pytest.mark.parametrize("backend,padding_idx", [
    ("aot_eager", None),
    ("aot_eager", 21),  # a padding row in rank 1's half of the vocabulary
    pytest.param(True, None, marks=pytest.mark.slow),  # an inductor compile: about a minute on 2 loaded cores
], ids=["aot_eager", "aot_eager-padding", "inductor"])
def test_vocab_parallel_lookup_is_lowered_and_exact(backend, padding_idx):
    for r in rank_pool(2).run(_compiled_lm_vs_eager, backend, padding_idx, timeout=600):
        before, after = r["vpe_nodes"]
        assert before == 2 and after == 0  # token and position tables: both vocab-parallel, both lowered
        assert abs(r["losses"][0] - r["losses"][1]) <= 1e-10 * abs(r["losses"][0])
        assert r["worst_grad"] <= 1e-10 and r["out"] <= 1e-10 and r["table_grad"] <= 1e-10
        for code in r["codes"]:  # the compiled forward calls no fxpar op: the lookup is in a fused kernel
            assert "torch.ops.fxpar." not in code[code.index("def call("):]


def _out_of_range(backend):
    mesh = torch.distributed.device_mesh.init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))
    model, idx, _ = _lm(None)
    compiled = fxpar.parallelize(model, mesh, example_inputs=(idx,), compile=backend)
    with torch.no_grad():
        compiled(idx)  # compiles
        bad = idx.clone()
        bad[0, 0] = 32  # one past the vocabulary: masked to zeros on every rank if unchecked
        try:
            compiled(bad)
        except (RuntimeError, IndexError) as e:
            return str(e)
    return None


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param(True, marks=pytest.mark.slow)],
                         ids=["aot_eager", "inductor"])  # inductor: its in-kernel assert throws
def test_out_of_range_ids_fail_in_the_compiled_lookup(backend):
    for message in rank_pool(2).run(_out_of_range, backend, timeout=600):
        assert message is not None and "index out of range" in message


def test_lowered_lookup_matches_the_custom_op_values_and_gradient():
    """One process, the op's math directly: both ranks' halves of a table of 10 rows, padding row 7."""
    from fxpar.rules.embedding import vocab_parallel_embedding  # noqa: F401 (registers the op)

    torch.manual_seed(0)
    full = torch.randn(10, 3, dtype=torch.float64)
    ids = torch.tensor([[0, 4, 5, 7, 9], [7, 7, 1, 6, 3]])
    grad = torch.randn(2, 5, 3, dtype=torch.float64)
    total = torch.zeros(2, 5, 3, dtype=torch.float64)
    grads = []
    for rank in range(2):
        w = full[rank * 5:(rank + 1) * 5].clone().requires_grad_()
        out = tp_vocab_parallel_embedding(w, ids, 7, "unused", rank, 2)
        out.backward(grad)
        total += out.detach()
        grads.append(w.grad)
    ref = full.clone().requires_grad_()
    want = F.embedding(ids, ref, padding_idx=7)
    want.backward(grad)
    assert torch.equal(total, want.detach())
    assert torch.equal(torch.cat(grads), ref.grad)
