"""What stays resident after parallelize beyond the parameters (tests/test_bigmodel.py's GPT-2 shape).

    python -m benchmarks.resident      # one process, rank 0 of fsdp=2 x tp=2 on torch's fake backend, ~2 min

Resident size (statm, after gc and malloc_trim) around `fxpar.parallelize` of the GPT-2-shaped model built on
meta (16 layers, 1024 wide, vocab 32768: 0.88 GiB of float32, 226 MiB per rank), minus this rank's parameters:

    cold     the first parallelize of the process (torch.export, functorch and their imports load here)
    warm     after a 1-layer model was parallelized once (first-use costs paid)
    after del  the same, once the ParallelModule is deleted: what pm itself held is the difference
    again x2   two more parallelizes of the big model, each after deleting the last
"""

from __future__ import annotations

import ctypes
import gc
import os
import subprocess
import sys
import weakref

import torch

import fxpar

BIG = dict(n_layer=16, n_embd=1024, vocab_size=32768, n_positions=1024)
_LIBC = ctypes.CDLL("libc.so.6")


def _rss() -> int:
    gc.collect()
    _LIBC.malloc_trim(0)
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _measure(warm: bool) -> None:
    from tests.conftest import fake_mesh
    from tests.models import tiny_gpt2

    _LIBC.mallopt(-3, 128 << 10)  # M_MMAP_THRESHOLD, as test_bigmodel pins it
    mesh = fake_mesh((2, 2), ("fsdp", "tp"))
    ids = torch.randint(0, BIG["vocab_size"], (2, 32))
    if warm:
        small = tiny_gpt2(device="meta", n_layer=1, n_embd=64, vocab_size=128, n_positions=64)
        fxpar.parallelize(small, mesh, example_inputs=(torch.randint(0, 128, (2, 32)),))
        del small
    for i in range(3 if warm else 1):
        model = tiny_gpt2(device="meta", **BIG)
        base = _rss()
        pm = fxpar.parallelize(model, mesh, example_inputs=(ids,))
        after = _rss()
        params = sum(p.numel() * p.element_size() for p in pm.parameters())
        alive = weakref.ref(pm)
        del pm, model
        gone = _rss()
        label = "cold" if not warm else "warm" if i == 0 else f"again {i}"
        print(f"{label:8s} beyond parameters {(after - base - params) / 2 ** 20:6.1f} MiB "
              f"(parameters {params / 2 ** 20:.1f} MiB); after del pm {(gone - base) / 2 ** 20:6.1f} MiB above the "
              f"start, pm collected: {alive() is None}", flush=True)


def main() -> None:
    if len(sys.argv) > 1:
        _measure(sys.argv[1] == "warm")
        return
    for mode in ("cold", "warm"):  # each in a fresh process
        subprocess.run([sys.executable, "-m", "benchmarks.resident", mode], check=True)


if __name__ == "__main__":
    main()
