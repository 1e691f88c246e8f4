"""Hypothesis strategies for fxpar: random meshes, models, plans and inputs, and a checker for them.

    from hypothesis import given
    from fxpar.testing.strategies import cases, check_case

    @given(cases())
    def test_my_passes_keep_models_equal(case):
        check_case(case, passes=my_passes())     # every rank simulated in this process

A case is plain data (picklable, printable, shrinkable): a mesh
(`(("dp", 2), ("tp", 2))`), a `ModelSpec` drawn from a grammar of blocks, a
plan (automatic, explicit styles per module, or both; pipeline cut points on
a pp mesh), the batch shape and a seed. `build_model(spec)` turns a spec into
an `nn.Module` whose module FQNs are the ones plans name (`blocks.0.up`,
`blocks.1.q`, `embed`, `head`). `check_case` runs a case on the simulator;
pp meshes need real ranks (tests/test_property_gloo.py runs them there).

    model  := [embedding] block+ [head]
    block  := mlp | gated_mlp | linear | norm | attention | parallel_mlps
    attention := q, k, v, o projections; heads H, kv heads KVH (GQA when KVH < H);
                 SDPA or eager (matmul, softmax); causal or not

What is drawn follows what fxpar supports, so the suite grows as features
land: mesh dims are drawn only from `fxpar.compiler.compile._SUPPORTED_DIMS` (1-D to 3-D
meshes), minus pairs not supported together yet (`_NOT_TOGETHER`: pp with
dp or fsdp), and a block kind is drawn only if the ops it lowers to have
sharding rules (`capabilities()`, which reads `fxpar.rules.has_rule`). A test
can pin the capability set with `cases(capabilities=...)`.

A plan that asks to shard a dimension the mesh does not divide must raise
the documented error (`ShardingError: ... does not divide by tp=N`), except
an nn.Linear's, which is cut unevenly and must be exact;
`Case.expected_error` says when, and `check_case` asserts it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import strategies as st

import fxpar
from fxpar.compiler.compile import _SUPPORTED_DIMS
from fxpar.rules import has_rule
from fxpar.testing.simulate import check_equivalence, sim_world

__all__ = [
    "capabilities",
    "SIM_DIMS",
    "MeshSpec",
    "BlockSpec",
    "ModelSpec",
    "Case",
    "meshes",
    "model_specs",
    "plans",
    "batch_shapes",
    "cases",
    "build_model",
    "make_inputs",
    "check_case",
    "CaseResult",
    "GrammarModel",
]

aten = torch.ops.aten

# The ops each block kind lowers to; a kind is drawn only when every one has a sharding rule.
_BLOCK_OPS: dict[str, tuple] = {
    "mlp": (aten.linear.default, aten.gelu.default, aten.relu.default, aten.add.Tensor),
    "gated_mlp": (aten.linear.default, aten.silu.default, aten.mul.Tensor),
    "linear": (aten.linear.default,),
    "layer_norm": (aten.layer_norm.default,),
    "rms_norm": (aten.rms_norm.default,),
    "attention": (aten.linear.default, aten.view.default, aten.transpose.int, aten.reshape.default,
                  aten.scaled_dot_product_attention.default),
    "eager_attention": (aten.linear.default, aten.view.default, aten.transpose.int, aten.matmul.default,
                        aten._softmax.default, aten.reshape.default),
    "gqa": (aten.unsqueeze.default, aten.expand.default, aten.reshape.default, aten.slice.Tensor),
    "parallel_mlps": (aten.linear.default, aten.sub.Tensor, aten.mul.Tensor),
    "embedding": (aten.embedding.default,),
}

ACTIVATIONS = ("relu", "gelu", "silu", "tanh")

SIM_DIMS = ("tp", "dp", "fsdp")
"""Mesh dims the in-process simulator runs (pipelines need real ranks: `fxpar.testing.rank_pool`)."""


def capabilities() -> frozenset[str]:
    """What fxpar supports now: 'mesh:<dim>' for each parallelized mesh dim, and block kinds with rules."""
    caps = {f"mesh:{d}" for d in _SUPPORTED_DIMS}
    caps |= {kind for kind, ops in _BLOCK_OPS.items() if all(has_rule(op) for op in ops)}
    return frozenset(caps)


# --------------------------------------------------------------------------- specs (plain data)


@dataclass(frozen=True)
class BlockSpec:
    """One block of a grammar model.

    Attributes:
        kind: mlp, gated_mlp, linear, layer_norm, rms_norm, attention, parallel_mlps.
        hidden: the MLP hidden width.
        heads, kv_heads: attention heads (kv_heads < heads: grouped-query attention).
        eager: attention written as matmul + softmax instead of SDPA.
        causal: causal attention.
        act: the MLP activation.
        bias: linear biases.
        residual: add the block's input to its output.
    """

    kind: str
    hidden: int = 0
    heads: int = 0
    kv_heads: int = 0
    eager: bool = False
    causal: bool = False
    act: str = "gelu"
    bias: bool = True
    residual: bool = True


@dataclass(frozen=True)
class ModelSpec:
    """A model of the grammar: [embedding] blocks [head].

    Attributes:
        dim: the model width D.
        blocks: the blocks, in order.
        vocab: the embedding's vocabulary (0: float inputs of width D).
        head: the output projection's width (0: none).
        tied: the head shares the embedding's weight (head == vocab).
    """

    dim: int
    blocks: tuple[BlockSpec, ...]
    vocab: int = 0
    head: int = 0
    tied: bool = False

    @property
    def needs_sequence(self) -> bool:
        return self.vocab > 0 or any(b.kind == "attention" for b in self.blocks)

    def linears(self) -> dict[str, tuple[int, int]]:
        """FQN -> (in_features, out_features) of every Linear, as plans name them."""
        out: dict[str, tuple[int, int]] = {}
        d = self.dim
        for i, b in enumerate(self.blocks):
            p = f"blocks.{i}"
            if b.kind == "mlp":
                out[f"{p}.up"], out[f"{p}.down"] = (d, b.hidden), (b.hidden, d)
            elif b.kind == "gated_mlp":
                out[f"{p}.gate"], out[f"{p}.up"], out[f"{p}.down"] = (d, b.hidden), (d, b.hidden), (b.hidden, d)
            elif b.kind == "linear":
                out[f"{p}.proj"] = (d, d)
            elif b.kind == "attention":
                hd = d // b.heads
                out[f"{p}.q"], out[f"{p}.k"] = (d, b.heads * hd), (d, b.kv_heads * hd)
                out[f"{p}.v"], out[f"{p}.o"] = (d, b.kv_heads * hd), (b.heads * hd, d)
            elif b.kind == "parallel_mlps":
                for br in ("a", "b"):
                    out[f"{p}.{br}.up"], out[f"{p}.{br}.down"] = (d, b.hidden), (b.hidden, d)
        if self.head and not self.tied:
            out["head"] = (d, self.head)
        return out

    def embeddings(self) -> dict[str, tuple[int, int]]:
        """FQN -> (vocab, dim) of the embedding, if any (tied models excluded from explicit plans)."""
        return {"embed": (self.vocab, self.dim)} if self.vocab and not self.tied else {}


@dataclass(frozen=True)
class Case:
    """One random test case.

    Attributes:
        mesh: mesh dim sizes by name, in mesh order.
        model: the model spec.
        plan: None (automatic), or ((fqn, style), ...) with `auto` saying whether
            modules the plan does not name are planned automatically.
        auto: with an explicit plan, plan the rest automatically too.
        batch: the input's leading dims ((B,) or (B, T)).
        seed: seeds the model's weights and the inputs.
        pp_cuts: for a pp mesh, the blocks stages start at (one stage per pp rank).
    """

    mesh: tuple[tuple[str, int], ...]
    model: ModelSpec
    plan: tuple[tuple[str, str], ...] | None
    auto: bool = False
    batch: tuple[int, ...] = (2, 3)
    seed: int = 0
    pp_cuts: tuple[int, ...] = ()

    @property
    def mesh_dict(self) -> dict[str, int]:
        return dict(self.mesh)

    def fxpar_plan(self):
        """The plan as `fxpar.parallelize` takes it."""
        pp = [f"blocks.{i}" for i in self.pp_cuts] or None
        if self.plan is None:
            return fxpar.Plan(pp=pp, auto_tp=True) if pp else None
        return fxpar.Plan(tp=dict(self.plan), pp=pp, auto_tp=self.auto)

    @property
    def expected_error(self) -> str | None:
        """The documented error's message fragment if this case must fail to compile, else None."""
        tp = self.mesh_dict.get("tp", 1)
        if self.plan is None or tp == 1:
            return None
        lin, emb = self.model.linears(), self.model.embeddings()
        for fqn, style in self.plan:
            if fqn in lin:
                continue  # an nn.Linear's shard may be uneven (torch.chunk's rows): it compiles, exactly
            elif fqn in emb:
                vocab, dim = emb[fqn]
                size = dim if style == "colwise" else vocab if style == "rowwise" else 0
            else:
                continue
            if size and size % tp:
                return f"does not divide by tp={tp}"
        return None


