"""Small models shared by tests (importable by worker processes: no fixtures here)."""

from __future__ import annotations

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


def mse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return ((out - target) ** 2).mean()
