"""PAD: Phase-Amplitude Decoupling fusion for SAR + optical semantic segmentation.

Written from the description in ``docs/models.md`` (paper arXiv 2504.19136 and the
facts of the authors' released code); no code is copied. Two ConvNeXt-V2 encoders
with independent weights (the optical modality -> optical branch, the SAR one
-> SAR branch; see "Roles" below), a per-stage LayerNorm2d whose output continues into the next stage, one
PAD fusion block per stage feeding only the heads, a UPerNet decoder and, in
training, an FCN auxiliary head on the fused stage-3 map.

One PAD fusion block on (A, S), each (B, C, H, W), all convs 1x1 with bias:

1. SCF: ``R = conv(cat(A, S))``, gate ``G = sigmoid(conv_to_1(cat(A, S)))``,
   ``F = conv(cat(A*G, S*(1-G))) + R``.
2. Decoupling: ``Z = rfft2(F, norm="ortho")`` (fftshifted in faithful mode),
   ``M = |Z|``, ``P = angle(Z)``.
3. ASF: soft high-pass mask ``m = sigmoid(10 * (d - sigmoid(rho)))``, rho learnable
   (init 0.1); ``H = MLP(M*m)`` over channels (C->C->2C->C, LeakyReLU 0.01);
   ``M' = conv(cat(M, H)) + M``.
4. PSC: ``K = sigmoid(conv(LeakyReLU(conv(P))))`` (hidden max(C//8, 1) channels),
   ``P' = P * (1 + K)``.
5. Recoupling: ``out = irfft2(M' * exp(i P'), s=(H, W)) + R`` (the residual is R, not F).

``faithful_shift=True`` (default) reproduces the reference code: fftshift on both
axes of the half spectrum, distance measured in index units from
``(H//2, (W//2+1)//2)``, so the highest horizontal frequencies land next to the
centre and are masked as "low". ``faithful_shift=False`` keeps the spectrum
unshifted and measures the true radial frequency ``sqrt(fy^2 + fx^2)`` in
cycles/pixel (normalised by its maximum), so the mask is a genuine high pass.
Everything after the mask is position-wise, so this is the only difference.

Loss (:func:`pad_loss`): ``CE(main) + 0.4 CE(aux) + 0.1 * sum_stages MSE(M', M)``,
label 255 ignored.

Roles: which modality feeds which encoder follows the modality names, never
their order (:func:`tilefuse.models.layers.assign_roles`): a name holding
``optical``, ``s2``, ``sentinel2``, ``msi``, ``multispectral``, ``hsi``,
``hyperspectral`` or ``rgb`` (as a ``_``/``-``-separated word) is optical; one holding
``sar``, ``s1``, ``sentinel1``, ``lidar``, ``dsm``, ``dem`` or ``chm`` is the active
(SAR) input; when only one name is recognised the other takes the remaining role.
Otherwise pass the hyperparameter ``roles={"optical": NAME, "active": NAME}``. The
model reports the mapping in ``spec.roles`` and checkpoints record it.

Our additions, not in the paper: any band count per modality (the stems adapt),
inputs of any size (zero-padded at the bottom/right to a multiple of 32 and the
logits cropped back), a guard for 1x1 spectra whose distance maximum is 0,
small presets that train on a CPU, and an optional full-resolution head
(``pixel_head``, :class:`PixelHead`) that adds a per-pixel correction to the logits,
optionally with a linear term from the bands (``pixel_head_linear``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from tilefuse.errors import InputError
from tilefuse.models.convnext import ConvNeXt, LoadReport, load_convnext_state, read_state_dict
from tilefuse.models.layers import ACTIVE, OPTICAL, ConvBNReLU, assign_roles, check_inputs, dihedral_mean, flag, float32_spectra
from tilefuse.tile_model import TileModel, TileModelSpec, masked_cross_entropy, register_model

STRIDE = 32
"""Output stride of the encoders: inputs are padded to a multiple of it."""


@dataclass(frozen=True)
class PADPreset:
    encoder: str
    """ConvNeXt-V2 preset name (see ``tilefuse.models.convnext.PRESETS``)."""
    decoder_channels: int
    aux_channels: int
    drop_path: float


PRESETS: dict[str, PADPreset] = {
    "atto": PADPreset("atto", 64, 32, 0.1),
    "femto": PADPreset("femto", 64, 32, 0.1),
    "pico": PADPreset("pico", 96, 48, 0.1),
    "nano": PADPreset("nano", 128, 64, 0.1),
    "tiny": PADPreset("tiny", 256, 128, 0.2),
    "paper": PADPreset("large", 256, 128, 0.4),
    # ours, not in the paper: small encoders and a narrow decoder for small chips on a CPU
    "micro": PADPreset("micro", 48, 24, 0.05),
    "zepto": PADPreset("zepto", 32, 16, 0.0),
}


# --- the fusion block ----------------------------------------------------------------------


def high_pass_mask(
    height: int, width: int, radius: torch.Tensor, temperature: float = 10.0, faithful_shift: bool = True
) -> torch.Tensor:
    """Soft high-pass mask ``sigmoid(T * (d - radius))`` over the rfft2 spectrum of an (height, width) map.

    Shape (height, width//2 + 1), laid out like the spectrum the block works on:
    fftshifted on both axes when ``faithful_shift`` (the reference code's layout and
    its index-unit distance), unshifted with the true radial frequency otherwise.
    """
    device = radius.device
    columns = width // 2 + 1
    if faithful_shift:
        rows = torch.arange(height, device=device, dtype=torch.float32) - height // 2
        cols = torch.arange(columns, device=device, dtype=torch.float32) - columns // 2
    else:
        rows = torch.fft.fftfreq(height, device=device)
        cols = torch.fft.rfftfreq(width, device=device)
    distance = torch.sqrt(rows[:, None] ** 2 + cols[None, :] ** 2)
    distance = distance / distance.max().clamp_min(1e-12)
    return torch.sigmoid((distance - radius) * temperature)


def decouple(x: torch.Tensor, faithful_shift: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Amplitude and phase of ``rfft2(x, norm="ortho")`` (fftshifted on both axes when faithful)."""
    spectrum = torch.fft.rfft2(x.float(), norm="ortho")
    if faithful_shift:
        spectrum = torch.fft.fftshift(spectrum, dim=(-2, -1))
    return spectrum.abs(), spectrum.angle()


def recouple(amplitude: torch.Tensor, phase: torch.Tensor, size: tuple[int, int], faithful_shift: bool = True) -> torch.Tensor:
    """Inverse of :func:`decouple`: the real (B, C, *size) map with that amplitude and phase."""
    spectrum = torch.complex(amplitude * torch.cos(phase), amplitude * torch.sin(phase))  # amplitude may be < 0
    if faithful_shift:
        spectrum = torch.fft.ifftshift(spectrum, dim=(-2, -1))
    return torch.fft.irfft2(spectrum, s=size, norm="ortho")


class SpatialComplementaryFusion(nn.Module):
    """SCF: a per-pixel gate mixes the two modalities; returns ``(F, R)``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.residual = nn.Conv2d(2 * dim, dim, 1)
        self.gate = nn.Conv2d(2 * dim, 1, 1)
        self.fuse = nn.Conv2d(2 * dim, dim, 1)

    def forward(self, a: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        both = torch.cat([a, s], dim=1)
        residual = self.residual(both)
        g = torch.sigmoid(self.gate(both))
        return self.fuse(torch.cat([a * g, s * (1 - g)], dim=1)) + residual, residual


class AmplitudeSpectrumFusion(nn.Module):
    """ASF: a channel MLP on the high-passed amplitude, mixed back with a residual; learnable radius."""

    def __init__(self, dim: int, radius_init: float = 0.1, temperature: float = 10.0, faithful_shift: bool = True) -> None:
        super().__init__()
        self.rho = nn.Parameter(torch.tensor(float(radius_init)))
        self.temperature = temperature
        self.faithful_shift = faithful_shift
        self.mlp = nn.Sequential(
            nn.Linear(dim, dim), nn.LeakyReLU(0.01),
            nn.Linear(dim, 2 * dim), nn.LeakyReLU(0.01),
            nn.Linear(2 * dim, dim),
        )  # fmt: skip
        self.mix = nn.Conv2d(2 * dim, dim, 1)

    @property
    def radius(self) -> torch.Tensor:
        return torch.sigmoid(self.rho)

    def forward(self, amplitude: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        mask = high_pass_mask(*size, self.radius, self.temperature, self.faithful_shift)
        high = self.mlp((amplitude * mask).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.mix(torch.cat([amplitude, high], dim=1)) + amplitude


class PhaseSpectrumCorrection(nn.Module):
    """PSC: scales the phase by ``1 + K``, K in (0, 1) from a small conv attention (no re-wrapping)."""

    def __init__(self, dim: int, reduction: int = 8) -> None:
        super().__init__()
        hidden = max(dim // reduction, 1)
        self.attention = nn.Sequential(nn.Conv2d(dim, hidden, 1), nn.LeakyReLU(0.01), nn.Conv2d(hidden, 1, 1))

    def scale(self, phase: torch.Tensor) -> torch.Tensor:
        """The factor ``1 + K`` (B, 1, h, w), always within [1, 2]."""
        return 1 + torch.sigmoid(self.attention(phase))

    def forward(self, phase: torch.Tensor) -> torch.Tensor:
        return phase * self.scale(phase)


class PADBlock(nn.Module):
    """One PAD fusion block: ``forward(optical, sar) -> (fused, (M', M))``."""

    def __init__(self, dim: int, faithful_shift: bool = True) -> None:
        super().__init__()
        self.faithful_shift = faithful_shift
        self.scf = SpatialComplementaryFusion(dim)
        self.asf = AmplitudeSpectrumFusion(dim, faithful_shift=faithful_shift)
        self.psc = PhaseSpectrumCorrection(dim)

    def forward(self, a: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        fused, residual = self.scf(a, s)
        size = (fused.shape[-2], fused.shape[-1])
        with float32_spectra(fused):
            amplitude, phase = decouple(fused, self.faithful_shift)
            new_amplitude = self.asf(amplitude, size)
            new_phase = self.psc(phase)
            out = recouple(new_amplitude, new_phase, size, self.faithful_shift)
        return out + residual, (new_amplitude, amplitude)


# --- heads ------------------------------------------------------------------------------------


def _resize(x: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def _classifier(channels: int, num_classes: int, dropout: float) -> nn.Sequential:
    conv = nn.Conv2d(channels, num_classes, 1)
    nn.init.normal_(conv.weight, std=0.01)
    nn.init.zeros_(conv.bias)
    return nn.Sequential(nn.Dropout2d(dropout), conv)


class UPerHead(nn.Module):
    """UPerNet decoder: pyramid pooling on the deepest map + FPN over all four, fused and classified."""

    def __init__(
        self,
        in_channels: tuple[int, ...],
        channels: int,
        num_classes: int,
        pool_scales: tuple[int, ...] = (1, 2, 3, 6),
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        deepest = in_channels[-1]
        self.pool_scales = pool_scales
        self.ppm = nn.ModuleList(ConvBNReLU(deepest, channels, 1) for _ in pool_scales)
        self.ppm_bottleneck = ConvBNReLU(deepest + len(pool_scales) * channels, channels, 3)
        self.lateral = nn.ModuleList(ConvBNReLU(c, channels, 1) for c in in_channels[:-1])
        self.fpn = nn.ModuleList(ConvBNReLU(channels, channels, 3) for _ in in_channels[:-1])
        self.fpn_bottleneck = ConvBNReLU(len(in_channels) * channels, channels, 3)
        self.classifier = _classifier(channels, num_classes, dropout)

    def features(self, features: list[torch.Tensor]) -> torch.Tensor:
        """The fused decoder map (B, channels, H/4, W/4) the classifier reads."""
        deepest = features[-1]
        pooled = [
            _resize(conv(F.adaptive_avg_pool2d(deepest, scale)), deepest.shape[2:])
            for scale, conv in zip(self.pool_scales, self.ppm)
        ]
        levels = [conv(f) for conv, f in zip(self.lateral, features[:-1])]
        levels.append(self.ppm_bottleneck(torch.cat([deepest, *pooled], dim=1)))
        for i in range(len(levels) - 1, 0, -1):
            levels[i - 1] = levels[i - 1] + _resize(levels[i], levels[i - 1].shape[2:])
        outs = [conv(level) for conv, level in zip(self.fpn, levels[:-1])] + [levels[-1]]
        size = outs[0].shape[2:]
        outs = [outs[0]] + [_resize(o, size) for o in outs[1:]]
        return self.fpn_bottleneck(torch.cat(outs, dim=1))

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        return self.classifier(self.features(features))


class FCNHead(nn.Module):
    """Auxiliary FCN head: 3x3 conv+BN+ReLU, dropout, 1x1 classifier."""

    def __init__(self, in_channels: int, channels: int, num_classes: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.conv = ConvBNReLU(in_channels, channels, 3)
        self.classifier = _classifier(channels, num_classes, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.conv(x))


class PixelHead(nn.Module):
    """Full-resolution refinement (ours, not in the paper): a per-pixel correction to the logits.

    One 1x1 conv over the decoder map upsampled to input size concatenated with the
    normalised input bands of both modalities at full resolution, BatchNorm + ReLU, a 1x1
    ConvBNReLU and a 1x1 classifier whose weights start at zero (so a fresh head leaves the
    logits as they are). This gives PAD at least a per-pixel classifier's view of the pixel
    values, which the stride-4 decoder map, upsampled bilinearly, lacks.

    The first conv is computed without upsampling the decoder map: its decoder part runs
    at the decoder's resolution and is upsampled after (bilinear resizing and a 1x1 conv
    without bias commute), which is the same function at a fraction of the cost.

    ``linear=True`` adds a 1x1 conv with bias from the bands straight to the logits: a
    per-pixel multinomial logistic regression inside the network, which extrapolates
    linearly to pixel values outside the training range (where the ReLU layers saturate
    or switch class abruptly). It is drawn like any conv, so a fresh head with it does
    change the logits.
    """

    def __init__(self, feature_channels: int, band_channels: int, channels: int, num_classes: int, linear: bool = False) -> None:
        super().__init__()
        self.feature_channels = feature_channels
        self.project = nn.Conv2d(feature_channels + band_channels, channels, 1, bias=False)
        self.norm = nn.BatchNorm2d(channels)
        self.hidden = ConvBNReLU(channels, channels, 1)
        self.classifier = nn.Conv2d(channels, num_classes, 1)
        nn.init.zeros_(self.classifier.weight)
        nn.init.zeros_(self.classifier.bias)
        self.linear = nn.Conv2d(band_channels, num_classes, 1) if linear else None

    def forward(self, features: torch.Tensor, bands: list[torch.Tensor]) -> torch.Tensor:
        weight = self.project.weight
        stacked = torch.cat(bands, dim=1)
        x = _resize(F.conv2d(features, weight[:, : self.feature_channels]), bands[0].shape[2:])
        x = x + F.conv2d(stacked, weight[:, self.feature_channels :])
        out = self.classifier(self.hidden(F.relu(self.norm(x))))
        return out if self.linear is None else out + self.linear(stacked)


# --- the model ------------------------------------------------------------------------------


class PADOutputs(NamedTuple):
    """Everything the PAD loss needs from one training forward."""

    logits: torch.Tensor
    """(B, K, H, W) main logits at input size."""
    aux_logits: torch.Tensor
    """(B, K, H, W) auxiliary FCN logits at input size."""
    amplitudes: list[tuple[torch.Tensor, torch.Tensor]]
    """Per stage ``(M', M)``: fused and original amplitude spectra."""


def amplitude_loss(amplitudes: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Sum over stages of ``MSE(M', M)`` (unweighted)."""
    return torch.stack([F.mse_loss(fused, original) for fused, original in amplitudes]).sum()


def pad_loss(
    outputs: PADOutputs, target: torch.Tensor, aux_weight: float = 0.4, amplitude_weight: float = 0.1
) -> torch.Tensor:
    """PAD's training loss: ``CE(main) + 0.4 CE(aux) + 0.1 * sum_stages MSE(M', M)``, label 255 ignored."""
    main = masked_cross_entropy(outputs.logits, target)
    aux = masked_cross_entropy(outputs.aux_logits, target)
    return main + aux_weight * aux + amplitude_weight * amplitude_loss(outputs.amplitudes).to(main.device)


class PADModel(TileModel):
    """PAD tile model: two modalities (optical, SAR) -> per-pixel logits at input size; margin 0, blended.

    ``roles`` (optional) maps ``"optical"`` and ``"active"`` to modality names; by default
    they follow the names (module docstring, "Roles").

    ``pixel_head`` (ours, off by default): add :class:`PixelHead`'s full-resolution
    correction, ``pixel_head_channels`` wide, to the main logits; ``pixel_head_linear``
    (ours, off by default) adds its linear term from the bands (:class:`PixelHead`). Off,
    the model is exactly the paper's. ``tta=True`` (ours, off by default, as S²Fin's): outside
    training, the logits averaged over the 8 flips/rotations of the tile (the training
    augmentation), 8x the cost.
    """

    def __init__(
        self,
        modalities: Mapping[str, int],
        num_classes: int,
        preset: str = "atto",
        decoder_channels: int | None = None,
        aux_channels: int | None = None,
        drop_path: float | None = None,
        faithful_shift: bool = True,
        roles: Mapping[str, str] | Sequence[str] | None = None,
        pixel_head: bool = False,
        pixel_head_channels: int = 32,
        pixel_head_linear: bool = False,
        tta: bool = False,
    ) -> None:
        super().__init__()
        self.tta = flag("tta", tta)
        if preset not in PRESETS:
            raise InputError(f"unknown PAD preset {preset!r}: choose one of {', '.join(PRESETS)}")
        assigned = assign_roles(modalities, roles, "pad")
        self.optical, self.sar = assigned[OPTICAL], assigned[ACTIVE]
        self.spec = TileModelSpec(dict(modalities), int(num_classes), margin=0, blend=True, roles=assigned)
        chosen = PRESETS[preset]
        drop_path = chosen.drop_path if drop_path is None else float(drop_path)
        self.optical_encoder = ConvNeXt.from_preset(chosen.encoder, modalities[self.optical], drop_path=drop_path)
        self.sar_encoder = ConvNeXt.from_preset(chosen.encoder, modalities[self.sar], drop_path=drop_path)
        widths = self.optical_encoder.widths
        faithful_shift = flag("faithful_shift", faithful_shift)
        self.fusions = nn.ModuleList(PADBlock(w, faithful_shift) for w in widths)
        decoder_channels = decoder_channels or chosen.decoder_channels
        self.decode_head = UPerHead(widths, decoder_channels, num_classes)
        self.aux_head = FCNHead(widths[2], aux_channels or chosen.aux_channels, num_classes)
        self.pixel_head = None
        pixel_head, pixel_head_linear = flag("pixel_head", pixel_head), flag("pixel_head_linear", pixel_head_linear)
        if pixel_head_linear and not pixel_head:
            raise InputError("pixel_head_linear=True needs pixel_head=True: the linear term is part of the pixel head")
        if pixel_head:
            if isinstance(pixel_head_channels, bool) or not (isinstance(pixel_head_channels, int) and pixel_head_channels >= 1):
                raise InputError(f"pixel_head_channels must be a whole number >= 1, got {pixel_head_channels!r}")
            bands = modalities[self.optical] + modalities[self.sar]
            self.pixel_head = PixelHead(decoder_channels, bands, pixel_head_channels, num_classes, linear=pixel_head_linear)

    def _fused_features(self, inputs: Mapping[str, torch.Tensor]):
        check_inputs(inputs, self.spec.modalities)
        a, s = inputs[self.optical], inputs[self.sar]
        if a.shape[0] != s.shape[0] or a.shape[2:] != s.shape[2:]:
            raise InputError(f"modalities {self.optical!r} {tuple(a.shape)} and {self.sar!r} {tuple(s.shape)} differ in size")
        height, width = a.shape[2:]
        pad = (0, -width % STRIDE, 0, -height % STRIDE)
        if any(pad):
            a, s = F.pad(a, pad), F.pad(s, pad)
        bands = [a, s]
        fused, amplitudes = [], []
        for i, block in enumerate(self.fusions):
            a = self.optical_encoder.forward_stage(i, a)
            s = self.sar_encoder.forward_stage(i, s)
            out, pair = block(a, s)
            fused.append(out)
            amplitudes.append(pair)
        return fused, amplitudes, bands, (height, width)

    @staticmethod
    def _to_input_size(logits: torch.Tensor, padded: torch.Size, size: tuple[int, int]) -> torch.Tensor:
        return _resize(logits, padded)[:, :, : size[0], : size[1]]

    def _main_logits(self, fused: list[torch.Tensor], bands: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        padded = bands[0].shape[2:]
        if self.pixel_head is None:
            return self._to_input_size(self.decode_head(fused), padded, size)
        features = self.decode_head.features(fused)
        logits = _resize(self.decode_head.classifier(features), padded) + self.pixel_head(features, bands)
        return logits[:, :, : size[0], : size[1]]

    def forward(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Logits (B, K, H, W) for ``{optical: (B, C_o, H, W), sar: (B, C_s, H, W)}``; any H, W."""
        if self.tta and not self.training:
            return dihedral_mean(self._logits, inputs)
        return self._logits(inputs)

    def _logits(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        fused, _, bands, size = self._fused_features(inputs)
        return self._main_logits(fused, bands, size)

    def forward_train(self, inputs: Mapping[str, torch.Tensor]) -> PADOutputs:
        """Main and auxiliary logits plus the per-stage amplitude pairs, for :func:`pad_loss`."""
        batch = next(iter(inputs.values())).shape[0] if inputs else 0
        if self.training and batch < 2:
            raise InputError("PAD trains on batches of 2 or more (BatchNorm over 1x1 pooled maps): raise the batch size")
        fused, amplitudes, bands, size = self._fused_features(inputs)
        logits = self._main_logits(fused, bands, size)
        aux = self._to_input_size(self.aux_head(fused[2]), bands[0].shape[2:], size)
        return PADOutputs(logits, aux, amplitudes)

    def compute_loss(self, inputs: Mapping[str, torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        """The full PAD loss (:func:`pad_loss`); ``target`` (B, H, W), 255 = ignore."""
        return pad_loss(self.forward_train(inputs), target)

    def load_pretrained_encoders(self, path: str | os.PathLike, strict: bool = True) -> dict[str, LoadReport]:
        """Load one local ConvNeXt-V2 checkpoint (timm/mmpretrain/official) into both encoders, as the paper does.

        Each stem adapts to its modality's band count. Not a build hyperparameter, so
        checkpoints reload without the file.
        """
        state = read_state_dict(path)
        return {
            name: load_convnext_state(encoder, state, strict=strict, source=str(path))
            for name, encoder in ((self.optical, self.optical_encoder), (self.sar, self.sar_encoder))
        }


register_model(
    "pad",
    description="PAD phase-amplitude decoupling fusion (optical + SAR segmentation), ConvNeXt-V2 encoders, UPerNet",
    modalities={"optical": 3, "sar": 1},
    num_classes=7,
    preset="atto",
)(PADModel)

__all__ = [
    "PRESETS",
    "PADPreset",
    "PADBlock",
    "PADModel",
    "PADOutputs",
    "SpatialComplementaryFusion",
    "AmplitudeSpectrumFusion",
    "PhaseSpectrumCorrection",
    "UPerHead",
    "FCNHead",
    "PixelHead",
    "high_pass_mask",
    "decouple",
    "recouple",
    "amplitude_loss",
    "pad_loss",
]
