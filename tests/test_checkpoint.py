"""Distributed checkpoints (fxpar.checkpoint): save on one mesh, resume on another, exactly.

A GPT-2 trains 3 AdamW steps on tp=2 in float64 and is saved with its optimizer;
it is loaded on other meshes (dp x tp, tp x dp, pp, fsdp, fsdp x tp) and trains 3
more steps: losses and final weights must equal 6 steps of the unsplit model.
Also: the folder read back with torch's `dcp_to_torch_save`, refusal of a
checkpoint of another model, a rank killed during a save, async saves.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import fxpar
from fxpar.checkpoint import CheckpointError
from fxpar.testing import RankError, rank_pool

transformers = pytest.importorskip("transformers")

LR = 1e-2


def gpt2(n_layer: int = 2):
    T = transformers
    return T.GPT2LMHeadModel(T.GPT2Config(n_layer=n_layer, n_embd=32, n_head=4, vocab_size=128, n_positions=64,
                                          use_cache=False, bos_token_id=0, eos_token_id=0)).eval()


def ce(out, target):
    logits = out if isinstance(out, torch.Tensor) else out.logits
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1))


def _model_and_batches(n_layer: int = 2):
    torch.manual_seed(0)
    model = gpt2(n_layer).double()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randint(0, 128, (4, 8), generator=g), torch.randint(0, 128, (4, 8), generator=g))
               for _ in range(6)]
    return model, batches


def _reference() -> tuple[list[float], dict[str, torch.Tensor]]:
    """6 AdamW steps of the unsplit model: losses and final parameters."""
    model, batches = _model_and_batches()
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    losses = []
    for ids, target in batches:
        opt.zero_grad()
        loss = ce(model(ids), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}


def _mesh(shape, names):
    return torch.distributed.device_mesh.init_device_mesh("cpu", shape, mesh_dim_names=names)


def _train(pm, opt, batches) -> list[float]:
    losses = []
    for ids, target in batches:
        opt.zero_grad()
        losses.append(pm.step(ids, target=target, loss_fn=ce).item())
        opt.step()
    return losses


def _first_half(path: str, shape=(2,), names=("tp",)) -> list[float]:
    model, batches = _model_and_batches()
    pm = fxpar.parallelize(model, _mesh(shape, names), example_inputs=(batches[0][0],))
    opt = torch.optim.AdamW(pm.parameters(), lr=LR)
    losses = _train(pm, opt, batches[:3])
    fxpar.checkpoint.save(pm, path, optimizer=opt, extra={"step": 3, "losses": losses})
    return losses


def _second_half(path: str, shape, names, plan=None) -> dict:
    model, batches = _model_and_batches()
    pm = fxpar.parallelize(model, _mesh(shape, names), example_inputs=(batches[0][0],), plan=plan)
    # A wrong learning rate on purpose: the checkpoint's hyperparameters replace it.
    opt = torch.optim.AdamW(pm.parameters(), lr=1.0)
    extra = fxpar.checkpoint.load(pm, path, optimizer=opt)
    lr = opt.param_groups[0]["lr"]
    losses = _train(pm, opt, batches[3:])
    full = pm.full_state_dict()
    return {"extra": extra, "lr": lr, "losses": losses, "full": full if dist.get_rank() == 0 else None}


@pytest.fixture(scope="module")
def tp2_checkpoint(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("ckpt") / "step3")
    losses = rank_pool(2).run(_first_half, path, timeout=300)[0]
    return path, losses


@pytest.fixture(scope="module")
def reference():
    return _reference()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


MESHES = {
    "dp2xtp2": ((2, 2), ("dp", "tp"), None),
    "tp2xdp2": ((2, 2), ("tp", "dp"), None),
    "pp2": ((2,), ("pp",), None),
    "fsdp2": ((2,), ("fsdp",), None),
    "fsdp2xtp2": ((2, 2), ("fsdp", "tp"), None),
}
SLOW_MESHES = {
    "pp2xtp2": ((2, 2), ("pp", "tp"), None),
    "fsdp2xpp2": ((2, 2), ("fsdp", "pp"), None),
    "tp4": ((4,), ("tp",), None),
}


@pytest.mark.parametrize("mesh", [*MESHES, *(pytest.param(m, marks=pytest.mark.slow) for m in SLOW_MESHES)])
def test_resume_on_another_mesh_equals_one_process(tp2_checkpoint, reference, mesh):
    path, first = tp2_checkpoint
    ref_losses, ref_state = reference
    shape, names, plan = {**MESHES, **SLOW_MESHES}[mesh]
    n = 1
    for s in shape:
        n *= s
    results = rank_pool(n).run(_second_half, path, shape, names, plan, timeout=300)
    losses = first + results[0]["losses"]
    for got, want in zip(losses, ref_losses):
        assert abs(got - want) <= 1e-9 * abs(want), (mesh, losses, ref_losses)
    for r in results:
        assert r["losses"] == results[0]["losses"]
        assert r["extra"] == {"step": 3, "losses": first}
        assert r["lr"] == LR
    full = results[0]["full"]
    worst = max((_rel(full[k], v), k) for k, v in ref_state.items())
    assert worst[0] <= 1e-9, (mesh, worst)


def test_dcp_to_torch_save_gives_the_original_state_dict(tp2_checkpoint, tmp_path):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    path, _ = tp2_checkpoint
    # The values at the save: the unsplit model after the same 3 steps.
    model, batches = _model_and_batches()
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    for ids, target in batches[:3]:
        opt.zero_grad()
        ce(model(ids), target).backward()
        opt.step()
    out = tmp_path / "model.pt"
    dcp_to_torch_save(path, out)
    saved = torch.load(out, weights_only=False)
    want = model.state_dict()
    assert set(want) <= set(saved), sorted(set(want) - set(saved))
    for k, v in want.items():
        assert saved[k].shape == v.shape and _rel(saved[k], v) <= 1e-9, k  # tp2 training vs one process, not the checkpoint
    # optimizer state keyed by FQN, full values: AdamW's exp_avg of a fused (strided) tensor
    name = "transformer.h.0.attn.c_attn.weight"
    p = dict(model.named_parameters())[name]
    assert _rel(saved[f"optim.state.{name}.exp_avg"], opt.state[p]["exp_avg"]) <= 1e-9
    assert saved[f"optim.state.{name}.step"].item() == 3
    assert saved["extra"]["step"] == 3


def _load_bigger(path: str) -> tuple[str, list[str]]:
    model, batches = _model_and_batches(n_layer=3)
    pm = fxpar.parallelize(model, _mesh((2,), ("tp",)), example_inputs=(batches[0][0],))
    before = pm.full_state_dict()
    try:
        fxpar.checkpoint.load(pm, path)
        message = ""
    except CheckpointError as e:
        message = str(e)
    assert all(torch.equal(v, before[k]) for k, v in pm.full_state_dict().items())  # refused: nothing loaded
    fxpar.checkpoint.load(pm, path, strict=False)
    after = pm.full_state_dict()
    return message, sorted(k for k in after if not torch.equal(after[k], before[k]))


def test_a_checkpoint_of_another_model_is_refused(tp2_checkpoint):
    path, _ = tp2_checkpoint
    message, changed = rank_pool(2).run(_load_bigger, path, timeout=300)[0]
    assert "missing" in message and "transformer.h.2" in message, message
    assert "transformer.h.2.attn.c_attn.weight" in message
    # strict=False: everything but the extra layer loads
    assert changed and not any(k.startswith("transformer.h.2.") for k in changed)
    assert "transformer.h.0.attn.c_attn.weight" in changed


def _save_then_crash(path: str) -> None:
    model, batches = _model_and_batches()
    pm = fxpar.parallelize(model, _mesh((2,), ("tp",)), example_inputs=(batches[0][0],))
    opt = torch.optim.AdamW(pm.parameters(), lr=LR)
    _train(pm, opt, batches[:1])
    fxpar.checkpoint.save(pm, path, optimizer=opt, extra={"step": 1})
    _train(pm, opt, batches[1:2])
    if dist.get_rank() == 1:
        # rank 1 dies in the middle of writing its shards of the next checkpoint
        original = torch.distributed.checkpoint.FileSystemWriter.write_data

        def write_and_die(self, plan, planner):
            original(self, plan, planner)
            os._exit(17)

        torch.distributed.checkpoint.FileSystemWriter.write_data = write_and_die
    fxpar.checkpoint.save(pm, path, optimizer=opt, extra={"step": 2})


def _load_step(path: str) -> dict:
    model, batches = _model_and_batches()
    pm = fxpar.parallelize(model, _mesh((2,), ("dp",)), example_inputs=(batches[0][0],))
    opt = torch.optim.AdamW(pm.parameters(), lr=LR)
    extra = fxpar.checkpoint.load(pm, path, optimizer=opt)
    return {"extra": extra, "full": pm.full_state_dict()}


def test_a_rank_killed_during_a_save_leaves_the_previous_checkpoint(tmp_path):
    path = str(tmp_path / "ckpt")
    with pytest.raises(RankError):
        rank_pool(2).run(_save_then_crash, path, timeout=120)
    assert os.path.exists(os.path.join(path, ".metadata"))
    assert any(name.startswith("ckpt.tmp-") for name in os.listdir(tmp_path))  # the interrupted save
    r = rank_pool(2).run(_load_step, path, timeout=300)[0]
    assert r["extra"] == {"step": 1}
    model, batches = _model_and_batches()
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    ce(model(batches[0][0]), batches[0][1]).backward()
    opt.step()
    assert max(_rel(r["full"][k], v) for k, v in model.state_dict().items()) <= 1e-9


def _async_save(path: str) -> dict:
    model, batches = _model_and_batches()
    pm = fxpar.parallelize(model, _mesh((2,), ("tp",)), example_inputs=(batches[0][0],))
    opt = torch.optim.AdamW(pm.parameters(), lr=LR)
    _train(pm, opt, batches[:1])
    at_save = pm.full_state_dict()
    future = fxpar.checkpoint.save(pm, path, optimizer=opt, extra={"step": 1}, async_save=True)
    # training goes on while the checkpoint is written: the parameters change in place
    _train(pm, opt, batches[1:3])
    future.result()
    moved = pm.full_state_dict()
    fxpar.checkpoint.load(pm, path, optimizer=opt)
    loaded = pm.full_state_dict()
    return {"changed": max(_rel(moved[k], v) for k, v in at_save.items()),
            "err": max(_rel(loaded[k], v) for k, v in at_save.items())}


def test_async_save_lets_training_go_on(tmp_path):
    for r in rank_pool(2).run(_async_save, str(tmp_path / "ckpt"), timeout=300):
        assert r["changed"] > 1e-3  # training really changed the weights during the write
        assert r["err"] == 0.0  # yet the checkpoint holds the weights at the save


def _state_dict_roundtrip() -> dict:
    model, batches = _model_and_batches()
    pm = fxpar.parallelize(model, _mesh((2, 2), ("fsdp", "tp")), example_inputs=(batches[0][0],))
    sd = pm.state_dict()
    from torch.distributed.tensor import DTensor

    full = {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in sd.items()}
    ref = model.state_dict()
    err = max(_rel(full[k], v) for k, v in ref.items())
    fresh = fxpar.parallelize(gpt2().double(), _mesh((2, 2), ("dp", "tp")), example_inputs=(batches[0][0],))
    keys = fresh.load_state_dict(sd)  # DTensors of another mesh: resharded
    loaded = fresh.full_state_dict()
    err2 = max(_rel(loaded[k], v) for k, v in ref.items())
    plain = fxpar.parallelize(gpt2().double(), _mesh((4,), ("tp",)), example_inputs=(batches[0][0],))
    plain.load_state_dict(copy.deepcopy(ref))  # full plain tensors
    err3 = max(_rel(plain.full_state_dict()[k], v) for k, v in ref.items())
    return {"keys": sorted(sd), "types": {type(v).__name__ for v in sd.values()}, "err": err, "err2": err2,
            "err3": err3, "missing": keys.missing_keys, "unexpected": keys.unexpected_keys}


def test_state_dict_is_dtensors_keyed_by_original_fqns():
    ref = gpt2().state_dict()
    for r in rank_pool(4).run(_state_dict_roundtrip, timeout=300):
        assert r["keys"] == sorted(ref)
        assert r["types"] == {"DTensor"}
        assert r["err"] == 0.0 and r["err2"] == 0.0 and r["err3"] == 0.0
        assert r["missing"] == [] and r["unexpected"] == []


def _sgd_phase(path: str, names: tuple, start: int, stop: int) -> dict:
    from models import MLPStack, mse

    n = dist.get_world_size()
    torch.manual_seed(0)
    model = MLPStack(dim=16, hidden=32, depth=2).double()
    x, y = torch.randn(8, 16, dtype=torch.float64), torch.randn(8, 16, dtype=torch.float64)
    pm = fxpar.parallelize(model, _mesh((n,), names), example_inputs=(x,))
    opt = torch.optim.SGD(pm.parameters(), lr=0.1, momentum=0.9)
    if start:
        fxpar.checkpoint.load(pm, path, optimizer=opt)
    for _ in range(start, stop):
        opt.zero_grad()
        pm.step(x, target=y, loss_fn=mse)
        opt.step()
    fxpar.checkpoint.save(pm, path, optimizer=opt)
    return pm.full_state_dict()


def test_sgd_momentum_reshards_with_its_parameter(tmp_path):
    from models import MLPStack, mse

    path = str(tmp_path / "sgd")
    rank_pool(2).run(_sgd_phase, path, ("tp",), 0, 2, timeout=300)
    got = rank_pool(2).run(_sgd_phase, path, ("fsdp",), 2, 4, timeout=300)[0]
    torch.manual_seed(0)
    model = MLPStack(dim=16, hidden=32, depth=2).double()
    x, y = torch.randn(8, 16, dtype=torch.float64), torch.randn(8, 16, dtype=torch.float64)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(4):
        opt.zero_grad()
        mse(model(x), y).backward()
        opt.step()
    assert max(_rel(got[k], v) for k, v in model.state_dict().items()) <= 1e-12
