"""The two ways regions reach the model, and their checks.

* binary maps ``[B, k, H, W]`` (uint8 / bool; float accepted if every value is exactly 0 or 1);
* ``RegionLabels``: FH label maps plus, per region, which scale and which label it is. Region ``i`` of image
  ``b`` is ``labels[b, scale_index[b, i]] == label_id[b, i]``; ``label_id == -1`` gives an all-zero map.

Both give the same loss. The labels form moves S label maps to the device instead of k binary maps.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from rmae import kernels

_LABEL_DTYPES = (torch.uint8, torch.int16, torch.int32, torch.int64, torch.uint16)


@dataclass
class RegionLabels:
    """labels [B, S, H, W] integer label maps; scale_index, label_id [B, k] int64."""

    labels: torch.Tensor
    scale_index: torch.Tensor
    label_id: torch.Tensor

    @property
    def num_regions(self) -> int:
        return self.scale_index.shape[1]

    def to(self, device, non_blocking: bool = False) -> "RegionLabels":
        """Move all three tensors to ``device`` (dtypes unchanged)."""
        return RegionLabels(self.labels.to(device, non_blocking=non_blocking),
                            self.scale_index.to(device, non_blocking=non_blocking),
                            self.label_id.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "RegionLabels":
        return RegionLabels(self.labels.pin_memory(), self.scale_index.pin_memory(), self.label_id.pin_memory())

    def to_maps(self) -> torch.Tensor:
        """The k binary maps [B, k, H, W] (bool)."""
        return kernels.labels_to_maps(self.labels, self.scale_index, self.label_id)


def check_region_labels(r: RegionLabels, batch: int, num_region: int, img_size: int) -> None:
    if not isinstance(r.labels, torch.Tensor) or r.labels.dim() != 4:
        raise ValueError(f"RegionLabels.labels must be [B, S, H, W], got "
                         f"{tuple(r.labels.shape) if isinstance(r.labels, torch.Tensor) else type(r.labels)}")
    B, S, H, W = r.labels.shape
    if B != batch or H != img_size or W != img_size:
        raise ValueError(f"RegionLabels.labels must be [{batch}, S, {img_size}, {img_size}], "
                         f"got {tuple(r.labels.shape)}")
    if r.labels.dtype not in _LABEL_DTYPES:
        raise TypeError(f"RegionLabels.labels must be an integer tensor {_LABEL_DTYPES}, got {r.labels.dtype}")
    for name in ("scale_index", "label_id"):
        t = getattr(r, name)
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != (batch, num_region):
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t)
            raise ValueError(f"RegionLabels.{name} must be [{batch}, {num_region}] "
                             f"(num_region={num_region}), got {got}")
        if t.dtype != torch.int64:
            raise TypeError(f"RegionLabels.{name} must be int64, got {t.dtype}")
        if t.device != r.labels.device:
            raise ValueError(f"RegionLabels.{name} is on {t.device} but labels are on {r.labels.device}")


def check_region_maps(maps: torch.Tensor, batch: int, num_region: int, img_size: int) -> torch.Tensor:
    """Validate binary maps; returns them as uint8 or bool (float 0/1 maps are converted)."""
    if not isinstance(maps, torch.Tensor):
        raise TypeError(f"regions must be a tensor [B, k, H, W] or RegionLabels, got {type(maps).__name__}")
    expected = (batch, num_region, img_size, img_size)
    if maps.dim() != 4 or maps.shape[0] != batch or maps.shape[2:] != expected[2:]:
        raise ValueError(f"region maps must be [B, k, H, W] = {list(expected)}, got {list(maps.shape)}")
    if maps.shape[1] != num_region:
        raise ValueError(f"got {maps.shape[1]} regions per image but the model has num_region={num_region}")
    if maps.dtype == torch.bool:
        return maps
    if maps.dtype == torch.uint8 or maps.is_floating_point():
        if not bool(((maps == 0) | (maps == 1)).all()):
            raise ValueError(f"{maps.dtype} region maps must contain only 0 and 1 (e.g. 0/255 masks: divide by 255)")
        return maps.to(torch.uint8)
    raise TypeError(f"region maps must be uint8, bool or 0/1 float, got {maps.dtype}")
