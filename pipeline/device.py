"""Device choice shared by every torch-using stage."""
from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.errors import FacemineError

if TYPE_CHECKING:
    import torch


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """`auto` means CUDA when present, else CPU; an explicit CUDA request without CUDA is an error."""
    # Imported here: clustering and review reach this module but should not pay torch's import.
    import torch

    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise FacemineError(f"device '{device}' requested but CUDA is not available")
    return resolved
