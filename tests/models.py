"""Small models shared by tests (importable by worker processes: no fixtures here)."""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F


class MLPBlock(nn.Module):
    def __init__(self, dim: int, hidden: int, *, bias: bool = True, act: str = "gelu", residual: bool = True) -> None:
        super().__init__()
        self.up = nn.Linear(dim, hidden, bias=bias)
        self.down = nn.Linear(hidden, dim, bias=bias)
        self.act = act
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = getattr(F, self.act)(self.up(x))
        y = self.down(h)
        return y + x if self.residual else y


class NormBlock(nn.Module):
    """A pre-norm residual MLP block: x + down(gelu(up(norm(x))))."""

    def __init__(self, dim: int = 32, hidden: int = 128) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.up = nn.Linear(dim, hidden)
        self.down = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(F.gelu(self.up(self.norm(x))))


class BlockStack(nn.Module):
    """`depth` NormBlocks under `blocks` and nothing else (a perfectly balanced pipeline split exists)."""

    def __init__(self, depth: int = 4, dim: int = 32, hidden: int = 128, *, seed: int | None = None) -> None:
        super().__init__()
        if seed is not None:
            torch.manual_seed(seed)
        self.blocks = nn.ModuleList([NormBlock(dim, hidden) for _ in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


class GatedMLP(nn.Module):
    """Llama's SwiGLU MLP: down(silu(gate(x)) * up(x))."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x)) + x


class MLPStack(nn.Module):
    def __init__(self, dim: int = 16, hidden: int = 32, depth: int = 2, **kw) -> None:
        super().__init__()
        self.layers = nn.ModuleList([MLPBlock(dim, hidden, **kw) for _ in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class Chain(nn.Module):
    """Linear layers of given widths with activations between them: widths[0] -> ... -> widths[-1]."""

    def __init__(self, widths: list[int], *, bias: bool = True, act: str = "relu") -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(a, b, bias=bias) for a, b in zip(widths, widths[1:])])
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = getattr(F, self.act)(x)
        return x


class Flattening(nn.Module):
    """Views of the batch dims around an MLP: (B, T, D) -> (B*T, D) -> (B, T, D)."""

    def __init__(self, dim: int = 16, hidden: int = 32) -> None:
        super().__init__()
        self.mlp = MLPBlock(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        y = self.mlp(x.reshape(b * t, d))
        return y.view(b, t, d)


class NoRuleOp(nn.Module):
    """An MLP with an op fxpar has no sharding rule for in the middle (the replicated fallback)."""

    def __init__(self, dim: int = 16, hidden: int = 32) -> None:
        super().__init__()
        self.up = nn.Linear(dim, hidden)
        self.down = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.logcumsumexp(self.up(x), dim=-1))


def mse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return ((out - target) ** 2).mean()


# --------------------------------------------------------------------------- torchtitan-style Llama


def precompute_freqs_cis(dim: int, end: int, theta: float = 10000.0) -> torch.Tensor:
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: (dim // 2)].float() / dim))
    t = torch.arange(end, device=freqs.device)
    freqs = torch.outer(t, freqs).float()
    return torch.polar(torch.ones_like(freqs), freqs)  # complex64


def apply_rotary_emb(xq: torch.Tensor, xk: torch.Tensor, freqs_cis: torch.Tensor):
    xq_ = torch.view_as_complex(xq.float().reshape(*xq.shape[:-1], -1, 2))
    xk_ = torch.view_as_complex(xk.float().reshape(*xk.shape[:-1], -1, 2))
    freqs_cis = freqs_cis.view(1, xq_.shape[1], 1, xq_.shape[-1])
    xq_out = torch.view_as_real(xq_ * freqs_cis).flatten(3)
    xk_out = torch.view_as_real(xk_ * freqs_cis).flatten(3)
    return xq_out.type_as(xq), xk_out.type_as(xk)


class TitanAttention(nn.Module):
    def __init__(self, dim: int, n_heads: int, n_kv_heads: int) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, dim // n_heads
        self.wq = nn.Linear(dim, n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(n_heads * self.head_dim, dim, bias=False)

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
        bs, seqlen, _ = x.shape
        xq, xk, xv = self.wq(x), self.wk(x), self.wv(x)
        xq = xq.view(bs, seqlen, -1, self.head_dim)
        xk = xk.view(bs, seqlen, -1, self.head_dim)
        xv = xv.view(bs, seqlen, -1, self.head_dim)
        xq, xk = apply_rotary_emb(xq, xk, freqs_cis)
        rep = self.n_heads // self.n_kv_heads
        if rep > 1:
            xk = xk[:, :, :, None, :].expand(bs, seqlen, self.n_kv_heads, rep, self.head_dim).reshape(
                bs, seqlen, self.n_kv_heads * rep, self.head_dim)
            xv = xv[:, :, :, None, :].expand(bs, seqlen, self.n_kv_heads, rep, self.head_dim).reshape(
                bs, seqlen, self.n_kv_heads * rep, self.head_dim)
        xq, xk, xv = xq.transpose(1, 2), xk.transpose(1, 2), xv.transpose(1, 2)
        out = F.scaled_dot_product_attention(xq, xk, xv, is_causal=True)
        out = out.transpose(1, 2).contiguous().view(bs, seqlen, -1)
        return self.wo(out)


class TitanFeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TitanBlock(nn.Module):
    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, hidden: int) -> None:
        super().__init__()
        self.attention = TitanAttention(dim, n_heads, n_kv_heads)
        self.feed_forward = TitanFeedForward(dim, hidden)
        self.attention_norm = nn.RMSNorm(dim, eps=1e-5)
        self.ffn_norm = nn.RMSNorm(dim, eps=1e-5)

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), freqs_cis)
        return h + self.feed_forward(self.ffn_norm(h))


class TitanLlama(nn.Module):
    """A Llama written the way torchtitan writes it (complex rotary, ModuleDict of layers)."""

    def __init__(self, vocab: int = 128, dim: int = 32, n_layers: int = 2, n_heads: int = 4, n_kv_heads: int = 2,
                 hidden: int = 64, max_seq: int = 64) -> None:
        super().__init__()
        self.tok_embeddings = nn.Embedding(vocab, dim)
        self.register_buffer("freqs_cis", precompute_freqs_cis(dim // n_heads, max_seq * 2), persistent=False)
        self.layers = nn.ModuleDict({str(i): TitanBlock(dim, n_heads, n_kv_heads, hidden) for i in range(n_layers)})
        self.norm = nn.RMSNorm(dim, eps=1e-5)
        self.output = nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.tok_embeddings(tokens)
        freqs_cis = self.freqs_cis[: tokens.shape[1]]
        for layer in self.layers.values():
            h = layer(h, freqs_cis)
        return self.output(self.norm(h))


def tiny_gpt2(n_layer: int = 2, n_embd: int = 32, *, vocab_size: int = 128, n_positions: int = 64,
              dtype: torch.dtype | None = None, device: str | None = None, **config) -> nn.Module:
    """The tests' one small Hugging Face GPT-2, in eval mode (dropout off), no KV cache; `config` overrides."""
    import transformers

    cfg = transformers.GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=4, vocab_size=vocab_size,
                                  n_positions=n_positions, use_cache=False, bos_token_id=0, eos_token_id=0, **config)
    with torch.device(device) if device is not None else contextlib.nullcontext():
        model = transformers.GPT2LMHeadModel(cfg)
    return (model.to(dtype) if dtype is not None else model).eval()


# --------------------------------------------------------------------------- tied weights, batch-keeping index


class TiedLastToken(nn.Module):
    """nanoGPT's generation path: lm_head tied to the token embedding, applied to `h[:, [-1], :]`.

    With `no_rule=True` an op fxpar has no sharding rule for (logcumsumexp) runs before the
    index, so the batch really is gathered next to the tied weight's batch-sharded use.
    """

    def __init__(self, vocab: int = 32, dim: int = 16, *, no_rule: bool = False) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, dim)
        self.fc = nn.Linear(dim, dim)
        self.ln = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.wte.weight
        self.no_rule = no_rule

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.wte(idx)
        h = self.ln(h + F.gelu(self.fc(h)))
        if self.no_rule:
            h = torch.logcumsumexp(h, dim=1)
        return self.lm_head(h[:, [-1], :])