MeshSpec = tuple
"""A mesh as drawn: ((name, size), ...), hashable and in mesh order."""


# --------------------------------------------------------------------------- strategies

_MESH_ORDER = ("dp", "fsdp", "pp", "tp")

# Mesh dims fxpar supports one by one but not yet together (parallelize raises PlanError for them).
_NOT_TOGETHER = frozenset({("dp", "pp"), ("fsdp", "pp")})


@st.composite
def meshes(draw, *, caps: frozenset[str] | None = None, dims: Sequence[str] | None = None, max_dims: int = 3,
           max_world: int = 8, sizes: Sequence[int] = (2, 3, 4)) -> MeshSpec:
    """A mesh of 1 to `max_dims` supported dims, at most `max_world` ranks: (("tp", 4),).

    Args:
        caps: the capability set (default: `capabilities()`).
        dims: draw only from these mesh dims (e.g. those a harness can run).
        max_dims, max_world, sizes: bounds on the mesh.
    """
    caps = capabilities() if caps is None else caps
    dims = [d for d in _MESH_ORDER if f"mesh:{d}" in caps and (dims is None or d in dims)]
    if not dims:
        raise ValueError("no mesh dim to draw: capabilities() has no 'mesh:<dim>' among the dims asked for")
    chosen = draw(st.lists(st.sampled_from(dims), min_size=1, max_size=min(max_dims, len(dims)), unique=True))
    if "tp" in dims and "tp" not in chosen and len(chosen) < max_dims and draw(st.booleans()):
        chosen.append("tp")  # tensor parallelism has the most to get wrong: draw it in about 3 of 4 meshes
    chosen = [d for d in _MESH_ORDER if d in chosen]
    for a, b in _NOT_TOGETHER:
        if a in chosen and b in chosen:
            chosen.remove(b)
    out, world = [], 1
    for d in chosen:
        options = [s for s in sizes if world * s <= max_world]
        if not options:
            break
        s = draw(st.sampled_from(options))
        world *= s
        out.append((d, s))
    return tuple(out)


