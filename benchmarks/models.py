"""The benchmark models: a GPT-2-style and a Llama-style (torchtitan-style) transformer.

Both are written with `nn.Linear` / `nn.Embedding` only, so torch's own tensor
parallel styles (`ColwiseParallel`, `RowwiseParallel`), which accept nothing
else, run on exactly the same module as fxpar. (Hugging Face's GPT-2 uses a
fused `Conv1D` qkv projection that torch's styles cannot shard; fxpar's tests
cover that model, see tests/test_transformers.py and tests/test_comm_volume.py.)

Attention reshapes with `-1` for the head count, as torchtitan does, so that
torch's plans (which hand local tensors to the attention core) see their local
heads; fxpar rewrites shape constants itself and does not need it.

Also here: the hand-written torch plans each comparison uses (`torch_tp_plan`),
the analytical communication volume of the Megatron plan (`megatron_tp_bytes`),
and manual pipeline stages for torch.distributed.pipelining.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "ModelConfig",
    "GPT",
    "Llama",
    "build",
    "cross_entropy",
    "torch_tp_plan",
    "megatron_tp_bytes",
    "live_grad_bytes",
    "ring_bytes",
    "StageSlice",
]


@dataclass(frozen=True)
class ModelConfig:
    """Sizes of one benchmark model.

    Attributes:
        kind: 'gpt2' or 'llama'.
        layers, dim, heads, kv_heads, hidden, vocab: transformer sizes
            (kv_heads is used by 'llama' only; hidden is the MLP width).
        batch, seq: the input batch.
        max_seq: positions the model supports.
    """

    kind: str
    layers: int
    dim: int
    heads: int
    hidden: int
    vocab: int
    batch: int
    seq: int
    kv_heads: int | None = None
    max_seq: int = 1024

    def with_layers(self, layers: int) -> "ModelConfig":
        return replace(self, layers=layers)

    def describe(self) -> str:
        kv = f", kv_heads={self.kv_heads}" if self.kind == "llama" else ""
        return (f"{self.kind}: layers={self.layers}, dim={self.dim}, heads={self.heads}{kv}, hidden={self.hidden}, "
                f"vocab={self.vocab}; batch={self.batch}, seq={self.seq}")


# --------------------------------------------------------------------------- GPT-2 style


class GPTAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.head_dim = dim // heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.c_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(out.transpose(1, 2).reshape(b, t, -1))


class GPTMLP(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.c_fc = nn.Linear(dim, hidden)
        self.c_proj = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class GPTBlock(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim)
        self.attn = GPTAttention(dim, heads)
        self.ln_2 = nn.LayerNorm(dim)
        self.mlp = GPTMLP(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """GPT-2: learned positions, pre-LayerNorm blocks, GELU MLP, lm_head tied to the token embedding."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.wte = nn.Embedding(cfg.vocab, cfg.dim)
        self.wpe = nn.Embedding(cfg.max_seq, cfg.dim)
        self.h = nn.ModuleList(GPTBlock(cfg.dim, cfg.heads, cfg.hidden) for _ in range(cfg.layers))
        self.ln_f = nn.LayerNorm(cfg.dim)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab, bias=False)
        self.lm_head.weight = self.wte.weight
        # GPT-2's initialisation scale keeps the loss near log(vocab), like a real first step.
        for name, p in self.named_parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=0.02 / (math.sqrt(2 * cfg.layers) if name.endswith("c_proj.weight") else 1))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(ids.shape[1], device=ids.device)
        x = self.wte(ids) + self.wpe(pos)
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


# --------------------------------------------------------------------------- Llama style (torchtitan)


