"""Shared fixtures: fake process groups for structure tests, hypothesis profiles.

Multi-rank numerics use `fxpar.testing.rank_pool` (real gloo processes).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from hypothesis import HealthCheck, settings

os.environ.setdefault("FXPAR_CHECK", "1")

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
