"""Quicklook PNGs of scenes and label/prediction maps (matplotlib, Agg).

Pictures are drawn from a decimated read (every n-th pixel, at most
``max_size`` px per side), so a scene of any size costs one streaming pass
over the chunks and a small picture's worth of memory.
"""

from __future__ import annotations

import colorsys
import os
import re
from pathlib import Path
from typing import Sequence

import numpy as np
import xarray as xr

from tilefuse.errors import InputError
from tilefuse.outputs import create, png_metadata
from tilefuse.scene import IGNORE, band_dim, modalities, open_scene

MAX_SIZE = 1500
_TABLE = (  # distinct colours for the first classes (tab10, then tab20's light tones)
    (31, 119, 180), (44, 160, 44), (255, 127, 14), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
    (174, 199, 232), (152, 223, 138), (255, 187, 120), (255, 152, 150), (197, 176, 213),
    (196, 156, 148), (247, 182, 210), (199, 199, 199), (219, 219, 141), (158, 218, 229),
)  # fmt: skip
_RGB_NAMES = (("red", "green", "blue"), ("b4", "b3", "b2"), ("r", "g", "b"))


def class_colors(n: int) -> list[tuple[int, int, int]]:
    """A fixed colour (r, g, b in 0..255) per class id 0..n-1; the same ids get the same colours everywhere."""
    colors = list(_TABLE[:n])
    for i in range(len(colors), n):  # beyond the table: golden-ratio hues, alternating lightness
        r, g, b = colorsys.hls_to_rgb((i * 0.618033988749895) % 1.0, 0.45 if i % 2 else 0.65, 0.75)
        colors.append((round(r * 255), round(g * 255), round(b * 255)))
    return colors


