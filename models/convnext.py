"""ConvNeXt-V2 encoders, written in-house and parameterised by depths and widths.

A block is: depthwise 7x7 conv, LayerNorm, 1x1 expand (x4), GELU, global response
normalisation (GRN), 1x1 project, drop path, residual. The stem is a 4x4/4 conv +
LayerNorm and adapts to any input band count; stages 2-4 start with LayerNorm +
2x2/2 conv, so stage strides are 4, 8, 16, 32. Each stage output goes through its
own LayerNorm2d (``norms[i]``) and the normalised map is what continues into the
next stage (PAD's convention, see ``docs/models.md``).

:func:`load_convnext_weights` maps a local timm, mmpretrain or official
(facebookresearch) ConvNeXt-V2 state dict onto this module, adapting the stem to
other band counts. It reads safetensors or ``torch.load(weights_only=True)``
files only: nothing is unpickled and nothing is downloaded.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import nn

from tilefuse.errors import InputError
from tilefuse.models.layers import DropPath, LayerNorm2d

# name -> (depths, widths): the ConvNeXt-V2 paper's sizes (atto ... large), then two of ours
# (``micro``, ``zepto``, not in the paper): the same blocks, shallower and narrower, for
# training from scratch on a CPU and on small chips (a few 10^5 labelled pixels).
PRESETS: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "atto": ((2, 2, 6, 2), (40, 80, 160, 320)),
    "femto": ((2, 2, 6, 2), (48, 96, 192, 384)),
    "pico": ((2, 2, 6, 2), (64, 128, 256, 512)),
    "nano": ((2, 2, 8, 2), (80, 160, 320, 640)),
    "tiny": ((3, 3, 9, 3), (96, 192, 384, 768)),
    "base": ((3, 3, 27, 3), (128, 256, 512, 1024)),
    "large": ((3, 3, 27, 3), (192, 384, 768, 1536)),
    "micro": ((1, 1, 3, 1), (24, 48, 96, 192)),
    "zepto": ((1, 1, 2, 1), (16, 32, 64, 128)),
}


class GRN(nn.Module):
    """Global response normalisation on channels-last (B, H, W, C) tensors."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spatial_norm = torch.linalg.vector_norm(x, dim=(1, 2), keepdim=True)
        relative = spatial_norm / (spatial_norm.mean(dim=-1, keepdim=True) + self.eps)
        return x + self.weight * (x * relative) + self.bias


class Block(nn.Module):
    """One ConvNeXt-V2 block (optional layer scale ``gamma``, off in V2)."""

    def __init__(self, channels: int, drop_path: float = 0.0, layer_scale: float = 0.0) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(channels, channels, 7, padding=3, groups=channels)
        self.norm = nn.LayerNorm(channels, eps=1e-6)
        self.pwconv1 = nn.Linear(channels, 4 * channels)
        self.act = nn.GELU()
        self.grn = GRN(4 * channels)
        self.pwconv2 = nn.Linear(4 * channels, channels)
        self.gamma = nn.Parameter(torch.full((channels,), layer_scale)) if layer_scale > 0 else None
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.pwconv2(self.grn(self.act(self.pwconv1(self.norm(y)))))
        if self.gamma is not None:
            y = y * self.gamma
        return x + self.drop_path(y.permute(0, 3, 1, 2))


