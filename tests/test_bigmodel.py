"""Models larger than one rank: built on meta, initialized shard by shard, loaded and saved as HF folders.

Fast checks (tiny GPT-2, tiny Llama, a plain nn.Module; float64; tp2, fsdp2, dp2 x tp2):
  - parallelize of a meta model allocates local shards and computes the model's buffers (rotary inv_freq)
  - pm.init_weights(seed) is bit-equal to the model's own init on one process after manual_seed(seed)
  - fxpar.checkpoint.load_hf of a sharded save_pretrained folder (float32 -> float64) is bit-equal to
    from_pretrained, and the logits agree; save_hf -> from_pretrained gives back the same tensors
The slow check: a GPT-2-shaped model (16 layers, d=1024) on fsdp2 x tp2, memory per rank by ru_maxrss.
"""

from __future__ import annotations

import ctypes
import math
import os
import resource

import pytest
import torch
import torch.nn.functional as F

import fxpar
from fxpar.testing import rank_pool, run_ranks
from models import MLPStack, TitanLlama, tiny_gpt2

transformers = pytest.importorskip("transformers")

SEED = 5
# fsdp3: uneven shards (GPT-2's 32 / 128 / 64 rows, Llama's 32 / 64 / 16 rows on 3 ranks), padded as FSDP2
MESHES = [((2,), ("tp",)), ((2,), ("fsdp",)), ((2, 2), ("dp", "tp")), ((3,), ("fsdp",))]


def _llama(device: str = "cpu") -> torch.nn.Module:
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=96, max_position_embeddings=32,
                                   tie_word_embeddings=True, use_cache=False, attn_implementation="sdpa",
                                   bos_token_id=0, eos_token_id=0, pad_token_id=0)
    with torch.device(device):
        return transformers.LlamaForCausalLM(cfg).eval()


def _build(kind: str, device: str) -> torch.nn.Module:
    if kind == "gpt2":
        return tiny_gpt2(device=device).double()
    if kind == "llama":
        return _llama(device).double()
    with torch.device(device):
        return MLPStack(dim=16, hidden=32).double()


def _reference_init(kind: str, seed: int) -> torch.nn.Module:
    """The whole model initialized on one process: its own init, after manual_seed(seed)."""
    model = _build(kind, "cpu")
    if kind == "mlp":  # a plain module: what its constructor does, in float64 (reset_parameters per module)
        torch.manual_seed(seed)
        for m in model.modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
        return model
    for obj in [*model.modules(), *model.parameters()]:  # Hugging Face skips what it initialized once
        if getattr(obj, "_is_hf_initialized", False):
            del obj._is_hf_initialized
    torch.manual_seed(seed)
    model.init_weights()
    return model


def _inputs(kind: str, batch: int = 4) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    if kind == "mlp":
        return torch.randn(batch, 8, 16, generator=g, dtype=torch.float64)
    return torch.randint(0, 96, (batch, 8), generator=g)


def _out(y):
    return y.logits if hasattr(y, "logits") else y


def _worst(full: dict, ref: torch.nn.Module, *, buffers: bool = True) -> float:
    tensors = dict(ref.named_parameters())
    if buffers:
        tensors.update(ref.named_buffers())
    assert set(tensors) <= set(full), set(tensors) - set(full)
    return max((full[k].double() - v.double()).abs().max().item() for k, v in tensors.items())


