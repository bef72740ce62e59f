"""Small building blocks shared by the models: channel LayerNorm, drop path, conv+BN+ReLU, FFT helpers."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from tilefuse.errors import InputError


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channel dim of a (B, C, H, W) tensor."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__(channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class DropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch per sample during training."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        if keep <= 0.0:
            return torch.zeros_like(x)
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        return x * x.new_empty(shape).bernoulli_(keep) / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


class ConvBNReLU(nn.Sequential):
    """Conv (no bias) + BatchNorm + ReLU: the conv module of UPerNet and FCN heads."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


def float32_spectra(x: torch.Tensor) -> AbstractContextManager:
    """Context that turns autocast off: FFTs in bf16/fp16 are unsupported or inaccurate, so spectra stay float32."""
    kind = x.device.type
    if kind in ("cpu", "cuda") and torch.is_autocast_enabled(kind):
        return torch.autocast(device_type=kind, enabled=False)
    return nullcontext()


def two_modalities(modalities: Mapping[str, int], model: str) -> tuple[str, str]:
    """The (passive/optical, active/SAR) modality names of a two-stream model, in the order given."""
    names = list(modalities)
    if len(names) != 2:
        raise InputError(
            f"model {model!r} fuses exactly two modalities (optical first, then SAR/LiDAR), got {len(names)}: "
            f"{names}; pass two, e.g. optical=... sar=..."
        )
    return names[0], names[1]


def check_inputs(inputs: Mapping[str, torch.Tensor], modalities: Mapping[str, int]) -> None:
    """Raise InputError unless ``inputs`` holds a (B, C, H, W) tensor with the declared bands for each modality."""
    for name, bands in modalities.items():
        if name not in inputs:
            raise InputError(f"input modality {name!r} is missing (model expects {list(modalities)}): pass it")
        x = inputs[name]
        if x.ndim != 4 or x.shape[1] != bands:
            raise InputError(
                f"input {name!r} has shape {tuple(x.shape)}, expected (B, {bands}, H, W): check the band count"
            )
