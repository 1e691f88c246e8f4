"""Bug: a graph left in the other train / eval mode (issue 14.8's class).

A faulty mode switch (or a capture in eval mode reused for training) leaves BatchNorm using its
running statistics while the model normalizes by the batch: every placement and collective is
still consistent, so no static check can see it; verify does, in the model's mode, and names
the outputs.
"""

from __future__ import annotations

import torch
import torch.nn as nn

import fxpar
from zoo import aten, compiled, mse, nodes, recompile


class NormBlock(nn.Module):
    def __init__(self, d: int = 8, h: int = 16) -> None:
        super().__init__()
        self.up, self.bn, self.down = nn.Linear(d, h), nn.BatchNorm1d(h), nn.Linear(h, d)

    def forward(self, x):
        return self.down(torch.relu(self.bn(self.up(x))))


def test_batch_norm_left_in_eval_mode_is_caught_numerically():
    model = NormBlock().train()
    world, pms, x, y = compiled(model, plan={"up": "colwise", "down": "rowwise"})
    ok = world.run(lambda r: fxpar.verify(model, pms[r], x, target=y, loss_fn=mse))
    assert ok[0].ok, str(ok[0])
    for pm in pms:
        (bn,) = nodes(pm.graph_module, aten.batch_norm.default)
        bn.args = (*bn.args[:5], False, *bn.args[6:])  # the planted bug: the eval-mode flag
        recompile(pm)
    fxpar.check(pms[0], ranks=pms)  # statically valid
    reports = world.run(lambda r: fxpar.verify(model, pms[r], x, target=y, loss_fn=mse))
    assert not reports[0].ok
    assert any(t.name.startswith("output") for t in reports[0].failed), str(reports[0])