def decimate(obj: xr.DataArray | xr.Dataset, max_size: int = MAX_SIZE) -> xr.DataArray | xr.Dataset:
    """Every n-th pixel along ``y`` and ``x`` so that neither side exceeds ``max_size`` (lazy), north up and west
    left as drawn: an array whose ``y`` ascends (``sortby("y")``, a bottom-up raster) was drawn upside down."""
    if isinstance(max_size, (bool, np.bool_)) or not isinstance(max_size, (int, np.integer)) or max_size < 1:
        raise InputError(f"max_size= must be a whole number of px >= 1 (the picture's longer side), got {max_size!r}")
    step = max(1, -(-max(obj.sizes["y"], obj.sizes["x"]) // max_size))

    def direction(dim: str, ascending: bool) -> int:
        values = obj[dim].values if dim in obj.coords else np.zeros(0)
        return -1 if values.size > 1 and (values[1] > values[0]) == ascending else 1

    return obj.isel(y=slice(None, None, direction("y", True) * step), x=slice(None, None, direction("x", False) * step))


def stretch(bands: np.ndarray, valid: np.ndarray | None = None, percentiles: tuple[float, float] = (2, 98)) -> np.ndarray:
    """(C, H, W) -> (H, W, C) floats in [0, 1], each band stretched between percentiles of its valid pixels."""
    out = np.zeros(bands.shape[1:] + bands.shape[:1], np.float32)
    for i, band in enumerate(bands.astype(np.float64)):
        ok = np.isfinite(band) & (valid if valid is not None else True)
        if not ok.any():
            continue
        low, high = np.percentile(band[ok], percentiles)
        out[..., i] = np.clip((band - low) / (high - low if high > low else 1.0), 0, 1)
    return np.nan_to_num(out)


def _default_bands(names: Sequence[str]) -> list[int]:
    """Red, green, blue by name (red/green/blue, B4/B3/B2, or wavelengths like "655nm"), else the first three."""
    lower = [str(n).lower() for n in names]
    for rgb in _RGB_NAMES:
        if all(c in lower for c in rgb):
            return [lower.index(c) for c in rgb]
    wavelengths = [re.fullmatch(r"(\d+(?:\.\d+)?)\s*nm", n) for n in lower]
    if len(names) >= 3 and all(wavelengths):
        nm = np.array([float(w[1]) for w in wavelengths])
        return [int(np.abs(nm - target).argmin()) for target in (640.0, 550.0, 470.0)]
    return list(range(min(3, len(names))))


def _composite(var: xr.DataArray, bands: Sequence[int | str] | None, valid: np.ndarray) -> tuple[np.ndarray, str]:
    dim = var.dims[0]
    names = [str(n) for n in var[dim].values] if dim in var.coords else [str(i) for i in range(var.shape[0])]
    chosen = _default_bands(names) if bands is None else [_band_index(b, names, var.name) for b in ([bands] if isinstance(bands, str) else bands)]
    if not 1 <= len(chosen) <= 3:
        raise InputError(f"bands= must name 1 to 3 bands of {var.name}, got {len(chosen)}: red, green, blue (or two, or one drawn grey)")
    data = var.isel({dim: chosen}).values.astype(np.float32)
    if len(chosen) == 2:  # e.g. SAR VV, VH: show the difference as the third channel
        data = np.stack([data[0], data[1], data[0] - data[1]])
    rgb = stretch(data, valid)
    if len(chosen) == 1:
        rgb = np.repeat(rgb, 3, axis=-1)
    rgb[~valid] = 0.0
    return rgb, ", ".join(names[i] for i in chosen)


def _band_index(band, names: Sequence[str], modality) -> int:
    """Index of ``band`` (a name, or an index counted from 0, negative from the end) among ``names``."""
    if isinstance(band, str) and band in names:
        return names.index(band)
    if isinstance(band, (int, np.integer)) and not isinstance(band, (bool, np.bool_)) and -len(names) <= band < len(names):
        return int(band) % len(names)
    raise InputError(f"bands= names band {band!r}, which {modality} does not have (it has {', '.join(names)}): pass names or indices from 0")


def _draw_labels(ax, labels: np.ndarray, class_names: Sequence[str]) -> None:
    from matplotlib.patches import Patch

    ids = labels[labels != IGNORE]
    n = max(len(class_names), int(ids.max()) + 1 if ids.size else 0)
    table = np.zeros((256, 4), np.float32)  # ignore (255) and unknown ids stay transparent
    table[:n, :3] = np.asarray(class_colors(n), np.float32) / 255
    table[:n, 3] = 1.0
    ax.imshow(table[labels.astype(np.uint8)], interpolation="nearest")
    present = set(np.unique(labels).tolist())
    handles = [
        Patch(color=table[i, :3], label=class_names[i] if i < len(class_names) else f"class_{i}")
        for i in range(n)
        if i in present
    ]
    if handles:
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)


def save_figure(fig, path: str | os.PathLike, *, inputs=(), overwrite: bool = True) -> Path:
    """Save a matplotlib figure as PNG through the guarded writer (:func:`tilefuse.outputs.create`).

    The PNG carries tilefuse's marker, so a later quicklook may replace it
    (``overwrite``, the default); any other file or folder at ``path``, or a
    ``path`` at, inside or around one of ``inputs``, is refused.
    """
    from tilefuse.outputs import local_path

    path = local_path(path, "quicklook", output=True, file=True)  # a URL or a folder's path (q/) is refused, ~ is the home folder
    with create(path, "png", inputs=inputs, overwrite=overwrite, what="quicklook") as tmp:
        if path.suffix and path.suffix.lower() != ".png":  # PNG bytes under a .jpg name: viewers refuse or misread it
            raise InputError(f"quicklook {path} would be a PNG named {path.suffix}: name it {path.with_suffix('.png').name}")
        fig.savefig(tmp, dpi=100, bbox_inches="tight", format="png", metadata=png_metadata())
    return path


def _figure(panels: int, shape: tuple[int, int]):
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    height, width = shape
    scale = 6.0 / max(height, width)
    return Figure(figsize=(panels * (width * scale + 1.6), height * scale + 0.6))


def quicklook_labels(
    labels: xr.DataArray,
    class_names: Sequence[str] | None,
    path: str | os.PathLike,
    *,
    title: str | None = None,
    max_size: int = MAX_SIZE,
    inputs=(),
) -> Path:
    """PNG of a label or prediction map (y, x; 255 = none) with a class legend (``inputs``: see :func:`save_figure`).

    ``class_names`` None: the map's own (its ``class_names`` attr).
    """
    if not isinstance(labels, xr.DataArray) or set(labels.dims) != {"y", "x"}:
        got = f"one of dims {labels.dims}" if isinstance(labels, xr.DataArray) else type(labels).__name__
        raise InputError(f"labels= must be a (y, x) xarray DataArray, got {got}: pass e.g. open_prediction(path)['labels']")
    if class_names is None:
        class_names = labels.attrs.get("class_names") or []
    small = decimate(labels, max_size).values
    fig = _figure(1, small.shape)
    ax = fig.add_subplot(1, 1, 1)
    _draw_labels(ax, small, class_names)
    ax.set_axis_off()
    ax.set_title(title or "labels", fontsize=10)
    return save_figure(fig, path, inputs=inputs)


def quicklook_scene(
    scene: xr.Dataset | str | os.PathLike,
    path: str | os.PathLike,
    *,
    modality: str | None = None,
    bands: Sequence[int | str] | None = None,
    max_size: int = MAX_SIZE,
    inputs=(),
) -> Path:
    """PNG of a scene: a percentile-stretched composite of ``bands`` of ``modality``, and the label map if any.

    ``scene`` is a Dataset or a store path. Defaults: the first modality with
    three bands or more (else the first), its red/green/blue bands where named
    so, else its first three (two bands: b1, b2, b1-b2; one band: grey).
    ``inputs`` (the store a Dataset came from; a store path counts itself)
    are never at, inside or around ``path``.
    """
    if not isinstance(scene, xr.Dataset):
        inputs = [*inputs, scene]
    ds = scene if isinstance(scene, xr.Dataset) else open_scene(scene)
    names = modalities(ds)
    if not names:  # a prediction, say
        raise InputError("scene= has no modality to draw (no (band, y, x) array): for a label or prediction map use quicklook_labels")
    if modality is None:
        modality = next((n for n in names if ds[n].sizes[band_dim(n)] >= 3), names[0])
    elif modality not in names:
        raise InputError(f"modality={modality!r} is not a modality of the scene (it has {', '.join(names)})")
    small = decimate(ds[[modality, "valid", *(["label"] if "label" in ds else [])]], max_size).compute()
    valid = small["valid"].values.astype(bool)
    rgb, shown = _composite(small[modality], bands, valid)
    has_labels = "label" in small
    fig = _figure(2 if has_labels else 1, valid.shape)
    ax = fig.add_subplot(1, 2 if has_labels else 1, 1)
    ax.imshow(rgb, interpolation="nearest")
    ax.set_axis_off()
    ax.set_title(f"{modality} ({shown})", fontsize=10)
    if has_labels:
        ax = fig.add_subplot(1, 2, 2)
        _draw_labels(ax, small["label"].values, small["label"].attrs.get("class_names", []))
        ax.set_axis_off()
        ax.set_title("label", fontsize=10)
    return save_figure(fig, path, inputs=inputs)
