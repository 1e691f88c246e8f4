"""Shared fixtures: fake process groups for structure tests, hypothesis profiles.

Multi-rank numerics use `fxpar.testing.rank_pool` (real gloo processes).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from hypothesis import HealthCheck, settings

from fxpar.testing import preload

os.environ.setdefault("FXPAR_CHECK", "1")

# Rank processes start with pytest, transformers and the model families most tests build already
# imported: the forkserver imports them once, instead of every fresh rank of every pool (and every
# pool restarted after a failed run) spending seconds on it. Skipped where transformers is missing.
preload("pytest", "transformers", "transformers.models.gpt2.modeling_gpt2",
        "transformers.models.llama.modeling_llama", "transformers.models.qwen2.modeling_qwen2",
        "transformers.models.bert.modeling_bert")

settings.register_profile(
    "ci", derandomize=True, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.register_profile("dev", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def fake_mesh(shape: tuple[int, ...], names: tuple[str, ...] | None = None, rank: int = 0):
    """A DeviceMesh on torch's fake backend: structure only, collectives return garbage."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    world = 1
    for s in shape:
        world *= s
    if dist.is_initialized():
        dist.destroy_process_group()
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    return init_device_mesh("cpu", shape, mesh_dim_names=names)


@pytest.fixture
def make_fake_mesh():
    yield fake_mesh
    if dist.is_initialized():
        dist.destroy_process_group()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
