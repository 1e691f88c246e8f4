import torch.distributed as dist
from fxpar.testing import sim_world
from tests.conftest import fake_mesh

def test_a_shared_world_survives_destroying_the_default_group():
    w = sim_world({"tp": 2})
    fake_mesh((2,), ("tp",))
    dist.destroy_process_group()
    w2 = sim_world({"tp": 2})
    assert w2 is w
    from fxpar._torch.c10d import resolve_process_group
    for pg in w._pgs:
        assert resolve_process_group(pg.group_name) is pg