def _check(shape, names, folder: str) -> dict:
    mesh = torch.distributed.device_mesh.init_device_mesh("cpu", shape, mesh_dim_names=names)
    out = {}
    for kind in ("gpt2", "llama", "mlp"):
        x = _inputs(kind, 6 if 3 in shape else 4)
        pm = fxpar.parallelize(_build(kind, "meta"), mesh, example_inputs=(x,))
        assert all(p.device.type == "cpu" for p in pm.parameters())
        local = sum(p.numel() for p in pm.parameters())
        out[f"{kind} local fraction"] = local / sum(p.numel() for p in _build(kind, "meta").parameters())
        if kind == "llama":  # computed at parallelize by the model's own rotary init, not loaded
            ref = _build(kind, "cpu")
            full = pm.full_state_dict()
            out["llama inv_freq"] = max((full[k] - b).abs().max().item() for k, b in ref.named_buffers())
        report = pm.init_weights(seed=SEED)
        ref = _reference_init(kind, SEED)
        out[f"{kind} init"] = _worst(pm.full_state_dict(), ref)
        out[f"{kind} init untouched"] = report.untouched
        with torch.no_grad():
            out[f"{kind} init output"] = (_out(pm(x)) - _out(ref(x))).abs().max().item()
        if kind == "mlp":
            continue
        src = os.path.join(folder, f"{kind}-src")
        pm.init_weights(seed=SEED + 1)  # different values, then the checkpoint's
        load = fxpar.checkpoint.load_hf(pm, src)
        ref = type(ref).from_pretrained(src, dtype=torch.float64).eval()
        out[f"{kind} load"] = _worst(pm.full_state_dict(), ref)
        out[f"{kind} load missing"] = load.missing
        with torch.no_grad():
            out[f"{kind} load logits"] = (_out(pm(x)) - _out(ref(x))).abs().max().item()
        dst = os.path.join(folder, f"{kind}-{'x'.join(names)}")
        fxpar.checkpoint.save_hf(pm, dst, max_shard_size="100KB")
        back = type(ref).from_pretrained(dst, dtype=torch.float64)
        out[f"{kind} save"] = _worst({k: v for k, v in back.state_dict().items()}, ref, buffers=False)
        out[f"{kind} save files"] = sorted(os.listdir(dst))
    if names == ("tp",):
        try:
            fxpar.parallelize(TitanLlama(dim=16).to("meta"), mesh, example_inputs=(torch.randint(0, 128, (2, 8)),))
            out["titan"] = "no error"
        except fxpar.PlanError as e:
            out["titan"] = str(e)
        pm = fxpar.parallelize(_build("gpt2", "meta"), mesh, example_inputs=(_inputs("gpt2"),))
        report = pm.init_weights()  # seed=None: one seed drawn on rank 0, shared
        out["seed"] = report.seed
        out["seed none"] = _worst(pm.full_state_dict(), _reference_init("gpt2", report.seed))
    return out


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf")
    for kind in ("gpt2", "llama"):
        torch.manual_seed(0)
        model = _build(kind, "cpu").float()  # saved in float32, loaded into float64 models
        model.save_pretrained(path / f"{kind}-src", max_shard_size="100KB")
    assert (path / "gpt2-src" / "model.safetensors.index.json").exists()  # sharded
    return str(path)


@pytest.mark.parametrize("shape,names", MESHES, ids=["tp2", "fsdp2", "dp2xtp2", "fsdp3-uneven"])
def test_meta_model_init_load_save(shape, names, folder):
    results = rank_pool(math.prod(shape)).run(_check, shape, names, folder, timeout=240)
    r = results[0]
    for kind in ("gpt2", "llama", "mlp"):
        assert r[f"{kind} init"] == 0.0, (kind, r)  # bit-equal to the single-process init
        assert r[f"{kind} init untouched"] == [], r
        # Llama's rotary cos / sin are float32 in HF's code, so tp's other summation order shows at 1e-8
        # (measured: the same 7.2e-8 for this Llama built on a real device and parallelized)
        assert r[f"{kind} init output"] < (1e-6 if kind == "llama" else 1e-12), r
        assert r[f"{kind} local fraction"] < 0.75, r  # only local shards were allocated
    assert r["llama inv_freq"] == 0.0, r
    for kind in ("gpt2", "llama"):
        assert r[f"{kind} load"] == 0.0, r  # float32 file -> float64 shards, exactly
        assert r[f"{kind} load missing"] == [], r
        assert r[f"{kind} load logits"] < (1e-6 if kind == "llama" else 1e-12), r
        assert r[f"{kind} save"] == 0.0, r  # save_hf -> from_pretrained round trip
        assert "model.safetensors.index.json" in r[f"{kind} save files"] and "config.json" in r[f"{kind} save files"]
    if names == ("tp",):
        assert "freqs_cis" in r["titan"] and "persistent=False" in r["titan"], r["titan"]
        assert r["seed none"] == 0.0 and len({x["seed"] for x in results}) == 1, r