_WIDTHS = (4, 6, 8, 12, 16)
_HIDDEN = (4, 6, 8, 12, 16, 24, 32)


@st.composite
def blocks(draw, dim: int, *, caps: frozenset[str]) -> BlockSpec:
    """One block for width `dim`, of a kind `caps` allows."""
    kinds = [k for k in ("mlp", "gated_mlp", "linear", "layer_norm", "rms_norm", "parallel_mlps") if k in caps]
    if "attention" in caps or "eager_attention" in caps:
        kinds += ["attention", "attention"]  # the richest block: drawn twice as often
    kind = draw(st.sampled_from(kinds))
    residual = draw(st.booleans())
    if kind in ("mlp", "gated_mlp", "parallel_mlps"):
        return BlockSpec(kind, hidden=draw(st.sampled_from(_HIDDEN)), act=draw(st.sampled_from(ACTIVATIONS)),
                         bias=draw(st.booleans()) and kind != "gated_mlp", residual=residual)
    if kind == "linear":
        return BlockSpec(kind, bias=draw(st.booleans()), residual=residual)
    if kind in ("layer_norm", "rms_norm"):
        return BlockSpec(kind, residual=False)
    heads = draw(st.sampled_from([h for h in (1, 2, 3, 4, 6, 8) if dim % h == 0]))
    kv = heads
    if "gqa" in caps:
        kv = draw(st.sampled_from([k for k in range(1, heads + 1) if heads % k == 0]))
    impls = [e for e, cap in ((False, "attention"), (True, "eager_attention")) if cap in caps]
    return BlockSpec("attention", heads=heads, kv_heads=kv, eager=draw(st.sampled_from(impls)),
                     causal=draw(st.booleans()), bias=draw(st.booleans()), residual=residual)