class BNStack(nn.Module):
    """Blocks of Linear -> BatchNorm1d -> ReLU (a batch-coupled op: statistics over the batch)."""

    def __init__(self, dim: int = 8, depth: int = 2) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(dim, dim, bias=False), nn.BatchNorm1d(dim), nn.ReLU())
                                     for _ in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


class BasicBlock(nn.Module):
    """ResNet's basic block: relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h))
        return F.relu(h + (x if self.shortcut is None else self.shortcut(x)))


class ResNet(nn.Module):
    """A small ResNet (torchvision's layout: stem, max pool, basic blocks, adaptive pool, flatten, fc)."""

    def __init__(self, widths: tuple[int, ...] = (8, 16), blocks: int = 2, classes: int = 10,
                 in_channels: int = 3) -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(widths[0])
        layers, cin = [], widths[0]
        for i, w in enumerate(widths):
            for j in range(blocks):
                layers.append(BasicBlock(cin, w, 2 if i > 0 and j == 0 else 1))
                cin = w
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.bn(self.stem(x))), 2)
        x = self.layers(x)
        return self.fc(torch.flatten(self.pool(x), 1))


class ConvNet1d(nn.Module):
    """conv1d pairs with biases (the row-parallel conv's bias is added after the reduce) and avg pooling."""

    def __init__(self, cin: int = 4, hidden: int = 16, classes: int = 6) -> None:
        super().__init__()
        self.up = nn.Conv1d(cin, hidden, 3, padding=1)
        self.down = nn.Conv1d(hidden, cin, 3, padding=1)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.avg_pool1d(F.gelu(self.up(x)), 2)
        h = self.down(h) + F.avg_pool1d(x, 2)
        return self.fc(F.adaptive_max_pool1d(h, 1).flatten(1))


