"""Devices the planner prices plans for: published profiles, and this machine measured.

A profile is what the estimate needs of an accelerator and its links:

    peak_flops[dtype]   dense FLOP/s of the matrix units (bf16 / fp16, and tf32 for float32)
    memory_bandwidth    bytes/s of device memory (roofline of memory-bound ops)
    memory_gib          device memory
    intra_bandwidth     bytes/s per device on the links inside a node (NVLink), one direction
    inter_bandwidth     bytes/s per device across nodes (InfiniBand / RoCE NIC), one direction
    intra_latency, inter_latency   seconds per collective step
    op_overhead         seconds each op costs beyond its roofline (a kernel launch on a GPU; dispatch on a CPU)
    devices_per_node    how many devices share the fast links
    compute_efficiency  the fraction of peak a large training step reaches (model FLOPs utilisation
                        of good hand-tuned runs); comm_efficiency the same for collectives

Published figures (vendor datasheets, SXM parts): H100 989 TFLOP/s bf16 dense, 495 tf32, 3.35 TB/s
HBM3, 80 GiB, NVLink 4 at 450 GB/s per direction, one 400 Gb/s NIC per GPU; H200 the same compute
with 141 GiB at 4.8 TB/s; A100 312 TFLOP/s bf16, 156 tf32, 2.04 TB/s, 80 GiB, NVLink 3 at
300 GB/s, 200 Gb/s per GPU. The efficiencies are a calibration, not a datasheet: 0.45 of peak
compute is between torchtitan's published Llama-3 8B MFU on H100 (about 0.38 to 0.50 depending on
the parallelism) and Megatron-LM's tables (0.41 to 0.48 for GPT models of 175B to 1T on A100);
0.75 of link bandwidth is what NCCL's ring all-reduce bus bandwidth reaches on NVLink.

"local" measures this machine in a few seconds (`measure_local`): float32 and bfloat16 matmul throughput,
copy bandwidth, the overhead of an op (dispatch and autograd), and fxpar's all-reduce op's latency
and bandwidth between two local gloo processes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from fxpar.core.errors import PlanError
from fxpar.ops.collectives import all_reduce
from fxpar.testing.dist import run_ranks

__all__ = ["DeviceProfile", "PROFILES", "device_profile", "measure_local"]


@dataclass(frozen=True)
class DeviceProfile:
    """One kind of device and its links (see the module docstring for each field)."""

    name: str
    peak_flops: dict = field(default_factory=dict)  # torch.dtype -> FLOP/s
    memory_bandwidth: float = 1e12
    memory_gib: float = 80.0
    intra_bandwidth: float = 1e11
    inter_bandwidth: float = 1e10
    intra_latency: float = 1e-5
    inter_latency: float = 2e-5
    devices_per_node: int = 8
    compute_efficiency: float = 0.45
    comm_efficiency: float = 0.75
    op_overhead: float = 4e-6

    def flops(self, dtype: torch.dtype) -> float:
        """Effective FLOP/s for matrix work in `dtype`."""
        peak = self.peak_flops.get(dtype) or self.peak_flops.get(torch.float32) or max(self.peak_flops.values())
        return peak * self.compute_efficiency

    def link(self, intra: bool) -> tuple[float, float]:
        """(latency s, effective bandwidth B/s) of a collective inside a node or across nodes."""
        if intra:
            return self.intra_latency, self.intra_bandwidth * self.comm_efficiency
        return self.inter_latency, self.inter_bandwidth * self.comm_efficiency


_GPU_FLOPS = {
    "h100": {torch.bfloat16: 989e12, torch.float16: 989e12, torch.float32: 495e12},
    "h200": {torch.bfloat16: 989e12, torch.float16: 989e12, torch.float32: 495e12},
    "a100": {torch.bfloat16: 312e12, torch.float16: 312e12, torch.float32: 156e12},
}

PROFILES: dict[str, DeviceProfile] = {
    "h100": DeviceProfile("h100", _GPU_FLOPS["h100"], 3.35e12, 80.0, 450e9, 50e9, 1e-5, 2.5e-5),
    "h200": DeviceProfile("h200", _GPU_FLOPS["h200"], 4.8e12, 141.0, 450e9, 50e9, 1e-5, 2.5e-5),
    "a100": DeviceProfile("a100", _GPU_FLOPS["a100"], 2.04e12, 80.0, 300e9, 25e9, 1e-5, 2.5e-5),
}


def _allreduce_times(sizes: tuple[int, ...], repeats: int) -> dict:
    """Run on 2 gloo ranks: the median seconds of fxpar's all-reduce op (as compiled graphs issue it) per size."""
    group = dist.group.WORLD.group_name
    out = {}
    for n in sizes:
        x = torch.ones(n)
        all_reduce(x, group, "dp")  # warm up the pair
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            all_reduce(x, group, "dp")
            times.append(time.perf_counter() - start)
        out[n] = sorted(times)[len(times) // 2]
    return out


def measure_local(*, seconds: float = 1.0) -> DeviceProfile:
    """Measures this machine: matmul FLOP/s, copy bandwidth, per-op overhead, gloo all-reduce latency and bandwidth.

    Two local processes stand in for a node's devices; every link counts as intra-node.
    """
    a = torch.randn(512, 512)
    flops, elapsed, reps = 0.0, 0.0, 0
    start = time.perf_counter()
    while elapsed < seconds / 2 or reps < 3:
        torch.mm(a, a)
        reps += 1
        elapsed = time.perf_counter() - start
    flops = 2 * 512 ** 3 * reps / elapsed
    half = a.to(torch.bfloat16)  # mixed precision's compute: on a CPU often slower than float32
    start, reps = time.perf_counter(), 0
    while time.perf_counter() - start < seconds / 4 or reps < 2:
        torch.mm(half, half)
        reps += 1
    bf16_flops = 2 * 512 ** 3 * reps / (time.perf_counter() - start)
    big = torch.empty(8 << 20)  # 32 MiB
    start = time.perf_counter()
    for _ in range(4):
        big.add_(1.0)
    mem_bw = 4 * 2 * big.numel() * 4 / (time.perf_counter() - start)
    x = torch.ones(8, requires_grad=True)
    start, reps = time.perf_counter(), 200
    for _ in range(reps):  # a chain of tiny ops, forward and backward: dispatch and autograd per op
        y = x
        for _ in range(10):
            y = y * 1.0001
        y.sum().backward()
    overhead = (time.perf_counter() - start) / (reps * 10 * 3)  # per op and pass (backward ~ 2 passes)
    small, large = 1, 1 << 20  # 4 B and 4 MiB
    t = run_ranks(_allreduce_times, 2, (small, large), 5, timeout=120)[0]
    latency = t[small]
    # a ring all-reduce of B bytes on 2 ranks moves B bytes each way: time = latency + B / bandwidth
    bandwidth = large * 4 / max(t[large] - latency, 1e-9)
    return DeviceProfile("local", {torch.float32: flops, torch.float64: flops / 2, torch.bfloat16: bf16_flops},
                         mem_bw,
                         _local_memory_gib(), bandwidth, bandwidth, latency, latency, devices_per_node=1 << 16,
                         compute_efficiency=1.0, comm_efficiency=1.0, op_overhead=overhead)


def _local_memory_gib() -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) / 2 ** 20
    except OSError:
        pass
    return 16.0


_MEASURED: dict[str, DeviceProfile] = {}


def device_profile(device: str | DeviceProfile) -> DeviceProfile:
    """A profile by name ('h100', 'h200', 'a100', 'local' measured once per process) or as given.

    Raises:
        PlanError: an unknown name, with the known ones.
    """
    if isinstance(device, DeviceProfile):
        return device
    name = str(device).lower()
    if name == "local":
        if "local" not in _MEASURED:
            _MEASURED["local"] = measure_local()
        return _MEASURED["local"]
    if name not in PROFILES:
        raise PlanError(f"device {device!r} has no profile; use one of {sorted(PROFILES) + ['local']} "
                        "or pass a fxpar.planner.DeviceProfile")
    return PROFILES[name]
