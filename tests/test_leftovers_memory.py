"""A dropped ParallelModule frees its graphs: nothing in fxpar keeps a compiled module alive.

What stays resident after parallelize beyond the parameters is measured by `python -m benchmarks.resident`
(first-use costs of torch.export and allocator / torch-global retention, not objects fxpar holds).
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

import fxpar

from tests.models import tiny_gpt2

pytest.importorskip("transformers")


def test_a_deleted_parallel_module_is_collected_with_its_graph(make_fake_mesh):
    mesh = make_fake_mesh((2, 2), ("fsdp", "tp"))
    model = tiny_gpt2(n_layer=2, n_embd=32, device="meta")
    pm = fxpar.parallelize(model, mesh, example_inputs=(torch.zeros(2, 8, dtype=torch.long),))
    assert pm.history and len(pm.graph_module.graph.nodes) > 100
    refs = [weakref.ref(pm), weakref.ref(pm.graph_module), weakref.ref(pm.graph_module.graph)]
    del pm
    gc.collect()
    assert [r() is None for r in refs] == [True, True, True]
