"""``tilefuse info STORE``: what a scene store holds, in a few lines (and a quicklook PNG)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from tilefuse.errors import printable

if TYPE_CHECKING:
    import xarray as xr


def _fmt(values, digits: int = 4) -> str:
    return "[" + ", ".join(f"{v:.{digits}g}" for v in values) + "]"


def label_counts(ds) -> list[int]:
    """Pixels per class id 0..n-1: from the store's attrs, or counted in one lazy pass for older stores."""
    import dask.array as da
    import numpy as np

    from tilefuse.scene import IGNORE, count_labels

    attrs = ds["label"].attrs
    if "class_counts" in attrs:
        return [int(c) for c in attrs["class_counts"]]
    data = ds["label"].data
    counts = np.asarray(count_labels(data if isinstance(data, da.Array) else da.from_array(data)).compute())
    present = np.flatnonzero(counts[:IGNORE])
    n = max(len(attrs.get("class_names", [])), int(present[-1]) + 1 if present.size else 0)
    return counts[:n].tolist()


def describe(ds) -> str:
    """A human-readable summary of a scene Dataset: grid, modalities with band stats, valid, labels, storage."""
    from tilefuse.scene import IGNORE, band_dim, modalities, stored_band_stats

    height, width = ds.sizes["y"], ds.sizes["x"]
    crs = ds.rio.crs
    res_x, res_y = ds.rio.resolution()
    lines = [
        f"size       {height} x {width} px (y, x)",
        f"crs        {crs.to_string() if crs is not None else 'none'}",
        f"transform  {tuple(round(v, 9) for v in ds.rio.transform()[:6])}",
        f"resolution {abs(res_x):g} x {abs(res_y):g}",
        f"bounds     {tuple(round(v, 6) for v in ds.rio.bounds())}",
    ]
    for name in modalities(ds):
        var = ds[name]
        dim = band_dim(name)
        bands = [str(b) for b in var[dim].values] if dim in var.coords else []
        shown = ", ".join(bands[:8]) + (f", ... ({len(bands)} bands)" if len(bands) > 8 else "")
        lines.append(f"modality   {name}: {var.sizes[dim]} bands, {var.dtype} [{shown}]")
        stats = stored_band_stats(ds, name)  # damaged statistics raise InputError
        if stats is not None:
            n = min(8, len(stats[0]))
            more = " ..." if len(stats[0]) > n else ""
            lines.append(f"             mean {_fmt(stats[0][:n])}{more}")
            lines.append(f"             std  {_fmt(stats[1][:n])}{more}")
        lines.append(f"             storage {_storage(var)}")
    counts = ds[modalities(ds)[0]].attrs.get("band_count") if modalities(ds) else None
    if counts:
        lines.append(f"valid      {counts[0] / (height * width):.2%} of pixels")
    else:
        lines.append(f"valid      {float(ds['valid'].mean().compute()):.2%} of pixels")
    if "label" in ds:
        names = list(ds["label"].attrs.get("class_names", []))
        per_class = label_counts(ds)
        lines.append(f"label      {len(per_class)} classes, {sum(per_class)} labelled px")
        for i, count in enumerate(per_class):
            name = names[i] if i < len(names) else f"class_{i}"
            lines.append(f"             {i:3d} {name:<16} {count:>12d} px ({count / (height * width):.1%})")
        if "ignore_count" in ds["label"].attrs:
            lines.append(f"             {IGNORE} (ignore)         {ds['label'].attrs['ignore_count']:>12d} px")
    return "\n".join(lines)


def _storage(var) -> str:
    enc = var.encoding
    chunks = enc.get("chunks") or enc.get("preferred_chunks")
    shards = enc.get("shards")
    codecs = [type(c).__name__ for c in enc.get("compressors", ()) or ()]
    parts = [f"chunks {tuple(chunks) if chunks else 'none'}"]
    if shards:
        parts.append(f"shards {tuple(shards)}")
    if codecs:
        parts.append("+".join(codecs))
    return ", ".join(parts)


def info(store: "str | Path | xr.Dataset", quicklook: str | Path | None = None, verify: bool = True) -> str:
    """Summary of the scene store ``store`` (see :func:`describe`); also a quicklook PNG if asked.

    ``store`` is a path or the Dataset :func:`tilefuse.open_scene` returned for it (it stands for its store,
    :func:`tilefuse.prediction.store_path`).

    ``verify`` first checks every chunk of the store (present, whole, crc32c;
    :func:`tilefuse.storage.verify_store`, reading its bytes once without
    decoding): a damaged store is an InputError naming the array and chunk.

    The quicklook replaces only a quicklook PNG tilefuse wrote (:mod:`tilefuse.outputs`).
    """
    from tilefuse.outputs import local_path
    from tilefuse.prediction import store_path
    from tilefuse.scene import open_scene

    store = store_path(store, "store", "scene")  # a URL is refused, ~ is the home folder; an opened scene is its store
    quicklook = None if quicklook is None else local_path(quicklook, "quicklook", output=True, file=True)
    if quicklook is not None:  # checked before any work (never at, inside or around the store)
        from tilefuse.outputs import claim

        claim(quicklook, "png", inputs=[store], overwrite=True, what="quicklook")
    ds = open_scene(store)
    text = describe(ds)
    if verify:
        from tilefuse.storage import FORMAT, FORMAT_ATTR, verify_store

        if ds.attrs.get(FORMAT_ATTR) == FORMAT:
            text += f"\nintegrity  {verify_store(store)} chunks verified"
        else:  # nothing promised: a missing chunk reads as fill values, and no chunk carries a checksum
            text += "\nintegrity  not verifiable: written without tilefuse's checksums (an earlier release); ingest it again to check it"
    if quicklook is not None:
        from tilefuse.quicklook import quicklook_scene

        quicklook_scene(ds, quicklook, inputs=[store])
    return text


def info_command(
    store: Annotated[Path, typer.Argument(help="Scene store (zarr) to describe.")],
    quicklook: Annotated[Optional[str], typer.Option(help="Also write a quicklook PNG (composite + label map) here.", show_default=False)] = None,
    verify: Annotated[bool, typer.Option("--verify/--no-verify", help="Check every chunk (presence, size, crc32c) before describing.")] = True,
) -> None:
    """Print a scene store's grid, CRS, modalities with band statistics, valid fraction and label classes."""
    typer.echo(info(store, quicklook, verify))
    if quicklook is not None:
        typer.echo(printable(f"quicklook  {quicklook}"))
