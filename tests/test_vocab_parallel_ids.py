"""Issue 14.5: ids past the vocabulary fail on a vocab-parallel embedding as on the original.

The vocab-parallel lookup masks the ids outside this rank's rows to zeros, so an id past the
whole vocabulary gave a finite (zero) row instead of embedding's IndexError. The ids are
replicated on the vocab mesh dim: every rank checks them locally, no communication.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import fxpar
from fxpar.testing import rank_pool


class Emb(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(16, 8)
        self.proj = nn.Linear(8, 4)

    def forward(self, ids):
        return self.proj(self.emb(ids))


def _lookup(bad_id: int | None) -> dict:
    mesh = torch.distributed.device_mesh.init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))
    torch.manual_seed(0)
    model = Emb().double()
    ids = torch.randint(0, 16, (2, 5))
    pm = fxpar.parallelize(model, mesh, example_inputs=(ids,), plan={"emb": "rowwise"})
    targets = {str(n.target) for n in pm.graph_module.graph.nodes}
    assert "fxpar.vocab_parallel_embedding.default" in targets, targets
    ok = (pm(ids) - model(ids)).abs().max().item()
    if bad_id is None:
        return {"ok": ok}
    bad = ids.clone()
    bad[1, 3] = bad_id
    errors = []
    for m in (model, pm):
        try:
            m(bad)
            errors.append(None)
        except IndexError as e:
            errors.append(str(e))
    return {"ok": ok, "errors": errors}


@pytest.mark.parametrize("bad_id", [16, 40, -1])
def test_ids_out_of_range_raise_index_error_like_the_original(bad_id):
    for r in rank_pool(2).run(_lookup, bad_id):
        assert r["ok"] < 1e-12, r
        ref, got = r["errors"]
        assert ref is not None and "index out of range" in ref, r
        assert got is not None and "index out of range" in got, r