class ConvNeXt(nn.Module):
    """ConvNeXt-V2 feature encoder: ``forward(x) -> [stage1, ..., stage4]`` at strides 4, 8, 16, 32."""

    def __init__(
        self,
        in_channels: int,
        depths: Sequence[int] = PRESETS["atto"][0],
        widths: Sequence[int] = PRESETS["atto"][1],
        drop_path: float = 0.0,
        layer_scale: float = 0.0,
    ) -> None:
        super().__init__()
        if len(depths) != len(widths):
            raise ValueError(f"depths {depths} and widths {widths} differ in length")
        self.in_channels = in_channels
        self.depths = tuple(depths)
        self.widths = tuple(widths)
        self.downsample = nn.ModuleList(
            [nn.Sequential(nn.Conv2d(in_channels, widths[0], 4, stride=4), LayerNorm2d(widths[0]))]
            + [
                nn.Sequential(LayerNorm2d(widths[i - 1]), nn.Conv2d(widths[i - 1], widths[i], 2, stride=2))
                for i in range(1, len(widths))
            ]
        )
        total = sum(depths)
        rates = [drop_path * k / max(total - 1, 1) for k in range(total)]  # linear stochastic-depth schedule
        starts = [sum(depths[:i]) for i in range(len(depths))]
        self.stages = nn.ModuleList(
            nn.Sequential(*(Block(w, rates[s + j], layer_scale) for j in range(d)))
            for s, d, w in zip(starts, depths, widths)
        )
        self.norms = nn.ModuleList(LayerNorm2d(w) for w in widths)
        self.apply(_init_weights)
        _init_stem_bias(self.downsample[0][0])

    @classmethod
    def from_preset(cls, name: str, in_channels: int, **kwargs) -> "ConvNeXt":
        if name not in PRESETS:
            raise InputError(f"unknown ConvNeXt-V2 preset {name!r}: choose one of {', '.join(PRESETS)}")
        depths, widths = PRESETS[name]
        return cls(in_channels, depths, widths, **kwargs)

    def forward_stage(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Stage ``i`` (downsample, blocks, output LayerNorm) on the previous stage's normalised output."""
        return self.norms[i](self.stages[i](self.downsample[i](x)))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = []
        for i in range(len(self.stages)):
            x = self.forward_stage(i, x)
            features.append(x)
        return features


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def _init_stem_bias(stem: nn.Conv2d) -> None:
    """Draw the stem's bias as ``trunc_normal(0.02)``, like the weights, instead of zeros (ours; pretrained
    weights replace it).

    Where the input is all zeros (nodata pixels, which normalise to 0 in every band, and the zero padding of
    a patch shrunk by ``rescale``), a zero bias makes the stem's output the zero vector, whose LayerNorm has
    zero variance: each LayerNorm on the way divides by ``sqrt(eps) = 1e-3`` and the gradient norm of a fresh
    PAD micro reached 5.9e10 on a patch with a zero quarter (1.4 without one), so gradient clipping shrank every
    such step to nothing. A bias that differs between channels gives those pixels a normal LayerNorm input.
    """
    nn.init.trunc_normal_(stem.bias, std=0.02)


# --- loading pretrained weights -------------------------------------------------------------

# (pattern on the checkpoint key, replacement giving our key), tried in order; first match wins.
_TIMM_RULES = [
    (r"^stem\.(\d)\.", r"downsample.0.\1."),
    (r"^stages\.(\d+)\.downsample\.(\d)\.", r"downsample.\1.\2."),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.conv_dw\.", r"stages.\1.\2.dwconv."),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.norm\.", r"stages.\1.\2.norm."),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.mlp\.fc1\.", r"stages.\1.\2.pwconv1."),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.mlp\.grn\.", r"stages.\1.\2.grn."),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.mlp\.fc2\.", r"stages.\1.\2.pwconv2."),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.gamma$", r"stages.\1.\2.gamma"),
    (r"^head\.norm\.", "norms.{last}."),
]
# mmpretrain (``backbone.`` prefix stripped) and the official facebookresearch release.
_MM_RULES = [
    (r"^downsample_layers\.(\d+)\.(\d)\.", r"downsample.\1.\2."),
    (r"^stages\.(\d+)\.(\d+)\.(?:depthwise_conv|dwconv)\.", r"stages.\1.\2.dwconv."),
    (r"^stages\.(\d+)\.(\d+)\.norm\.", r"stages.\1.\2.norm."),
    (r"^stages\.(\d+)\.(\d+)\.(?:pointwise_conv1|pwconv1)\.", r"stages.\1.\2.pwconv1."),
    (r"^stages\.(\d+)\.(\d+)\.grn\.gamma$", r"stages.\1.\2.grn.weight"),
    (r"^stages\.(\d+)\.(\d+)\.grn\.beta$", r"stages.\1.\2.grn.bias"),
    (r"^stages\.(\d+)\.(\d+)\.(?:pointwise_conv2|pwconv2)\.", r"stages.\1.\2.pwconv2."),
    (r"^stages\.(\d+)\.(\d+)\.gamma$", r"stages.\1.\2.gamma"),
    (r"^norm(\d)\.", r"norms.\1."),
    (r"^norm\.", "norms.{last}."),
]


@dataclass
class LoadReport:
    """What :func:`load_convnext_weights` did."""

    source_format: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    """Model keys the checkpoint did not provide (kept at their initial values)."""
    ignored: list[str] = field(default_factory=list)
    """Checkpoint keys with no place in the encoder (classifier head etc.)."""
    stem_adapted: bool = False


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a local safetensors file or a torch file loaded with ``weights_only=True`` (never unpickled)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"weights file {path} does not exist: pass a local .safetensors/.pth ConvNeXt-V2 checkpoint")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            data = load_file(str(path))
        else:
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # any reader failure means the file is unusable as given
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise InputError(
            f"cannot read weights {path} ({first}): pass a safetensors file or a plain tensor state dict"
        ) from None
    if isinstance(data, dict):
        for wrapper in ("state_dict", "model", "module"):
            if isinstance(data.get(wrapper), dict):
                data = data[wrapper]
                break
    if not isinstance(data, dict):
        raise InputError(f"weights file {path} holds no state dict: pass a ConvNeXt-V2 checkpoint")
    return {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}


