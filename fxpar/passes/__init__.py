"""fxpar's pass library, importable as `fxpar.passes`.

One public pass per module, named like the module. The default pipeline, in
data-flow order: fuse_experts -> shard_inputs -> annotate_parameters -> unflatten_heads ->
replicate_kv_heads -> apply_fsdp ->
split_linear_bias -> decompose_loss -> propagate_sharding -> insert_collectives ->
apply_mixed_precision -> localize_shapes -> bucket_grad_sync -> shard_parameters -> schedule_overlap ->
async_tp -> offload_parameters -> split_stages -> checkpoint_activations.
"""

from fxpar.passes.annotate_parameters import annotate_parameters
from fxpar.passes.apply_fsdp import apply_fsdp
from fxpar.passes.apply_mixed_precision import apply_mixed_precision
from fxpar.passes.async_tp import AsyncTP, async_tp
from fxpar.passes.bucket_grad_sync import bucket_grad_sync
from fxpar.passes.checkpoint_activations import checkpoint_activations
from fxpar.passes.decompose_loss import decompose_loss
from fxpar.passes.fuse_experts import fuse_experts
from fxpar.passes.insert_collectives import insert_collectives
from fxpar.passes.localize_shapes import localize_shapes
from fxpar.passes.offload_parameters import offload_parameters
from fxpar.passes.propagate_sharding import propagate_sharding
from fxpar.passes.replicate_kv_heads import replicate_kv_heads
from fxpar.passes.shard_inputs import shard_inputs
from fxpar.passes.schedule_overlap import schedule_overlap
from fxpar.passes.shard_parameters import shard_parameters
from fxpar.passes.split_linear_bias import split_linear_bias
from fxpar.passes.split_stages import split_stages
from fxpar.passes.unflatten_heads import unflatten_heads

__all__ = [
    "fuse_experts",
    "shard_inputs",
    "annotate_parameters",
    "unflatten_heads",
    "replicate_kv_heads",
    "apply_fsdp",
    "apply_mixed_precision",
    "bucket_grad_sync",
    "checkpoint_activations",
    "split_linear_bias",
    "decompose_loss",
    "propagate_sharding",
    "insert_collectives",
    "localize_shapes",
    "shard_parameters",
    "schedule_overlap",
    "async_tp",
    "AsyncTP",
    "offload_parameters",
    "split_stages",
]
