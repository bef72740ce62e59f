"""S²Fin: spatial-spectral-frequency interactive network, OUR INTERPRETATION of the published description.

The paper (arXiv 2510.04628) is known here only from its abstract and secondary
summaries (see ``docs/models.md``); the authors' code was not available. Every
layer below is a reading of the published module names and their stated roles,
not a reproduction, and the numbers it reaches are ours, not the paper's.

Per pixel, the classifier sees a P x P optical patch (C_o bands), a P x P active
patch (SAR or LiDAR, C_a bands) and the optical spectrum at the centre pixel:

- band projection: a learnable 1x1 conv C_o -> ``spectral_tokens`` bands replaces
  an offline PCA, so the model stays a pure function of the scene store;
- spectral stream: the projected centre spectrum, embedded by a 1-D conv over
  neighbouring bands (one token per projected band, plus position embeddings);
  ``spectrum="raw"`` tokenises the raw, wavelength-ordered centre spectrum instead
  (one token per input band), so the spectral high-pass runs along wavelength;
- spatial streams: a 3x3 conv stem per modality to ``dim`` channels;
- HFSET (twice): top-k sparse attention of the spectral tokens over themselves and
  pooled spatial tokens; from its output a threshold tau and per-channel gains set
  a soft high-pass along the spectral token axis, whose output is added back
  (residual), then an FFN. The mask is ``relu(2*sigmoid((f - tau)/t) - 1)``: the
  published soft mask ``sigmoid((f - tau)/t)`` rectified to be exactly zero below
  tau (our choice), so tau at Nyquist means no enhancement; AFCM and HFRM use the
  same rectified mask over the normalised radial frequency;
- AFCM (shallow): radial low/high split of both spatial maps at a learnable radius;
  the low parts are averaged as shared structure, the high parts kept per modality,
  a channel attention chooses the mix, which each stream adds back (residual);
- SSAF (intermediate): cross-gating (pooled spatial maps gate the tokens, pooled
  tokens gate the maps' channels) and a light token-mixing layer; no Mamba;
- HFRM (deep): phase agreement ``R = (1 + cos(phi_o - phi_a)) / 2``; both spectra
  are scaled by ``1 + beta * R * high_mask`` (beta learnable, init 0.1), phases kept;
- head: mean spectral token, centre pixel of each spatial map, LayerNorm, linear.

About 0.61 M parameters with the defaults, nearly independent of the band counts
(12-band optical + 2-band SAR, 48- or 144-band HSI + 1-band LiDAR).

:class:`S2FinModel` is the dense tile model the engine runs: context margin P//2,
no blending. A (B, C, T+P-1, T+P-1) tile gives (B, K, T, T) logits, computed by
cutting every pixel's patch with ``unfold`` in sub-batches of at most
``max_patches_per_batch`` patches (at least one), written into one output tensor.
A sub-batch holds patches of a single tile (and the band projection runs per
tile), so a tile's logits do not depend on the tiles that share its call
(``spec.batch_invariant``: the engine need not pad a partial batch). The
default, 128 patches, keeps every activation near 4 MB: at 2048 patches (the
old default) each was 63 MB, above glibc's largest mmap threshold (32 MiB), so
every one was mapped, page-faulted in and unmapped again (48-band tile, one
thread: 2.5x the CPU time, 55% of it system time; at 64-256 patches the dense
forward costs what the classifier costs on the same patches cut beforehand).
The 1x1 band projection is applied to the whole
tile before ``unfold`` (exact: it is per pixel), so the cut patches carry
``spectral_tokens`` channels, not C_o. An input of exactly P x P gives (B, K, 1, 1), the
classifier on the whole batch at once: the training sampler's labelled-pixel batches go through this forward, and
the default :meth:`TileModel.compute_loss` (cross-entropy, 255 ignored) is the
centre-pixel loss.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from tilefuse.errors import InputError
from tilefuse.models.layers import ACTIVE, OPTICAL, assign_roles, check_inputs, dihedral_mean, flag, float32_spectra
from tilefuse.tile_model import TileModel, TileModelSpec, masked_cross_entropy, register_model

SPECTRA = ("projected", "raw")
"""What the spectral stream tokenises: the learned band projection of the centre spectrum, or the raw
wavelength-ordered centre spectrum (one token per band, so the spectral FFT runs along wavelength)."""


def soft_high_pass(frequency: torch.Tensor, threshold: torch.Tensor, temperature: float) -> torch.Tensor:
    """``relu(2*sigmoid((f - threshold)/t) - 1)``: 0 up to the threshold, rising smoothly towards 1 above it.

    The published soft mask is ``sigmoid((f - tau)/t)``; we rectify it so that nothing
    below the threshold leaks through (DC always stays in the low band).
    """
    return F.relu(2 * torch.sigmoid((frequency - threshold) / temperature) - 1)


def spectral_high_pass(tokens: torch.Tensor, tau: torch.Tensor, temperature: float = 0.05) -> torch.Tensor:
    """High-frequency part of ``tokens`` (N, L, D) along the token axis, cut at ``tau`` (N,) cycles/token.

    :func:`soft_high_pass` mask on the rfft frequencies f in [0, 0.5]: exactly zero for
    f <= tau, so ``tau = 0.5`` (Nyquist) returns zeros.
    """
    with float32_spectra(tokens):
        length = tokens.shape[1]
        spectrum = torch.fft.rfft(tokens.float(), dim=1, norm="ortho")
        freqs = torch.fft.rfftfreq(length, device=tokens.device)
        mask = soft_high_pass(freqs[None, :], tau[:, None], temperature)
        return torch.fft.irfft(spectrum * mask[:, :, None], n=length, dim=1, norm="ortho")


def radial_frequency(height: int, width: int, device: torch.device) -> torch.Tensor:
    """Radial frequency of each rfft2 bin of an (height, width) map, normalised to [0, 1]."""
    fy = torch.fft.fftfreq(height, device=device)
    fx = torch.fft.rfftfreq(width, device=device)
    distance = torch.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2)
    return distance / distance.max().clamp_min(1e-12)


class ConvBNGELU(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.GELU(),
        )


class ResidualConvBlock(nn.Module):
    """Two 3x3 conv+BN layers with a residual connection."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            ConvBNGELU(dim, dim),
            nn.Conv2d(dim, dim, 3, padding=1, bias=False),
            nn.BatchNorm2d(dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x + self.body(x))