# --------------------------------------------------------------------------- the large model, by resident memory

BIG = dict(n_layer=16, n_embd=1024, vocab_size=32768, n_positions=1024)  # 0.88 GiB of float32 parameters


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _big(src: str, ids: torch.Tensor, target: torch.Tensor) -> dict:
    mesh = torch.distributed.device_mesh.init_device_mesh("cpu", (2, 2), mesh_dim_names=("fsdp", "tp"))
    model = tiny_gpt2(device="meta", **BIG)
    # Growth of the high-water mark over the resident size just before parallelize: an upper bound
    # of the growth of the peak (the process's earlier peak, if higher, only makes it larger).
    # glibc keeps freed heap blocks below its (dynamic) mmap threshold resident; a fixed threshold of
    # 128 KiB (glibc's initial one) returns every freed tensor of the step to the system (the smallest
    # activations here are 2 x 32 x 1024 floats, 256 KiB), so the high-water mark is what was alive.
    # (At 1 MiB the 256 KiB activations freed by the backward stayed resident under its peak: 0.81.)
    ctypes.CDLL("libc.so.6").mallopt(-3, 128 << 10)  # M_MMAP_THRESHOLD
    base = _rss()
    pm = fxpar.parallelize(model, mesh, example_inputs=(ids,))
    fxpar.checkpoint.load_hf(pm, src)
    with torch.no_grad():
        logits = pm(ids).logits
    forward = _maxrss() - base
    opt = torch.optim.SGD(pm.parameters(), lr=1e-3)
    pm.step(ids, target=target, loss_fn=lambda o, t: F.cross_entropy(o.logits.flatten(0, 1), t.flatten()))
    opt.step()
    step = _maxrss() - base
    return {"logits": logits, "forward": forward, "step": step}


@pytest.mark.slow
def test_gpt2_shaped_from_meta_fits_per_rank_memory(tmp_path):
    torch.manual_seed(0)
    ref = tiny_gpt2(**BIG)
    nbytes = sum(p.numel() * p.element_size() for p in ref.parameters())
    ref.save_pretrained(tmp_path / "src", max_shard_size="200MB")
    ids = torch.randint(0, BIG["vocab_size"], (2, 32))
    target = torch.randint(0, BIG["vocab_size"], (2, 32))
    with torch.no_grad():
        ref_logits = ref(ids).logits
    del ref
    results = run_ranks(_big, 4, str(tmp_path / "src"), ids, target, timeout=600)
    for r in results:
        rel = ((r["logits"] - ref_logits).abs().max() / ref_logits.abs().max()).item()
        assert rel <= 1e-4, rel
        assert r["forward"] <= 0.5 * nbytes, (r["forward"] / nbytes, r["step"] / nbytes)
    worst = max(r["step"] for r in results) / nbytes
    # measured 0.81 (0.77 with a gather per use of the tied weight, 0.87 before that): parameters 0.25 +
    # gradients 0.25 + parallelize's own 0.06, and at the peak (the embedding's backward) the tied weight's
    # full tensor-parallel local gradient, 0.07, being reduce-scattered in chunks (gloo's reduce-scatter
    # copies its whole input); the tied weight is in the root unit (apply_fsdp), gathered once and kept
    # from the forward to the backward as FSDP2 keeps its root's parameters, its gradient summed over both
    # uses before one reduce-scatter: +0.04, for one gather and one reduce-scatter where there were two
    assert worst <= 0.85, worst