class FusedChunkAttention(nn.Module):
    """Self-attention with a fused qkv split by `chunk(3, dim=-1)` (q, k, v sections, not per head) and
    optional q/k norms over head_dim (Qwen3's RMSNorm, or OLMo-style LayerNorm), then an MLP."""

    def __init__(self, dim: int = 32, heads: int = 4, *, qk_norm: str | None = None) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        norm = {None: None, "rms": lambda: nn.RMSNorm(self.head_dim),
                "layer": lambda: nn.LayerNorm(self.head_dim)}[qk_norm]
        self.q_norm = norm() if norm else None
        self.k_norm = norm() if norm else None
        self.mlp = MLPBlock(dim, 2 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q, k, v = (t.view(B, T, self.heads, self.head_dim) for t in (q, k, v))
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        x = x + self.out(y.transpose(1, 2).reshape(B, T, C))
        return self.mlp(x)


class DecomposedQKNormAttention(nn.Module):
    """q / k / v projections with a hand-written RMSNorm over head_dim on q and k (as Hugging Face's
    Qwen3RMSNorm: pow, mean over the last dim, rsqrt, weight), then out."""

    def __init__(self, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim, bias=False) for _ in range(4))
        self.q_w = nn.Parameter(torch.rand(self.head_dim) + 0.5)
        self.k_w = nn.Parameter(torch.rand(self.head_dim) + 0.5)

    @staticmethod
    def _rms(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        shape = (B, T, self.heads, self.head_dim)
        q = self._rms(self.q(x).view(shape), self.q_w).transpose(1, 2)
        k = self._rms(self.k(x).view(shape), self.k_w).transpose(1, 2)
        v = self.v(x).view(shape).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return x + self.o(y.transpose(1, 2).reshape(B, T, C))


class RawParamMLP(nn.Module):
    """An MLP block on raw nn.Parameters of one custom module: `x @ self.w_up`, `torch.einsum`, or
    `F.linear(x, self.w)`; both halves of the Megatron pair live in the same module."""

    def __init__(self, dim: int = 16, hidden: int = 32, *, kind: str = "matmul") -> None:
        super().__init__()
        self.kind = kind
        if kind == "linear":  # F.linear's layout: [out, in]
            self.w_up, self.w_down = nn.Parameter(torch.randn(hidden, dim) / 4), nn.Parameter(torch.randn(dim, hidden) / 4)
        else:  # x @ W: [in, out]
            self.w_up, self.w_down = nn.Parameter(torch.randn(dim, hidden) / 4), nn.Parameter(torch.randn(hidden, dim) / 4)
        self.b_up = nn.Parameter(torch.randn(hidden) / 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "matmul":
            h = x @ self.w_up + self.b_up
            return x + F.gelu(h) @ self.w_down
        if self.kind == "einsum":
            h = torch.einsum("btd,dh->bth", x, self.w_up) + self.b_up
            return x + torch.einsum("bth,hd->btd", F.gelu(h), self.w_down)
        return x + F.linear(F.gelu(F.linear(x, self.w_up, self.b_up)), self.w_down)


class RawParamStack(nn.Module):
    def __init__(self, kind: str = "matmul", depth: int = 2) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([RawParamMLP(kind=kind) for _ in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


# --------------------------------------------------------------------------- mixture of experts (torchtitan-style)


class TitanRoutedMoE(nn.Module):
    """torchtitan's MoE layer in miniature: top-k token-choice router, routed experts, a shared expert.

    As torchtitan (models/common/moe.py): softmax router scores, `expert_bias` (auxiliary-loss-free load
    balancing, used for the choice only) and `tokens_per_expert` buffers, the latter counted with histc
    and accumulated in forward; tokens sorted by expert and the experts' outputs combined with
    scatter_add. `grouped_mm=True` runs the experts as torchtitan does, `torch._grouped_mm` on bf16 casts
    of the stacked weights (the only dtype the op takes); otherwise a per-expert loop in the model's dtype.
    """

    def __init__(self, dim: int = 16, hidden: int = 32, experts: int = 4, top_k: int = 2, *,
                 grouped_mm: bool = False) -> None:
        super().__init__()
        self.experts, self.top_k, self.grouped_mm = experts, top_k, grouped_mm
        self.gate = nn.Linear(dim, experts, bias=False)
        self.w1 = nn.Parameter(torch.randn(experts, hidden, dim) * dim ** -0.5)
        self.w2 = nn.Parameter(torch.randn(experts, dim, hidden) * hidden ** -0.5)
        self.w3 = nn.Parameter(torch.randn(experts, hidden, dim) * dim ** -0.5)
        self.shared = GatedMLP(dim, hidden)
        self.register_buffer("expert_bias", torch.linspace(-0.05, 0.05, experts))
        self.register_buffer("tokens_per_expert", torch.zeros(experts))

    def _experts(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x: tokens sorted by expert (N, D); counts[e] of them go to expert e."""
        if self.grouped_mm:
            offs = torch.cumsum(counts, dim=0, dtype=torch.int32)
            xb = x.bfloat16()
            h = F.silu(torch._grouped_mm(xb, self.w1.bfloat16().transpose(-2, -1), offs=offs))
            h = h * torch._grouped_mm(xb, self.w3.bfloat16().transpose(-2, -1), offs=offs)
            return torch._grouped_mm(h, self.w2.bfloat16().transpose(-2, -1), offs=offs).type_as(x)
        # Which expert each sorted row belongs to, without a data-dependent split.
        owner = torch.bucketize(torch.arange(x.shape[0], device=x.device), torch.cumsum(counts, 0), right=True)
        out = torch.zeros_like(x)
        for e in range(self.experts):
            y = F.linear(F.silu(F.linear(x, self.w1[e])) * F.linear(x, self.w3[e]), self.w2[e])
            out = out + y * (owner == e).unsqueeze(-1).to(x.dtype)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        flat = x.reshape(B * L, D)
        scores = F.softmax(self.gate(flat), dim=-1)
        _, ids = torch.topk(scores + self.expert_bias.to(scores.dtype), self.top_k, dim=-1)
        weights = scores.gather(-1, ids)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        counts = torch.histc(ids.reshape(-1).float(), bins=self.experts, min=0, max=self.experts)
        if self.training:
            with torch.no_grad():
                self.tokens_per_expert.add_(counts.to(self.tokens_per_expert.dtype))
        order = torch.argsort(ids.reshape(-1), stable=True)
        token = order // self.top_k
        routed = self._experts(flat[token], counts.to(torch.int64)) * weights.reshape(-1)[order].unsqueeze(-1)
        out = torch.zeros_like(flat).scatter_add(0, token.unsqueeze(-1).expand(-1, D), routed)
        return out.reshape(B, L, D) + self.shared(x)


class TitanMoELM(nn.Module):
    """A small decoder of pre-norm MoE blocks (embedding, RMSNorm, TitanRoutedMoE, lm_head)."""

    def __init__(self, vocab: int = 64, dim: int = 16, hidden: int = 32, experts: int = 4, top_k: int = 2,
                 layers: int = 2, *, grouped_mm: bool = False) -> None:
        super().__init__()
        self.tok_embeddings = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList([nn.ModuleDict({"norm": nn.RMSNorm(dim), "moe": TitanRoutedMoE(
            dim, hidden, experts, top_k, grouped_mm=grouped_mm)}) for _ in range(layers)])
        self.norm = nn.RMSNorm(dim)
        self.output = nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            h = h + layer["moe"](layer["norm"](h))
        return self.output(self.norm(h))

class TitanGroupedExperts(nn.Module):
    """torchtitan's GroupedExperts layout: w1 (gate), w3 (up): (E, hidden, dim); w2 (down): (E, dim, hidden).

    Computed as a per-expert loop over all tokens, each weighted by its routing weight for that expert
    (zero if not routed there): exact and exportable with static shapes."""

    def __init__(self, dim: int, hidden: int, num_experts: int) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(num_experts, hidden, dim) / dim ** 0.5)
        self.w2 = nn.Parameter(torch.randn(num_experts, dim, hidden) / hidden ** 0.5)
        self.w3 = nn.Parameter(torch.randn(num_experts, hidden, dim) / dim ** 0.5)

    def forward(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)
        for e in range(self.w1.shape[0]):
            coef = ((idx == e).to(x.dtype) * weights).sum(-1, keepdim=True)  # (T, 1)
            h = F.silu(x @ self.w1[e].t()) * (x @ self.w3[e].t())
            out = out + coef * (h @ self.w2[e].t())
        return out


class TitanMoE(nn.Module):
    """torchtitan-style MoE layer: a top-k token-choice router (sigmoid scores, renormalized) and grouped
    experts; counts the tokens routed to each expert (the load-balancing counter) in a buffer."""

    def __init__(self, dim: int, hidden: int, num_experts: int = 4, top_k: int = 2) -> None:
        super().__init__()
        self.top_k = top_k
        self.router = nn.Linear(dim, num_experts, bias=False)
        self.experts = TitanGroupedExperts(dim, hidden, num_experts)
        self.register_buffer("tokens_per_expert", torch.zeros(num_experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        flat = x.reshape(-1, d)
        scores = torch.sigmoid(self.router(flat))
        top, idx = scores.topk(self.top_k, dim=-1)
        top = top / top.sum(-1, keepdim=True)
        with torch.no_grad():
            self.tokens_per_expert.add_(
                F.one_hot(idx.reshape(-1), self.tokens_per_expert.shape[0]).sum(0).to(self.tokens_per_expert.dtype))
        return self.experts(flat, idx, top).reshape(b, s, d)


class TitanMoEStack(nn.Module):
    """Pre-norm residual MoE blocks between an input and an output projection."""

    def __init__(self, dim: int = 16, hidden: int = 32, depth: int = 2, num_experts: int = 4, top_k: int = 2) -> None:
        super().__init__()
        self.inp = nn.Linear(dim, dim)
        self.norms = nn.ModuleList([nn.LayerNorm(dim) for _ in range(depth)])
        self.moes = nn.ModuleList([TitanMoE(dim, hidden, num_experts, top_k) for _ in range(depth)])
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        for norm, moe in zip(self.norms, self.moes):
            x = x + moe(norm(x))
        return self.out(x)


class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1x1 expand -> BN -> ReLU6 -> 3x3 depthwise (groups == channels) -> BN -> ReLU6 ->
    1x1 project -> BN, plus the input. The depthwise conv sits between the Megatron pair's convs."""

    def __init__(self, dim: int = 8, expand: int = 4) -> None:
        super().__init__()
        hidden = dim * expand
        self.expand = nn.Conv2d(dim, hidden, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(hidden)
        self.dw = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden, bias=False)
        self.bn2 = nn.BatchNorm2d(hidden)
        self.project = nn.Conv2d(hidden, dim, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu6(self.bn1(self.expand(x)))
        h = F.relu6(self.bn2(self.dw(h)))
        return x + self.bn3(self.project(h))


class MobileNetLike(nn.Module):
    """A stem, inverted residual blocks (one with a grouped, not depthwise, middle conv), pooling and a head."""

    def __init__(self, dim: int = 8, blocks: int = 2, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, dim, 3, padding=1, bias=False)
        self.blocks = nn.Sequential(*[InvertedResidual(dim) for _ in range(blocks)])
        self.blocks[-1].dw = nn.Conv2d(4 * dim, 4 * dim, 3, padding=1, groups=4, bias=True)  # 4 groups of 8
        self.fc = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class ConvNeXtBlock(nn.Module):
    """ConvNeXt's block: 7x7 depthwise conv -> channels-last LayerNorm -> Linear 4x -> GELU -> Linear -> residual."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.pwconv2 = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.dwconv(x).permute(0, 2, 3, 1))
        h = self.pwconv2(F.gelu(self.pwconv1(h)))
        return x + h.permute(0, 3, 1, 2)
