"""Bytes per training step of GPT-2 at tp=2: Megatron TP with the loss outside the graph vs sequence
parallel + loss parallel with a captured cross-entropy, each next to its analytical minimum.

    python -m benchmarks.loss_parallel      # writes benchmarks/LOSS_PARALLEL.md (a dry run: no processes)

Payload bytes each rank puts into its collectives (explain()'s figures), forward and backward.
Analytical minima (B, T, D, V, L layers, e bytes per element, tp ranks):

    Megatron TP, loss outside:  forward (2L + 1) all_reduce (B,T,D) + all_gather (B,T,V/tp) logits,
                                backward (2L + 1) all_reduce (B,T,D)
    + sequence + loss parallel: forward (2L + 1) reduce_scatter (B,T,D) + (2L + 1) all_gather of the (B,T/tp,D)
                                shard + 3 all_reduce (B*T) loss statistics; backward the mirror image
                                (all_gather for each reduce_scatter, reduce_scatter for each all_gather)
                                + all_reduce of the norm weights' and row-parallel biases' partial gradients
                                (bucketed by the runtime); the position table is vocab (row) parallel, summed
                                with the token lookup before the reduce-scatter: no collective of its own
"""

from __future__ import annotations

import collections
from pathlib import Path

import torch
import torch.nn.functional as F

import fxpar
from fxpar.analysis.explain import collectives
from fxpar.compiler import compile_model
from fxpar.core.mesh import MeshInfo
from fxpar.core.spec import get_info

from benchmarks.models import ring_bytes

_RING_OP = {"all_reduce_max": "all_reduce", "sp_all_gather": "all_gather", "fsdp_all_gather": "all_gather"}

B, T, D, V, L, TP = 8, 128, 256, 8192, 4, 2


def _gpt2():
    import transformers

    cfg = transformers.GPT2Config(n_layer=L, n_embd=D, n_head=8, vocab_size=V, n_positions=T, use_cache=False,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def ce(out, target):
    logits = out if isinstance(out, torch.Tensor) else out.logits
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1))


def _bytes(pm) -> tuple[int, int, collections.Counter, float]:
    fwd = bwd = 0
    wire = 0.0
    ops = collections.Counter()
    for c in collectives(pm.graph_module, pm.mesh_info):
        fwd += c.forward_bytes
        bwd += c.backward_bytes
        if c.forward_bytes:
            wire += ring_bytes(_RING_OP.get(c.op, c.op), c.forward_bytes, c.group_size)
        if c.backward_bytes:
            # the dual's payload is the gradient of the output: local for a gather's reduce-scatter
            wire += ring_bytes(_RING_OP.get(c.backward_op, c.backward_op), c.backward_bytes, c.group_size)
        if c.forward_bytes:
            ops[f"fwd {c.op}"] += 1
        if c.backward_bytes:
            ops[f"bwd {c.backward_op}"] += 1
    # gradients the runtime all-reduces in buckets (bucket_grad_sync: sequence parallel's norm weights
    # and row-parallel biases on tp), not graph nodes
    buckets: dict = {}
    for node in pm.graph_module.graph.nodes:
        info = get_info(node)
        if node.op == "get_attr" and info is not None and info.grad_sync is not None:
            key = (info.grad_sync.bucket, info.grad_sync.dims)
            buckets[key] = buckets.get(key, 0) + info.spec.nbytes(local=True)
    for nbytes in buckets.values():
        bwd += nbytes
        wire += ring_bytes("all_reduce", nbytes, TP)
        ops["bwd bucketed grad all_reduce"] += 1
    return fwd, bwd, ops, wire


def measure() -> list[dict]:
    torch.manual_seed(0)
    model = _gpt2()
    ids, target = torch.randint(0, V, (B, T)), torch.randint(0, V, (B, T))
    mesh = MeshInfo(("tp",), (TP,))
    e, act, n = 4, B * T * D * 4, 2 * L + 1
    rows = []
    base = compile_model(model, None, mesh, example_inputs=(ids,), plan=fxpar.Plan(auto_tp=True))
    fwd, bwd, ops, wire = _bytes(base)
    # the loss outside the graph needs the logits: the module's output all-gathers them
    rows.append(dict(plan="Megatron TP, loss_fn in step", fwd=fwd, bwd=bwd, ops=ops, wire=wire,
                     min_fwd=n * act + B * T * V // TP * e, min_bwd=n * act))
    sp = compile_model(model, None, mesh, example_inputs=(ids,), loss_fn=ce, example_target=target,
                       plan=fxpar.Plan(auto_tp=True, sequence_parallel=True, loss_parallel=True))
    fwd, bwd, ops, wire = _bytes(sp)
    norms = sum(p.numel() for name, p in model.named_parameters()
                if ".ln_" in name or name.endswith("c_proj.bias")) * e
    rows.append(dict(plan="sequence + loss parallel, captured loss", fwd=fwd, bwd=bwd, ops=ops, wire=wire,
                     min_fwd=n * act + n * act // TP + 3 * B * T * e,
                     min_bwd=n * act // TP + n * act + norms))
    return rows


def main() -> None:
    rows = measure()
    lines = [f"# GPT-2 (L={L}, D={D}, V={V}) at tp={TP}, B={B}, T={T}, float32: collective payload per step",
             "", "Generated by `python -m benchmarks.loss_parallel` (a dry run: the graphs' own collective list).",
             "Full logits: " f"{B * T * V * 4 / 2**20:.1f} MiB.", "",
             "Payload: the bytes each rank puts into its collectives (explain()'s figures); sent: what a ring "
             "algorithm makes each rank send for them (`benchmarks.models.ring_bytes`).", "",
             "| plan | forward payload | analytical min | backward payload | analytical min | sent per step | "
             "collectives |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        ops = ", ".join(f"{k} x{v}" for k, v in sorted(r["ops"].items()))
        lines.append(f"| {r['plan']} | {r['fwd']:,} | {r['min_fwd']:,} | {r['bwd']:,} | {r['min_bwd']:,} | "
                     f"{r['wire']:,.0f} | {ops} |")
    text = "\n".join(lines) + "\n"
    Path(__file__).with_name("LOSS_PARALLEL.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
