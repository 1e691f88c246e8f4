"""Capture: a model to an exported ATen-level GraphModule (`torch.export`, training IR) with its
input / output specs."""

from fxpar.capture.export import CaptureInfo, capture

__all__ = ["capture", "CaptureInfo"]
