"""CPU offload: this rank's trainable parameter shards moved to host memory (FSDP2's CPUOffloadPolicy).

The graph copies each shard to the compute device at its use (`fxpar.passes.offload_parameters`);
here the shards themselves move to the CPU, pinned with `pin_memory=True` where an accelerator
exists (pinning needs one), so gradients accumulate and the optimizer steps on the CPU.
Tied names keep sharing one Parameter. Buffers and frozen parameters stay on the device.
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn

__all__ = ["offload_parameters_to_host"]


def offload_parameters_to_host(gm: fx.GraphModule, *, pin_memory: bool) -> list[str]:
    """Moves every trainable parameter of `gm` to the CPU (pinned if asked and possible); returns their FQNs."""
    modules = dict(gm.named_modules(remove_duplicate=False))
    pin = pin_memory and torch.cuda.is_available()
    moved: dict[int, nn.Parameter] = {}
    done = []
    for fqn, p in gm.named_parameters(remove_duplicate=False):
        if not p.requires_grad:
            continue
        host = moved.get(id(p))
        if host is None:
            if p.device.type == "cpu" and (not pin or p.is_pinned()):
                host = moved[id(p)] = p  # already there (a CPU mesh)
            else:
                data = p.detach().to("cpu")
                host = moved[id(p)] = nn.Parameter(data.pin_memory() if pin else data, requires_grad=True)
        mod_name, _, attr = fqn.rpartition(".")
        setattr(modules[mod_name], attr, host)
        done.append(fqn)
    return done
