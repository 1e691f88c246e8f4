"""Checkpoints of parallel modules, keyed by the original model's FQNs.

    fxpar.checkpoint.save(pm, path, optimizer=opt, extra={"step": 100})   DCP: each rank writes its shards
    extra = fxpar.checkpoint.load(pm2, path, optimizer=opt2)              on any other mesh (DCP reshards)
    fxpar.checkpoint.load_hf(pm, path)   a Hugging Face safetensors folder, each rank reading its slices
    fxpar.checkpoint.save_hf(pm, path)   a folder `from_pretrained` loads, one tensor at a time
"""

from fxpar.checkpoint.dcp import load, save
from fxpar.checkpoint.hf import load_hf, save_hf
from fxpar.core.errors import CheckpointError
from fxpar.runtime.state_dict import load_model_state_dict, model_state_dict

__all__ = ["save", "load", "load_hf", "save_hf", "CheckpointError", "model_state_dict", "load_model_state_dict"]