@st.composite
def model_specs(draw, *, caps: frozenset[str] | None = None, max_blocks: int = 3, min_blocks: int = 1) -> ModelSpec:
    """A model from the grammar, using only block kinds `caps` allows."""
    caps = capabilities() if caps is None else caps
    dim = draw(st.sampled_from(_WIDTHS))
    bs = tuple(draw(st.lists(blocks(dim, caps=caps), min_size=min_blocks, max_size=max(max_blocks, min_blocks))))
    vocab = head = 0
    tied = False
    if "embedding" in caps and draw(st.booleans()):
        vocab = draw(st.sampled_from((8, 12, 16, 24)))
    if draw(st.booleans()):
        if vocab and draw(st.booleans()):
            head, tied = vocab, True
        else:
            head = draw(st.sampled_from((2, 3, 4, 6, 8)))
    return ModelSpec(dim, bs, vocab, head, tied)


@st.composite
def plans(draw, spec: ModelSpec, mesh: dict[str, int] | None = None
          ) -> tuple[tuple[tuple[str, str], ...] | None, bool]:
    """(plan, auto): None (automatic), or explicit styles for some modules (auto: the rest automatic).

    Tensor-parallel styles are drawn only for meshes with a tp dim (a tp plan on
    a mesh without one is a PlanError by design).
    """
    kind = draw(st.sampled_from(("auto", "explicit", "mixed")))
    if kind == "auto" or (mesh is not None and "tp" not in mesh):
        return None, True
    names = sorted(spec.linears()) + sorted(spec.embeddings())
    if not names:
        return None, True
    chosen = draw(st.lists(st.sampled_from(names), min_size=1, max_size=len(names), unique=True))
    styles = tuple((n, draw(st.sampled_from(("colwise", "rowwise", "replicate")))) for n in sorted(chosen))
    return styles, kind == "mixed"


def batch_shapes(spec: ModelSpec, mesh: dict[str, int] | None = None):
    """The inputs' leading dims: (B, T) for sequence models, else (B,), (B, T) or (B, T, S).

    With dp, fsdp or pp mesh dims, the batch is drawn divisible by their product
    (data-parallel shards; a pipeline's default microbatches, one per stage).
    """
    mesh = mesh or {}
    step = math.prod(mesh.get(d, 1) for d in ("dp", "fsdp", "pp"))
    b = st.sampled_from([step * k for k in (1, 2, 3)])
    t = st.sampled_from((1, 3, 4))
    if spec.needs_sequence:
        return st.tuples(b, t)
    return st.one_of(st.tuples(b), st.tuples(b, t), st.tuples(b, t, st.sampled_from((2, 3))))


@st.composite
def cases(draw, *, capabilities: frozenset[str] | None = None, mesh_dims: Sequence[str] | None = None,
          max_blocks: int = 3, max_world: int = 8) -> Case:
    """A full random case: mesh, model, plan, batch shape and seed.

    Args:
        capabilities: what may be drawn (default: `capabilities()`, i.e. what fxpar supports now).
        mesh_dims: draw meshes only over these dims (`SIM_DIMS` for the simulator).
        max_blocks: the most blocks a model has.
        max_world: the most ranks a mesh has.
    """
    caps = globals()["capabilities"]() if capabilities is None else capabilities
    mesh = draw(meshes(caps=caps, dims=mesh_dims, max_world=max_world))
    stages = dict(mesh).get("pp", 1)
    spec = draw(model_specs(caps=caps, max_blocks=max_blocks, min_blocks=stages))
    plan, auto = draw(plans(spec, dict(mesh)))
    batch = draw(batch_shapes(spec, dict(mesh)))
    seed = draw(st.integers(0, 2**16))
    cuts = ()
    if stages > 1:  # one stage per pp rank, starting at these blocks
        cuts = tuple(sorted(draw(st.lists(st.integers(1, len(spec.blocks) - 1), min_size=stages - 1,
                                          max_size=stages - 1, unique=True))))
    return Case(mesh, spec, plan, auto, batch, seed, cuts)


