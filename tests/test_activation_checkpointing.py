"""Activation checkpointing ("full", "selective"): gradients bit-equal to no checkpointing, less memory."""

from __future__ import annotations

import weakref

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import fxpar
from fxpar.core.errors import PlanError
from fxpar.testing import rank_pool

from tests.models import tiny_gpt2

transformers = pytest.importorskip("transformers")


def ce(out, target):
    logits = out if isinstance(out, torch.Tensor) else out.logits
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1))


class LiveBytes(TorchDispatchMode):
    """Peak bytes of tensor storages created inside the block and alive at once (deterministic: counted
    from the tensors, not the allocator); tensors that existed before (parameters) are not counted."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.now = self.peak = 0

    def _free(self, key: int) -> None:
        self.now -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                st = t.untyped_storage()
                key = id(st)
                if key not in self.live and st.nbytes():
                    self.live[key] = st.nbytes()
                    self.now += st.nbytes()
                    self.peak = max(self.peak, self.now)
                    weakref.finalize(st, self._free, key)
        return out


def _step(shape, names, mode, *, n_layer=2, n_embd=32, batch=4, seq=16, dtype=torch.float64) -> dict:
    return _steps(shape, names, (mode,), n_layer=n_layer, n_embd=n_embd, batch=batch, seq=seq, dtype=dtype)[mode]


def _steps(shape, names, modes, *, n_layer=2, n_embd=32, batch=4, seq=16, dtype=torch.float64) -> dict:
    """Each mode in `modes` against one no-checkpointing run (compiled once, shared by the modes)."""
    mesh = torch.distributed.device_mesh.init_device_mesh("cpu", shape, mesh_dim_names=names)
    torch.manual_seed(0)
    model = tiny_gpt2(n_layer=n_layer, n_embd=n_embd, n_positions=max(seq, 64), dtype=dtype)
    ids, target = torch.randint(0, 128, (batch, seq)), torch.randint(0, 128, (batch, seq))
    out = {}
    for m in (None, *modes):
        pm = fxpar.parallelize(model, mesh, example_inputs=(ids,), activation_checkpointing=m)
        with fxpar.count_comms() as comms, LiveBytes() as mem:
            loss = pm.step(ids, target=target, loss_fn=ce)
        out[m] = {"loss": loss, "grads": pm.full_grads(), "peak": mem.peak, "comms": len(comms),
                  "explain": pm.explain()}
    base = out[None]
    return {mode: {
        "bit_equal": all(torch.equal(base["grads"][k], ac["grads"][k]) for k in base["grads"]),
        "same_keys": base["grads"].keys() == ac["grads"].keys(),
        "loss_equal": torch.equal(base["loss"], ac["loss"]),
        "peak": base["peak"], "peak_ac": ac["peak"], "comms": base["comms"], "comms_ac": ac["comms"],
        "explain": ac["explain"],
    } for mode, ac in ((m, out[m]) for m in modes)}


_RESULTS: dict = {}  # (shape, names) -> per-rank results of both modes: one rank run per mesh, not per case


def _results(shape, names, mode) -> list:
    key = (shape, names)
    if key not in _RESULTS:
        _RESULTS[key] = rank_pool(2).run(_steps, shape, names, ("full", "selective"), timeout=300)
    return [r[mode] for r in _RESULTS[key]]


@pytest.mark.parametrize("mode", ["full", "selective"])
@pytest.mark.parametrize("shape,names", [((2,), ("tp",)), ((2,), ("dp",)), ((2,), ("fsdp",)), ((2,), ("pp",))],
                         ids=["tp2", "dp2", "fsdp2", "pp2"])
def test_gradients_bit_equal_to_no_checkpointing_float64(shape, names, mode):
    for r in _results(shape, names, mode):
        assert r["same_keys"] and r["loss_equal"]
        assert r["bit_equal"]
        assert r["peak_ac"] < r["peak"], r  # even a tiny model saves something
        if mode == "full" and names == ("tp",):
            # the blocks' tensor-parallel all-reduces run again in the backward's recomputation
            assert r["comms_ac"] > r["comms"], r
        assert f"Activation checkpointing: {mode}" in r["explain"]


def test_unknown_mode_is_a_plan_error():
    with pytest.raises(PlanError, match="activation_checkpointing='everything'"):
        fxpar.parallelize(tiny_gpt2(), None, example_inputs=(torch.randint(0, 128, (2, 8)),),
                          activation_checkpointing="everything")


@pytest.mark.slow
def test_long_sequence_gpt_peak_memory_at_most_0_6_of_no_checkpointing():
    # 8 blocks, 8 x 1024 tokens, tp2, float32
    for r in rank_pool(2).run(_step, (2,), ("tp",), "full", n_layer=8, n_embd=128, batch=8, seq=1024,
                              dtype=torch.float32, timeout=600):
        ratio = r["peak_ac"] / r["peak"]
        print(f"peak without {r['peak'] / 2**20:.1f} MiB, with full checkpointing {r['peak_ac'] / 2**20:.1f} MiB, "
              f"ratio {ratio:.3f}")
        assert ratio <= 0.6, r