def topk_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, topk: int) -> torch.Tensor:
    """Attention (N, heads, L, d) where each query attends only to its ``topk`` highest-scoring keys."""
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    keep = min(topk, scores.shape[-1])
    threshold = scores.topk(keep, dim=-1).values[..., -1:]
    scores = scores.masked_fill(scores < threshold, float("-inf"))
    return scores.softmax(dim=-1) @ v


class HFSET(nn.Module):
    """High-frequency sparse enhancement transformer layer on spectral tokens (our interpretation)."""

    def __init__(self, dim: int, heads: int = 4, topk: int = 8, temperature: float = 0.05) -> None:
        super().__init__()
        if dim % heads:
            raise InputError(f"S²Fin dim {dim} must be a multiple of heads {heads}")
        self.heads, self.topk, self.temperature = heads, topk, temperature
        self.norm = nn.LayerNorm(dim)
        self.context_norm = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.controls = nn.Linear(dim, 1 + dim)  # threshold logit (tau = 0.5 * sigmoid), per-channel gains (softplus)
        self.ffn_norm = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        n, length, dim = x.shape
        return x.view(n, length, self.heads, dim // self.heads).transpose(1, 2)

    def enhance(self, tokens: torch.Tensor, tau: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
        """``tokens + gain * high_pass(tokens, tau)``: the HFSET frequency step, exposed for tests."""
        return tokens + gain[:, None, :] * spectral_high_pass(tokens, tau, self.temperature).to(tokens.dtype)

    def forward(self, tokens: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        h = self.norm(tokens)
        keys = torch.cat([h, self.context_norm(context)], dim=1)
        k, v = self.kv(keys).chunk(2, dim=-1)
        attended = topk_attention(self._split(self.q(h)), self._split(k), self._split(v), self.topk)
        attended = self.proj(attended.transpose(1, 2).flatten(2))
        tokens = tokens + attended
        controls = self.controls(attended.mean(dim=1))
        tau = 0.5 * torch.sigmoid(controls[:, 0].float())
        gain = F.softplus(controls[:, 1:])
        tokens = self.enhance(tokens, tau, gain)
        return tokens + self.ffn(self.ffn_norm(tokens))


class AFCM(nn.Module):
    """Adaptive frequency channel module (shallow): shared low frequencies, per-modality high ones."""

    def __init__(self, dim: int, temperature: float = 0.1) -> None:
        super().__init__()
        self.rho = nn.Parameter(torch.tensor(0.0))  # radius = sigmoid(rho), in normalised radial frequency
        self.temperature = temperature
        hidden = max(dim // 4, 4)
        self.attention = nn.Sequential(nn.Linear(2 * dim, hidden), nn.GELU(), nn.Linear(hidden, 3 * dim))
        self.optical_out = nn.Conv2d(dim, dim, 1)
        self.active_out = nn.Conv2d(dim, dim, 1)

    def low_pass(self, x: torch.Tensor) -> torch.Tensor:
        with float32_spectra(x):
            size = x.shape[-2:]
            radius = torch.sigmoid(self.rho)
            mask = 1 - soft_high_pass(radial_frequency(*size, x.device), radius, self.temperature)
            return torch.fft.irfft2(torch.fft.rfft2(x.float(), norm="ortho") * mask, s=size, norm="ortho").to(x.dtype)

    def forward(self, o: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        low_o, low_a = self.low_pass(o), self.low_pass(a)
        shared, high_o, high_a = (low_o + low_a) / 2, o - low_o, a - low_a
        pooled = torch.cat([o.mean(dim=(2, 3)), a.mean(dim=(2, 3))], dim=1)
        weights = self.attention(pooled).view(o.shape[0], 3, o.shape[1]).softmax(dim=1)[..., None, None]
        mix = weights[:, 0] * shared + weights[:, 1] * high_o + weights[:, 2] * high_a
        return o + self.optical_out(mix), a + self.active_out(mix)


class SSAF(nn.Module):
    """Spatial-spectral attention fusion: cross-gating between tokens and maps, then token mixing."""

    def __init__(self, dim: int, num_tokens: int) -> None:
        super().__init__()
        self.spatial_to_tokens = nn.Linear(2 * dim, dim)
        self.tokens_to_spatial = nn.Linear(dim, 2 * dim)
        self.mixer_norm = nn.LayerNorm(dim)
        self.token_mixer = nn.Linear(num_tokens, num_tokens)

    def forward(
        self, tokens: torch.Tensor, o: torch.Tensor, a: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        spatial = torch.cat([o.mean(dim=(2, 3)), a.mean(dim=(2, 3))], dim=1)
        token_gate = torch.sigmoid(self.spatial_to_tokens(spatial))[:, None, :]
        gate_o, gate_a = torch.sigmoid(self.tokens_to_spatial(tokens.mean(dim=1))).chunk(2, dim=1)
        tokens = tokens * (1 + token_gate)
        o = o * (1 + gate_o[..., None, None])
        a = a * (1 + gate_a[..., None, None])
        tokens = tokens + self.token_mixer(self.mixer_norm(tokens).transpose(1, 2)).transpose(1, 2)
        return tokens, o, a


class HFRM(nn.Module):
    """High-frequency resonance mask (deep): boosts high frequencies where the two phases agree."""

    def __init__(self, beta_init: float = 0.1, temperature: float = 0.1) -> None:
        super().__init__()
        self.beta = nn.Parameter(torch.tensor(float(beta_init)))
        self.rho = nn.Parameter(torch.tensor(0.0))
        self.temperature = temperature

    @staticmethod
    def resonance(zo: torch.Tensor, za: torch.Tensor) -> torch.Tensor:
        """``(1 + cos(phi_o - phi_a)) / 2`` from two complex spectra; 1 where the phases agree."""
        cosine = (zo * za.conj()).real / (zo.abs() * za.abs()).clamp_min(1e-12)
        return (1 + cosine) / 2

    def forward(self, o: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with float32_spectra(o):
            size = o.shape[-2:]
            zo = torch.fft.rfft2(o.float(), norm="ortho")
            za = torch.fft.rfft2(a.float(), norm="ortho")
            high = soft_high_pass(radial_frequency(*size, o.device), torch.sigmoid(self.rho), self.temperature)
            gain = 1 + self.beta * self.resonance(zo, za) * high
            o_out = torch.fft.irfft2(zo * gain, s=size, norm="ortho")
            a_out = torch.fft.irfft2(za * gain, s=size, norm="ortho")
        return o_out.to(o.dtype), a_out.to(a.dtype)


class S2FinClassifier(nn.Module):
    """Centre-pixel classifier of P x P patches: ``(optical (N, C_o, P, P), active (N, C_a, P, P)) -> (N, K)``."""

    def __init__(
        self,
        optical_bands: int,
        active_bands: int,
        num_classes: int,
        patch_size: int = 11,
        dim: int = 64,
        spectral_tokens: int = 32,
        heads: int = 4,
        topk: int = 8,
        spectrum: str = "projected",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if spectrum not in SPECTRA:
            raise InputError(f"S²Fin spectrum= must be one of {', '.join(SPECTRA)}, got {spectrum!r}")
        self.patch_size = patch_size
        self.spectrum = spectrum
        tokens = spectral_tokens if spectrum == "projected" else optical_bands
        self.band_projection = nn.Conv2d(optical_bands, spectral_tokens, 1)
        self.spectral_embedding = nn.Conv1d(1, dim, 3, padding=1)
        self.token_position = nn.Parameter(torch.zeros(1, tokens, dim))
        nn.init.trunc_normal_(self.token_position, std=0.02)
        self.optical_stem = ConvBNGELU(spectral_tokens, dim)
        self.active_stem = ConvBNGELU(active_bands, dim)
        self.hfset = nn.ModuleList([HFSET(dim, heads, topk), HFSET(dim, heads, topk)])
        self.afcm = AFCM(dim)
        self.ssaf = SSAF(dim, tokens)
        self.hfrm = HFRM()
        self.optical_blocks = nn.ModuleList(ResidualConvBlock(dim) for _ in range(3))
        self.active_blocks = nn.ModuleList(ResidualConvBlock(dim) for _ in range(3))
        self.head_norm = nn.LayerNorm(3 * dim)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(3 * dim, num_classes)

    @staticmethod
    def _context(o: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """Pooled spatial tokens (N, 18, D) that HFSET's sparse attention may also attend to."""
        return torch.cat([F.adaptive_avg_pool2d(m, 3).flatten(2).transpose(1, 2) for m in (o, a)], dim=1)

    def _blocks(self, i: int, o: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.optical_blocks[i](o), self.active_blocks[i](a)

    def forward(self, optical: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        c = self.patch_size // 2
        return self.classify(self.band_projection(optical), optical[:, :, c, c], active)

    def classify(self, projected: torch.Tensor, centre: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        """Logits (N, K) from band-projected optical patches (N, T, P, P), the raw centre spectra (N, C_o)
        and active patches (N, C_a, P, P). The projection is per pixel (1x1), so projecting a whole tile
        and cutting patches afterwards gives exactly the patches of the projected tile."""
        c = self.patch_size // 2
        spectrum = projected[:, :, c, c] if self.spectrum == "projected" else centre
        tokens = self.spectral_embedding(spectrum[:, None, :]).transpose(1, 2) + self.token_position
        o, a = self.optical_stem(projected), self.active_stem(active)
        tokens = self.hfset[0](tokens, self._context(o, a))
        o, a = self._blocks(0, *self.afcm(o, a))
        tokens, o, a = self.ssaf(tokens, o, a)
        tokens = self.hfset[1](tokens, self._context(o, a))
        o, a = self._blocks(1, o, a)
        o, a = self._blocks(2, *self.hfrm(o, a))
        features = torch.cat([tokens.mean(dim=1), o[:, :, c, c], a[:, :, c, c]], dim=1)
        return self.head(self.dropout(self.head_norm(features)))


def unfold_patches(x: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Every P x P patch of ``x`` (B, C, h, w) as (B * (h-P+1) * (w-P+1), C, P, P), row-major per item (one copy)."""
    p = patch_size
    return x.unfold(2, p, 1).unfold(3, p, 1).permute(0, 2, 3, 1, 4, 5).reshape(-1, x.shape[1], p, p)


class S2FinModel(TileModel):
    """Dense S²Fin tile model (our interpretation, see the module docstring): margin P//2, no blending.

    ``forward({optical: (B, C_o, H, W), active: (B, C_a, H, W)})`` -> (B, K, H-P+1, W-P+1);
    P x P inputs give (B, K, 1, 1), so training on labelled-pixel patches and dense
    inference share this forward (and the default cross-entropy ``compute_loss``).

    Which modality is optical and which active follows the names, never their order
    (the rule of :func:`tilefuse.models.layers.assign_roles`, as for PAD: ``optical``,
    ``s2``, ``msi``, ``hsi``, ``rgb``... are optical; ``sar``, ``s1``, ``lidar``, ``dsm``,
    ``dem``, ``chm`` active), or pass ``roles={"optical": NAME, "active": NAME}``.

    Options, all off by default: ``dropout`` (before the head) and ``label_smoothing`` (of the
    centre-pixel loss) for training on few labels; ``tta=True`` averages, outside training, the
    logits over the 8 flips/rotations of the input (the training augmentation), 8x the cost.
    """

    def __init__(
        self,
        modalities: Mapping[str, int],
        num_classes: int,
        patch_size: int = 11,
        dim: int = 64,
        spectral_tokens: int = 32,
        heads: int = 4,
        topk: int = 8,
        max_patches_per_batch: int = 128,
        roles: Mapping[str, str] | Sequence[str] | None = None,
        spectrum: str = "projected",
        dropout: float = 0.0,
        label_smoothing: float = 0.0,
        tta: bool = False,
    ) -> None:
        super().__init__()
        for name, value in (("dropout", dropout), ("label_smoothing", label_smoothing)):
            if not 0 <= value < 1:
                raise InputError(f"S²Fin {name}= must be in [0, 1), got {value}")
        if patch_size < 3 or patch_size % 2 == 0:
            raise InputError(f"S²Fin patch_size must be odd and >= 3, got {patch_size}")
        if max_patches_per_batch < 1:
            raise InputError(f"max_patches_per_batch must be >= 1, got {max_patches_per_batch}")
        assigned = assign_roles(modalities, roles, "s2fin")
        self.optical, self.active = assigned[OPTICAL], assigned[ACTIVE]
        self.spec = TileModelSpec(dict(modalities), int(num_classes), margin=patch_size // 2, blend=False, batch_invariant=True, roles=assigned)
        self.patch_size = patch_size
        self.max_patches_per_batch = max_patches_per_batch
        self.label_smoothing = float(label_smoothing)
        self.tta = flag("tta", tta)
        self.classifier = S2FinClassifier(
            modalities[self.optical], modalities[self.active], num_classes, patch_size, dim, spectral_tokens, heads, topk, spectrum, dropout
        )

    def compute_loss(self, inputs: Mapping[str, torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        """Centre-pixel cross-entropy (255 ignored), with ``label_smoothing`` when set."""
        return masked_cross_entropy(self(inputs), target, self.label_smoothing)

    def forward(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        check_inputs(inputs, self.spec.modalities)
        if not self.tta or self.training:
            return self._dense(inputs)
        return dihedral_mean(self._dense, inputs)

    def _dense(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        o, a = inputs[self.optical], inputs[self.active]
        p = self.patch_size
        if o.shape[0] != a.shape[0] or o.shape[2:] != a.shape[2:]:
            raise InputError(f"modalities {self.optical!r} {tuple(o.shape)} and {self.active!r} {tuple(a.shape)} differ in size")
        batch, height, width = o.shape[0], o.shape[2] - p + 1, o.shape[3] - p + 1
        if height < 1 or width < 1:
            raise InputError(f"S²Fin needs inputs of at least {p}x{p} pixels (patch size), got {tuple(o.shape[2:])}")
        if batch == 0:
            return o.new_zeros(0, self.spec.num_classes, height, width)
        if height * width == 1:  # P x P patches (training, labelled pixels): one batch, as the classifier sees them
            return self.classifier(o, a)[:, :, None, None]
        c = p // 2
        cols_per = max(1, min(width, self.max_patches_per_batch))
        rows_per = max(1, self.max_patches_per_batch // cols_per)
        out = None
        for i in range(batch):  # sub-batches never mix tiles: a tile's logits do not depend on its batch
            projected = self.classifier.band_projection(o[i : i + 1])  # once per tile, then cut: exact, T/C_o the memory
            for y0 in range(0, height, rows_per):
                y1 = min(height, y0 + rows_per)
                for x0 in range(0, width, cols_per):
                    x1 = min(width, x0 + cols_per)
                    rows, cols = slice(y0, y1 + p - 1), slice(x0, x1 + p - 1)
                    centre = o[i, :, y0 + c : y1 + c, x0 + c : x1 + c].permute(1, 2, 0).reshape(-1, o.shape[1])
                    patches = unfold_patches(projected[:, :, rows, cols], p), unfold_patches(a[i : i + 1, :, rows, cols], p)
                    logits = self.classifier.classify(patches[0], centre, patches[1])
                    if out is None:  # the logits' dtype (autocast) decides the output's
                        out = logits.new_empty(batch, logits.shape[1], height, width)
                    out[i, :, y0:y1, x0:x1] = logits.view(y1 - y0, x1 - x0, -1).permute(2, 0, 1)
        return out

register_model(
    "s2fin",
    description="S²Fin spatial-spectral-frequency network (our interpretation), dense centre-pixel classifier",
    modalities={"optical": 12, "sar": 2},
    num_classes=10,
    patch_size=11,
)(S2FinModel)

__all__ = [
    "S2FinModel",
    "S2FinClassifier",
    "HFSET",
    "AFCM",
    "SSAF",
    "HFRM",
    "spectral_high_pass",
    "soft_high_pass",
    "radial_frequency",
    "topk_attention",
    "unfold_patches",
]