# --------------------------------------------------------------------------- models


class _MLP(nn.Module):
    def __init__(self, d: int, b: BlockSpec) -> None:
        super().__init__()
        self.up, self.down, self.act = nn.Linear(d, b.hidden, bias=b.bias), nn.Linear(b.hidden, d, bias=b.bias), b.act

    def forward(self, x):
        return self.down(getattr(F, self.act)(self.up(x)))


class _GatedMLP(nn.Module):
    def __init__(self, d: int, b: BlockSpec) -> None:
        super().__init__()
        self.gate, self.up = nn.Linear(d, b.hidden, bias=False), nn.Linear(d, b.hidden, bias=False)
        self.down = nn.Linear(b.hidden, d, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


class _Linear(nn.Module):
    def __init__(self, d: int, b: BlockSpec) -> None:
        super().__init__()
        self.proj = nn.Linear(d, d, bias=b.bias)

    def forward(self, x):
        return self.proj(x)


class _Norm(nn.Module):
    def __init__(self, d: int, b: BlockSpec) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d) if b.kind == "layer_norm" else nn.RMSNorm(d)
        with torch.no_grad():  # not the default ones and zeros, so a wrong gradient shows
            self.norm.weight.uniform_(0.5, 1.5)
            if getattr(self.norm, "bias", None) is not None:
                self.norm.bias.uniform_(-0.5, 0.5)

    def forward(self, x):
        return self.norm(x)


class _Attention(nn.Module):
    """Multi-head attention, grouped-query when kv_heads < heads (repeat_kv as Llama writes it)."""

    def __init__(self, d: int, b: BlockSpec) -> None:
        super().__init__()
        self.h, self.kvh, self.hd = b.heads, b.kv_heads, d // b.heads
        self.eager, self.causal = b.eager, b.causal
        self.q = nn.Linear(d, self.h * self.hd, bias=b.bias)
        self.k = nn.Linear(d, self.kvh * self.hd, bias=b.bias)
        self.v = nn.Linear(d, self.kvh * self.hd, bias=b.bias)
        self.o = nn.Linear(self.h * self.hd, d, bias=b.bias)

    def _repeat_kv(self, x):
        n_rep = self.h // self.kvh
        if n_rep == 1:
            return x
        bsz, kvh, t, hd = x.shape
        return x[:, :, None, :, :].expand(bsz, kvh, n_rep, t, hd).reshape(bsz, kvh * n_rep, t, hd)

    def forward(self, x):
        bsz, t, _ = x.shape
        q = self.q(x).view(bsz, t, self.h, self.hd).transpose(1, 2)
        k = self._repeat_kv(self.k(x).view(bsz, t, self.kvh, self.hd).transpose(1, 2))
        v = self._repeat_kv(self.v(x).view(bsz, t, self.kvh, self.hd).transpose(1, 2))
        if self.eager:
            scores = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(self.hd)
            if self.causal:
                mask = torch.full((t, t), float("-inf"), dtype=x.dtype).triu(1)
                scores = scores + mask
            a = torch.matmul(torch.softmax(scores, dim=-1), v)
        else:
            a = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.o(a.transpose(1, 2).reshape(bsz, t, self.h * self.hd))


class _ParallelMLPs(nn.Module):
    """Two independent MLPs on the same input, combined asymmetrically: a(x) - b(x) / 2."""

    def __init__(self, d: int, b: BlockSpec) -> None:
        super().__init__()
        self.a, self.b = _MLP(d, b), _MLP(d, b)

    def forward(self, x):
        return self.a(x) - self.b(x) * 0.5


