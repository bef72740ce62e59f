"""Small building blocks shared by the models: channel LayerNorm, drop path, conv+BN+ReLU, FFT helpers, input roles,
flip/rotation test-time augmentation (:func:`dihedral_mean`).

Two-stream fusion models (PAD, S²Fin) give each of their two inputs a role, optical
or active, by the modality's name or an explicit mapping (:func:`assign_roles`),
never by the order a store or a dict lists the modalities in.
"""

from __future__ import annotations

import re
from contextlib import AbstractContextManager, nullcontext
from typing import Callable, Mapping, Sequence

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


OPTICAL, ACTIVE = "optical", "active"
ROLES = (OPTICAL, ACTIVE)
"""The roles of a two-stream fusion model's inputs: the passive optical one and the active one (SAR, LiDAR)."""

ROLE_WORDS = {
    OPTICAL: frozenset({"optical", "s2", "sentinel2", "msi", "multispectral", "hsi", "hyperspectral", "rgb"}),
    ACTIVE: frozenset({"sar", "s1", "sentinel1", "lidar", "dsm", "dem", "chm"}),
}
"""Words that give a modality name its role: one of its lower-case alphanumeric tokens (``s2_l2a`` -> ``s2``)."""


def role_of_name(name: str) -> str | None:
    """The role a modality name implies by :data:`ROLE_WORDS`, or None when it implies none or both."""
    tokens = set(re.split(r"[^a-z0-9]+", name.lower()))
    found = [role for role in ROLES if tokens & ROLE_WORDS[role]]
    return found[0] if len(found) == 1 else None


def assign_roles(modalities: Mapping[str, int], roles: Mapping[str, str] | Sequence[str] | None, model: str) -> dict[str, str]:
    """``{"optical": name, "active": name}`` for a two-stream model, whatever order ``modalities`` lists them in.

    ``roles`` is an explicit mapping role -> modality name, or None to decide by name:
    a modality whose name holds a word of :data:`ROLE_WORDS` takes that role, and when
    exactly one of the two names is recognised the other takes the remaining role. A
    list of two names gives the roles by position (optical first): the rule of
    checkpoints written before roles were recorded. Anything undecidable is an InputError
    asking for the mapping.
    """
    names = list(modalities)
    if len(names) != 2:
        raise InputError(f"model {model!r} fuses exactly two modalities (one optical, one SAR/LiDAR), got {len(names)}: {names}; pass two")
    hint = (
        f'pass roles={{"optical": "{names[0]}", "active": "{names[1]}"}} or the reverse '
        f"(tilefuse train --hparam 'roles={{\"optical\": \"{names[0]}\", \"active\": \"{names[1]}\"}}')"
    )
    if isinstance(roles, (list, tuple)):
        if sorted(map(str, roles)) != sorted(names):
            raise InputError(f"positional roles {list(roles)} of model {model!r} must list its modalities {names} once each")
        return {OPTICAL: str(roles[0]), ACTIVE: str(roles[1])}
    if roles is not None:
        if not isinstance(roles, Mapping) or not all(isinstance(v, str) for v in roles.values()):
            raise InputError(f"roles of model {model!r} must map each role to a modality name, got {roles!r}: {hint}")
        if set(roles) != set(ROLES):
            raise InputError(f"roles {dict(roles)} of model {model!r} must name exactly the roles {list(ROLES)}: {hint}")
        if sorted(roles.values()) != sorted(names):
            raise InputError(f"roles {dict(roles)} of model {model!r} must give each of its modalities {names} one role: {hint}")
        return {role: roles[role] for role in ROLES}
    implied = {name: role_of_name(name) for name in names}
    known = [name for name in names if implied[name] is not None]
    if len(known) == 2 and implied[names[0]] == implied[names[1]]:
        raise InputError(f"modalities {names} of model {model!r} both look {implied[names[0]]}: {hint}")
    if not known:
        raise InputError(f"cannot tell which of {names} is optical and which SAR/LiDAR for model {model!r}: {hint}")
    first = known[0]
    other = names[1] if first == names[0] else names[0]
    return {implied[first]: first, (ACTIVE if implied[first] == OPTICAL else OPTICAL): other}


def flag(name: str, value: object) -> bool:
    """A yes/no hyperparameter: only ``True`` or ``False`` (``bool("false")`` is true, so a string is refused)."""
    if not isinstance(value, bool):
        raise InputError(f"hyperparameter {name} must be true or false, got {value!r}")
    return value


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


def dihedral(x: torch.Tensor, k: int) -> torch.Tensor:
    """Rotate the last two axes by 90° x (k % 4), then flip columns if k >= 4 (as the training augmentation)."""
    x = torch.rot90(x, k % 4, dims=(-2, -1))
    return x.flip(-1) if k >= 4 else x


def undo_dihedral(x: torch.Tensor, k: int) -> torch.Tensor:
    """The inverse of :func:`dihedral`."""
    return torch.rot90(x.flip(-1) if k >= 4 else x, -(k % 4), dims=(-2, -1))


def dihedral_mean(forward: Callable[[Mapping[str, torch.Tensor]], torch.Tensor], inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Test-time augmentation (a model's ``tta=True``): ``forward``'s logits averaged over the 8 flips/rotations
    of ``inputs``, each turned back (8x the cost)."""
    total = None
    for k in range(8):
        logits = undo_dihedral(forward({n: dihedral(x, k) for n, x in inputs.items()}), k)
        total = logits if total is None else total + logits
    return total / 8