def precompute_freqs_cis(dim: int, end: int, theta: float = 10000.0) -> torch.Tensor:
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: (dim // 2)].float() / dim))
    t = torch.arange(end, device=freqs.device)
    return torch.polar(torch.ones(end, dim // 2), torch.outer(t, freqs).float())  # complex64


def apply_rotary_emb(xq: torch.Tensor, xk: torch.Tensor, freqs_cis: torch.Tensor):
    xq_ = torch.view_as_complex(xq.float().reshape(*xq.shape[:-1], -1, 2))
    xk_ = torch.view_as_complex(xk.float().reshape(*xk.shape[:-1], -1, 2))
    freqs_cis = freqs_cis.view(1, xq_.shape[1], 1, xq_.shape[-1])
    xq_out = torch.view_as_real(xq_ * freqs_cis).flatten(3)
    xk_out = torch.view_as_real(xk_ * freqs_cis).flatten(3)
    return xq_out.type_as(xq), xk_out.type_as(xk)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    # Local head counts come from the tensor, so the same code runs on torch TP's local shards.
    if n_rep == 1:
        return x
    b, t, kv, d = x.shape
    return x[:, :, :, None, :].expand(b, t, kv, n_rep, d).reshape(b, t, kv * n_rep, d)


class LlamaAttention(nn.Module):
    def __init__(self, dim: int, heads: int, kv_heads: int) -> None:
        super().__init__()
        self.head_dim = dim // heads
        self.n_rep = heads // kv_heads
        self.wq = nn.Linear(dim, heads * self.head_dim, bias=False)
        self.wk = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(heads * self.head_dim, dim, bias=False)

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        xq = self.wq(x).view(b, t, -1, self.head_dim)
        xk = self.wk(x).view(b, t, -1, self.head_dim)
        xv = self.wv(x).view(b, t, -1, self.head_dim)
        xq, xk = apply_rotary_emb(xq, xk, freqs_cis)
        xk, xv = repeat_kv(xk, self.n_rep), repeat_kv(xv, self.n_rep)
        out = F.scaled_dot_product_attention(xq.transpose(1, 2), xk.transpose(1, 2), xv.transpose(1, 2),
                                             is_causal=True)
        return self.wo(out.transpose(1, 2).contiguous().view(b, t, -1))


class LlamaFeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class LlamaBlock(nn.Module):
    def __init__(self, dim: int, heads: int, kv_heads: int, hidden: int) -> None:
        super().__init__()
        self.attention_norm = nn.RMSNorm(dim, eps=1e-5)
        self.attention = LlamaAttention(dim, heads, kv_heads)
        self.ffn_norm = nn.RMSNorm(dim, eps=1e-5)
        self.feed_forward = LlamaFeedForward(dim, hidden)

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), freqs_cis)
        return h + self.feed_forward(self.ffn_norm(h))


class Llama(nn.Module):
    """Llama written the way torchtitan writes it: complex rotary, RMSNorm, SwiGLU, GQA, untied output."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        kv = cfg.kv_heads or cfg.heads
        self.tok_embeddings = nn.Embedding(cfg.vocab, cfg.dim)
        self.register_buffer("freqs_cis", precompute_freqs_cis(cfg.dim // cfg.heads, cfg.max_seq), persistent=False)
        self.layers = nn.ModuleDict({str(i): LlamaBlock(cfg.dim, cfg.heads, kv, cfg.hidden)
                                     for i in range(cfg.layers)})
        self.norm = nn.RMSNorm(cfg.dim, eps=1e-5)
        self.output = nn.Linear(cfg.dim, cfg.vocab, bias=False)
        for p in self.parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.tok_embeddings(tokens)
        freqs_cis = self.freqs_cis[: tokens.shape[1]]
        for layer in self.layers.values():
            h = layer(h, freqs_cis)
        return self.output(self.norm(h))


def build(cfg: ModelConfig, seed: int = 0) -> nn.Module:
    """The model of `cfg` with seeded random weights, in eval mode (no dropout anywhere anyway)."""
    torch.manual_seed(seed)
    model = GPT(cfg) if cfg.kind == "gpt2" else Llama(cfg)
    return model.eval()


def batch(cfg: ModelConfig, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(input ids, target ids) of cfg's batch size and sequence length, the same on every rank."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab, (cfg.batch, cfg.seq), generator=g)
    return ids, torch.randint(0, cfg.vocab, (cfg.batch, cfg.seq), generator=g)


def cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1))


# --------------------------------------------------------------------------- torch's hand-written TP plans


def torch_tp_plan(model: nn.Module, mesh, *, style: str) -> nn.Module:
    """Applies torch's `parallelize_module` with a hand-written plan, in place; returns the model.

    Args:
        model: a GPT or Llama from this module (a copy: torch's plans modify it).
        mesh: the 1-D tp DeviceMesh.
        style: 'megatron' -- the plan fxpar chooses automatically, written by
            hand: q/k/v and MLP-in colwise, attention and MLP out rowwise, the
            output projection colwise gathered to full logits, a tied token
            embedding vocab-parallel (rowwise) and replicated otherwise, and
            each attention / MLP input prepared as one replicated DTensor (one
            backward all-reduce per module);
            'torchtitan' -- torchtitan's Llama plan (sequence parallel norms,
            rowwise embedding into sequence shards, colwise output gathered to
            full logits, i.e. loss_parallel off). Llama only.
    """
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )

    if isinstance(model, GPT):
        if style != "megatron":
            raise ValueError(f"style {style!r}: the GPT-2 model has only the 'megatron' plan")
        plan = {
            "wte": RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()),
            "lm_head": ColwiseParallel(output_layouts=Replicate()),
        }
        for i in range(len(model.h)):
            # PrepareModuleInput makes the block input one DTensor shared by q, k and v (and by the MLP's one
            # colwise layer), so their partial input gradients add up first and are all-reduced once per
            # module, as Megatron's "f" does; without it every colwise layer all-reduces its own.
            plan |= {f"h.{i}.attn": PrepareModuleInput(input_layouts=(Replicate(),),
                                                       desired_input_layouts=(Replicate(),)),
                     f"h.{i}.mlp": PrepareModuleInput(input_layouts=(Replicate(),),
                                                      desired_input_layouts=(Replicate(),))}
            plan |= {f"h.{i}.attn.q_proj": ColwiseParallel(), f"h.{i}.attn.k_proj": ColwiseParallel(),
                     f"h.{i}.attn.v_proj": ColwiseParallel(), f"h.{i}.attn.c_proj": RowwiseParallel(),
                     f"h.{i}.mlp.c_fc": ColwiseParallel(), f"h.{i}.mlp.c_proj": RowwiseParallel()}
        parallelize_module(model, mesh, plan)
        # parallelize_module distributes each module's weight separately: tie them again (both Shard(0)).
        model.lm_head.weight = model.wte.weight
        return model
    if style == "megatron":
        plan = {"output": ColwiseParallel(output_layouts=Replicate())}
        for i in model.layers:
            plan |= {f"layers.{i}.attention": PrepareModuleInput(input_layouts=(Replicate(), None),
                                                                 desired_input_layouts=(Replicate(), None)),
                     f"layers.{i}.feed_forward": PrepareModuleInput(input_layouts=(Replicate(),),
                                                                    desired_input_layouts=(Replicate(),))}
            plan |= {f"layers.{i}.attention.wq": ColwiseParallel(), f"layers.{i}.attention.wk": ColwiseParallel(),
                     f"layers.{i}.attention.wv": ColwiseParallel(), f"layers.{i}.attention.wo": RowwiseParallel(),
                     f"layers.{i}.feed_forward.w1": ColwiseParallel(),
                     f"layers.{i}.feed_forward.w3": ColwiseParallel(),
                     f"layers.{i}.feed_forward.w2": RowwiseParallel()}
        parallelize_module(model, mesh, plan)
        return model
    if style != "torchtitan":
        raise ValueError(f"unknown plan style {style!r}")
    # torchtitan/models/llama3/infra/parallelize.py apply_tp, loss_parallel=False, no float8, no async TP.
    parallelize_module(model, mesh, {
        "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
        "norm": SequenceParallel(),
        "output": ColwiseParallel(input_layouts=Shard(1), output_layouts=Replicate(), use_local_output=True),
    })
    for block in model.layers.values():
        parallelize_module(block, mesh, {
            "attention_norm": SequenceParallel(),
            "attention": PrepareModuleInput(input_layouts=(Shard(1), None), desired_input_layouts=(Replicate(), None)),
            "attention.wq": ColwiseParallel(),
            "attention.wk": ColwiseParallel(),
            "attention.wv": ColwiseParallel(),
            "attention.wo": RowwiseParallel(output_layouts=Shard(1)),
            "ffn_norm": SequenceParallel(),
            "feed_forward": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
            "feed_forward.w1": ColwiseParallel(),
            "feed_forward.w2": RowwiseParallel(output_layouts=Shard(1)),
            "feed_forward.w3": ColwiseParallel(),
        })
    return model


# --------------------------------------------------------------------------- analytical communication


def megatron_tp_bytes(cfg: ModelConfig, tp: int, *, backward: bool, elt: int = 4) -> dict[str, int]:
    """The Megatron plan's communication per training step (or forward), by the payload each rank puts in.

    Forward: two all-reduces of the (B, T, D) activations per block (after
    attention, after the MLP), one more for the vocab-parallel token embedding
    (tied or not: the automatic plan shards it by vocabulary),
    and an all-gather of the (B, T, V/tp) logit shard into full logits.
    Backward: the duals of the "f" identities in front of every sharded
    computation on replicated activations: two all-reduces of (B, T, D) per
    block, one for the output projection's input. (The gather's backward is a
    local slice; the all-reduces' backward is the identity.)

    Returns:
        {'all_reduce': payload bytes, 'all_gather': payload bytes, 'count': collectives}.
    """
    act = cfg.batch * cfg.seq * cfg.dim * elt
    logits_shard = cfg.batch * cfg.seq * cfg.vocab // tp * elt
    embedding = 1
    n_ar = 2 * cfg.layers + embedding + (2 * cfg.layers + 1 if backward else 0)
    return {"all_reduce": n_ar * act, "all_gather": logits_shard, "count": n_ar + 1}


def live_grad_bytes(cfg: ModelConfig, param_bytes: int, elt: int = 4) -> int:
    """Bytes of parameter gradient that can be nonzero in one step: the least a data-parallel step must reduce.

    A learned position table (GPT-2's wpe, max_seq rows) gets gradient only in
    the rows of the positions used (seq of them); every other parameter's
    gradient is dense.
    """
    if cfg.kind == "gpt2":
        return param_bytes - (cfg.max_seq - cfg.seq) * cfg.dim * elt
    return param_bytes


def ring_bytes(op: str, payload: int, n: int) -> float:
    """Bytes one rank sends for `op` on `payload` input bytes with ring algorithms on n ranks.

    all_reduce 2(n-1)/n of its input; all_gather (n-1) x its (local) input;
    reduce_scatter (n-1)/n of its (full) input; all_to_all (n-1)/n of its input;
    broadcast / scatter: counted at the payload (tree and direct sends vary).
    """
    if op == "all_reduce":
        return 2 * (n - 1) / n * payload
    if op == "all_gather":
        return (n - 1) * payload
    if op in ("reduce_scatter", "all_to_all"):
        return (n - 1) / n * payload
    return float(payload)


# --------------------------------------------------------------------------- manual pipeline stages


class StageSlice(nn.Module):
    """One pipeline stage cut from a Llama or GPT by hand: blocks [start, stop), plus ends where they belong.

    The first stage embeds tokens; the last applies the final norm and the
    output projection. torch.distributed.pipelining's `PipelineStage` runs it.
    """

    def __init__(self, model: nn.Module, start: int, stop: int, *, first: bool, last: bool) -> None:
        super().__init__()
        self.first, self.last = first, last
        self.is_gpt = isinstance(model, GPT)
        blocks = list(model.h) if self.is_gpt else list(model.layers.values())
        self.blocks = nn.ModuleList(blocks[start:stop])
        if self.is_gpt:
            if first:
                self.wte, self.wpe = model.wte, model.wpe
            if last:
                self.ln_f, self.lm_head = model.ln_f, model.lm_head
        else:
            self.register_buffer("freqs_cis", model.freqs_cis, persistent=False)
            if first:
                self.tok_embeddings = model.tok_embeddings
            if last:
                self.norm, self.output = model.norm, model.output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.is_gpt:
            if self.first:
                x = self.wte(x) + self.wpe(torch.arange(x.shape[1], device=x.device))
            for block in self.blocks:
                x = block(x)
            return self.lm_head(self.ln_f(x)) if self.last else x
        if self.first:
            x = self.tok_embeddings(x)
        freqs_cis = self.freqs_cis[: x.shape[1]]
        for block in self.blocks:
            x = block(x, freqs_cis)
        return self.output(self.norm(x)) if self.last else x


# --------------------------------------------------------------------------- sleeping stages


@torch.library.custom_op("fxbench::sleep", mutates_args=())
def sleep(x: torch.Tensor, seconds: float) -> torch.Tensor:
    """Identity that sleeps `seconds` (forward) and twice that in its backward: a stage with a known cost."""
    import time

    time.sleep(seconds)
    return x.clone()


@sleep.register_fake
def _(x, seconds):
    return torch.empty_like(x)


def _sleep_setup(ctx, inputs, output):
    ctx.seconds = inputs[1]


def _sleep_backward(ctx, grad):
    import time

    time.sleep(2 * ctx.seconds)
    return grad, None


sleep.register_autograd(_sleep_backward, setup_context=_sleep_setup)


class SleepBlock(nn.Module):
    """A tiny linear (so the stage has parameters and a backward) followed by a fixed sleep."""

    def __init__(self, dim: int, seconds: float) -> None:
        super().__init__()
        self.lin = nn.Linear(dim, dim)
        self.seconds = seconds

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.fxbench.sleep(self.lin(x), self.seconds)


class SleepNet(nn.Module):
    """`blocks` SleepBlocks in a row: pipeline stages whose forward takes t_f and backward 2 t_f, CPU-free."""

    def __init__(self, blocks: int, dim: int, seconds: float) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*[SleepBlock(dim, seconds) for _ in range(blocks)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


def mse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return ((out - target) ** 2).mean()