_BLOCKS: dict[str, Callable[[int, BlockSpec], nn.Module]] = {
    "mlp": _MLP, "gated_mlp": _GatedMLP, "linear": _Linear, "layer_norm": _Norm, "rms_norm": _Norm,
    "attention": _Attention, "parallel_mlps": _ParallelMLPs,
}


class GrammarModel(nn.Module):
    """A model built from a ModelSpec; module FQNs are `embed`, `blocks.<i>.<name>`, `head`."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        self.embed = nn.Embedding(spec.vocab, spec.dim) if spec.vocab else None
        # Block bodies are registered under blocks.<i> directly so plan FQNs read blocks.0.up.
        self.blocks = nn.ModuleList([_BLOCKS[b.kind](spec.dim, b) for b in spec.blocks])
        self.residual = [b.residual for b in spec.blocks]
        self.head = nn.Linear(spec.dim, spec.head, bias=not spec.tied) if spec.head else None
        if spec.tied:
            self.head.weight = self.embed.weight

    def forward(self, x):
        if self.embed is not None:
            x = self.embed(x)
        for block, residual in zip(self.blocks, self.residual):
            y = block(x)
            x = y + x if residual else y
        return self.head(x) if self.head is not None else x


def build_model(spec: ModelSpec, *, seed: int = 0, dtype: torch.dtype = torch.float64) -> nn.Module:
    """The nn.Module of a spec, its weights drawn from `seed`."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = GrammarModel(spec)
    return model.to(dtype).eval()


def make_inputs(case: Case, *, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """(input, target) for a case, drawn from its seed."""
    spec = case.model
    g = torch.Generator().manual_seed(case.seed + 1)
    if spec.vocab:
        x = torch.randint(0, spec.vocab, case.batch, generator=g)
    else:
        x = torch.randn(*case.batch, spec.dim, generator=g, dtype=dtype)
    width = spec.head or spec.dim
    target = torch.randn(*case.batch, width, generator=g, dtype=dtype)
    return x, target


def _mse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return ((out - target) ** 2).mean()


@dataclass
class CaseResult:
    """What check_case found: the reports per rank, or the expected error it saw."""

    case: Case
    reports: list = field(default_factory=list)
    error: str | None = None


def check_case(case: Case, *, passes: list | None = None, rtol: float = 1e-10, static: bool = True,
               world: Any = None) -> CaseResult:
    """Runs a case on the simulated mesh and asserts it is right.

    Compiles the case's model for every rank (`fxpar.testing.simulate`),
    checks all ranks statically, then compares parameters, outputs, the loss,
    every parameter gradient and the input gradient with the unsplit model at
    `rtol` (float64). A case whose plan cannot divide must raise the
    documented ShardingError instead.

    Raises:
        AssertionError: naming the case and what differed.
    """
    model = build_model(case.model, seed=case.seed)
    x, target = make_inputs(case)
    world = world or sim_world(case.mesh_dict)
    want_error = case.expected_error
    try:
        reports = check_equivalence(model, case.mesh_dict, x, plan=case.fxpar_plan(), target=target, loss_fn=_mse,
                                    passes=passes, static=static, world=world, rtol=rtol)
    except fxpar.ShardingError as e:
        if want_error is not None and want_error in str(e):
            return CaseResult(case, error=str(e))
        raise AssertionError(f"{case}\nunexpected ShardingError: {e}") from e
    if want_error is not None:
        raise AssertionError(f"{case}\nexpected ShardingError '{want_error}' but it compiled")
    for rank, r in enumerate(reports):
        if not r.ok:
            raise AssertionError(f"{case}\nrank {rank}:\n{r}")
    n_params = len(list(model.named_parameters(remove_duplicate=False)))
    grads = [t for t in reports[0].tensors if t.name.startswith("grad ") and not t.name.startswith("grad input")]
    if len(grads) != n_params:
        raise AssertionError(f"{case}\ncompared {len(grads)} parameter gradients, the model has {n_params}")
    return CaseResult(case, reports=reports)
