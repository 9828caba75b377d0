"""Host-to-device copies that do not stall the host.

CUDA synchronizes the stream before copying from *pageable* host memory to the device, so
every `torch.tensor(list, device="cuda")` waits for all queued GPU work: a loop that builds
small inputs between launches (the speculative loop, ~10 per step) then never runs ahead of
the GPU. Staged through pinned memory, the copy is asynchronous (PyTorch's caching host
allocator keeps the staging buffer alive until the copy is done).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def to_device(
    data: torch.Tensor | Sequence, device: torch.device | str, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """`data` (a CPU tensor or nested lists) on `device`, without a stream sync on CUDA."""
    tensor = data if isinstance(data, torch.Tensor) else torch.tensor(data, dtype=dtype)
    if dtype is not None and tensor.dtype != dtype:
        tensor = tensor.to(dtype)
    device = torch.device(device)
    if device.type != "cuda" or tensor.device.type == "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)