def map_convnext_keys(state: Mapping[str, torch.Tensor], num_stages: int = 4) -> tuple[str, dict, list[str]]:
    """Rename a timm / mmpretrain / official ConvNeXt state dict to this module's names.

    Returns ``(format, mapped, ignored_keys)``; prefixes ``backbone.``, ``encoder.`` and ``module.`` are stripped.
    """
    stripped = {re.sub(r"^(module\.|backbone\.|encoder\.)+", "", k): v for k, v in state.items()}
    is_timm = any(k.startswith("stem.") or ".blocks." in k for k in stripped)
    rules = _TIMM_RULES if is_timm else _MM_RULES
    mapped: dict[str, torch.Tensor] = {}
    ignored: list[str] = []
    for key, value in stripped.items():
        for pattern, replacement in rules:
            if re.search(pattern, key):
                new = re.sub(pattern, replacement.replace("{last}", str(num_stages - 1)), key)
                mapped[new] = value
                break
        else:
            ignored.append(key)
    fmt = "timm" if is_timm else ("mmpretrain" if any("depthwise_conv" in k for k in stripped) else "official")
    return fmt, mapped, ignored


def adapt_stem(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """Stem kernel for ``in_channels`` bands from an RGB one: the mean kernel, repeated, scaled by 3/bands.

    The scale keeps the response to a band-replicated input equal to the pretrained
    response to a grey RGB image (the paper feeds SAR as three identical channels).
    """
    if weight.shape[1] == in_channels:
        return weight
    mean = weight.mean(dim=1, keepdim=True) * (weight.shape[1] / in_channels)
    return mean.repeat(1, in_channels, 1, 1)


def load_convnext_weights(encoder: ConvNeXt, path: str | os.PathLike, strict: bool = True) -> LoadReport:
    """Load a local ConvNeXt-V2 checkpoint (timm, mmpretrain or official naming) into ``encoder``.

    The stem adapts to the encoder's band count. The per-stage output norms of stages
    1-3 are usually absent from classification checkpoints and stay initialised; with
    ``strict`` any other missing or mis-shaped tensor raises :class:`InputError`.
    """
    return load_convnext_state(encoder, read_state_dict(path), strict=strict, source=str(path))


def load_convnext_state(
    encoder: ConvNeXt, state: Mapping[str, torch.Tensor], strict: bool = True, source: str = "state dict"
) -> LoadReport:
    """:func:`load_convnext_weights` on an in-memory state dict."""
    fmt, mapped, ignored = map_convnext_keys(state, len(encoder.stages))
    own = encoder.state_dict()
    report = LoadReport(fmt, ignored=ignored)
    new_state = {}
    for key, value in mapped.items():
        if key not in own:
            report.ignored.append(key)
            continue
        target = own[key]
        if key == "downsample.0.0.weight" and value.ndim == 4 and value.shape[1] != target.shape[1]:
            value = adapt_stem(value, target.shape[1])
            report.stem_adapted = True
        if value.shape != target.shape:
            if value.numel() == target.numel():  # GRN (1,1,1,C) or 1x1-conv MLP weights
                value = value.reshape(target.shape)
            else:
                raise InputError(
                    f"{source}: tensor {key} has shape {tuple(value.shape)}, the encoder wants {tuple(target.shape)} "
                    f"(encoder widths {encoder.widths}, depths {encoder.depths}): pick the matching preset"
                )
        new_state[key] = value.to(target.dtype)
    if not new_state:
        raise InputError(f"{source} holds no ConvNeXt-V2 encoder weights: pass a timm or mmpretrain ConvNeXt-V2 checkpoint")
    optional = {f"norms.{i}.{p}" for i in range(len(encoder.stages) - 1) for p in ("weight", "bias")}
    report.missing = sorted(k for k in own if k not in new_state)
    required_missing = [k for k in report.missing if k not in optional]
    if strict and required_missing:
        raise InputError(
            f"{source} lacks {len(required_missing)} encoder tensors (first: {required_missing[0]}): "
            "is it a ConvNeXt-V2 (with GRN) checkpoint of the same size?"
        )
    encoder.load_state_dict(new_state, strict=False)
    report.loaded = sorted(new_state)
    return report


__all__ = [
    "PRESETS",
    "ConvNeXt",
    "Block",
    "GRN",
    "LoadReport",
    "load_convnext_weights",
    "load_convnext_state",
    "map_convnext_keys",
    "read_state_dict",
    "adapt_stem",
]
