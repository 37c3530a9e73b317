"""Device choice shared by every torch-using stage."""
from __future__ import annotations

import torch

from pipeline.errors import FacemineError


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """`auto` means CUDA when present, else CPU; an explicit CUDA request without CUDA is an error."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise FacemineError(f"device '{device}' requested but CUDA is not available")
    return resolved
