"""Checkpoints of parallel modules, keyed by the original model's FQNs.

    fxpar.checkpoint.load_hf(pm, path)   a Hugging Face safetensors folder, each rank reading its slices
    fxpar.checkpoint.save_hf(pm, path)   a folder `from_pretrained` loads, one tensor at a time
"""

from fxpar.checkpoint.hf import load_hf, save_hf

__all__ = ["load_hf", "save_hf"]
