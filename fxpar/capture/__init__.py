"""Capture: a model to an exported ATen-level GraphModule (`torch.export`, training IR) with its
input / output specs."""

from fxpar.capture.export import LOSS_TARGET, CaptureInfo, capture

__all__ = ["capture", "CaptureInfo", "LOSS_TARGET"]
