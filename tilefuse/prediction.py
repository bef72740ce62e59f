"""Prediction stores: the zarr v3 layout ``tilefuse predict`` writes and everything downstream reads.

A prediction store has the grid, CRS and ``spatial_ref`` of its scene and holds

- ``labels (y, x) uint8``: the predicted class, 255 (:data:`tilefuse.scene.IGNORE`)
  where the scene has no valid data; ``class_names`` in its attrs;
- optionally ``probs (class, y, x)``: class probabilities, uint8-quantised
  (``round(255 p)``), float16 or float32;
- ``block_done (block_y, block_x) uint8``: the completion manifest, 1 for every
  output block whose region has been written (one tiny chunk per block, so
  blocks mark themselves done without racing each other);
- attrs: ``tilefuse_store = "prediction"``, the model name, checkpoint hash,
  tile/overlap/blend/block settings, software version, and ``complete``, set
  last, once every block is done.

The store is created empty (labels read as 255) under a temporary name and
renamed into place; blocks are then written in place, each as whole chunks or
shards (one key per block, fill-valued chunks included, crc32c-checksummed:
:mod:`tilefuse.storage`), and marked done after their data. A reader can
therefore always tell a complete store from a partial one, and a missing or
damaged chunk of a done block is an error, never nodata; ``--resume``
recomputes the blocks not marked done and those whose data is damaged.
Consolidated metadata is rewritten whenever the attrs change.
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import xarray as xr
import zarr

from tilefuse.classes import class_names_problem
from tilefuse.errors import InputError
from tilefuse.grid import Block, TileGrid
from tilefuse import storage
from tilefuse.scene import CHUNK, IGNORE, REPAIR, STORE_KIND, open_store, repair

MANIFEST = "block_done"
PROBS_DTYPES = ("uint8", "float16", "float32")
SETTINGS = ("model", "checkpoint_hash", "tile", "overlap", "margin", "blend", "block_size", "probs", "height", "width")
"""Attrs that must match for ``--resume`` to continue a store."""
RESUME_WITH = {
    "model": "the checkpoint it was made with (checkpoint=, --checkpoint)",
    "checkpoint_hash": "the checkpoint it was made with (checkpoint=, --checkpoint)",
    "margin": "the checkpoint it was made with (checkpoint=, --checkpoint)",
    "tile": "tile={0} (--tile {0})",
    "overlap": "overlap={0} (--overlap {0})",
    "blend": "blend={0!r} (--blend {0})",
    "block_size": "block_size={0} (--block-size {0})",
    "height": "the scene store it was made from (store=, --store)",
    "width": "the scene store it was made from (store=, --store)",
    "probs": "probs={0!r} (--probs --probs-dtype {0})",
    "no probs": "probs=False (no --probs)",
}
"""How a resume matches each of :data:`SETTINGS`."""
DETERMINISM = {
    "device_kind": "workers with {} devices (--cluster/--device)",
    "torch_threads": "torch_threads={} (--torch-threads {})",
    "precision": "precision={!r} (--precision {})",
    "channels_last": "channels_last={} (--channels-last or not)",
    "compile": "compile={} (--compile or not)",
    "batch_size": "batch_size={} (--batch-size {})",
}
"""What bitwise-identical output depends on beyond :data:`SETTINGS`, and how a resume matches it: the
device kind of the workers (``cpu``, ``cuda:<GPU name>``), torch's threads per worker (CPU kernels split
their sums by it), the precision, the model's memory layout and compilation, and the batch size (kernels
pick their algorithms by them; not recorded for a ``batch_invariant`` model). Recorded at creation; a
resume that would mix blocks computed otherwise is refused (stores made before a key was recorded are
not checked for it), and one that does not name a batch size takes the recorded one."""


def store_chunk(block: int) -> int:
    """Spatial chunk edge of a prediction store written in blocks of ``block`` px.

    :data:`tilefuse.scene.CHUNK` when it divides the block (blocks are then whole
    shards), else the block itself, so every block write covers whole chunks.
    """
    return CHUNK if block % CHUNK == 0 else block


OUTPUT_ZSTD_LEVEL = 1
"""zstd level of ``labels`` and ``probs`` (each block encodes its own once, on the engine's path): level 5,
the scene stores' level, took 8x the CPU time for no smaller output (one 2048^2 px block of noisy labels:
156 vs 20 ms, 1.71 vs 1.56 MB; of smooth labels 126 vs 100 KB)."""


def _encoding(shape: tuple[int, ...], block: int, fill: Any) -> dict:
    chunk = store_chunk(block)
    spatial = shape[-2:]
    lead = (1,) * (len(shape) - 2)
    enc: dict = {"chunks": (*lead, chunk, chunk), "compressors": storage.compressors(OUTPUT_ZSTD_LEVEL), "fill_value": fill}
    if block > chunk:
        edges = tuple(min(block, -(-n // chunk) * chunk) for n in spatial)
        enc["shards"] = (*shape[:-2], *edges)
    return enc


def create_prediction(
    path: str | os.PathLike,
    scene: xr.Dataset,
    grid: TileGrid,
    *,
    class_names: list[str],
    attrs: dict[str, Any],
    probs: str | None = None,
    overwrite: bool = False,
    inputs=(),
) -> Path:
    """Create an empty prediction store for ``scene`` (labels all 255), atomically.

    ``attrs`` must hold every key of :data:`SETTINGS` but the grid ones, which
    come from ``grid``. ``class_names`` that no reader would accept (one name for
    two ids: a checkpoint trained on stores that named one class by two ids) are
    refused before anything is made. An existing ``path`` is replaced only with ``overwrite``
    and only if it is a prediction store (:func:`tilefuse.outputs.create`,
    locked while created; ``inputs`` are never at, inside or around ``path``).
    """
    from tilefuse.outputs import claim, create

    path = Path(path)
    problem = class_names_problem(list(class_names))
    if problem:  # before anything is made: such a store would be refused as corrupt by every reader, predict's own too
        raise InputError(_bad_checkpoint_names(attrs.get("checkpoint"), problem))
    if os.path.lexists(path) and not overwrite and _store_kind(path) == "prediction":
        raise InputError(f"{path} already exists: pass overwrite=True (--overwrite) to replace it or resume=True (--resume) to finish it")
    claim(path, "prediction", inputs=inputs, overwrite=overwrite)
    if probs is not None and probs not in PROBS_DTYPES:
        raise InputError(f"probs dtype {probs!r} is not one of {', '.join(PROBS_DTYPES)}")
    height, width = grid.height, grid.width
    if (scene.sizes["y"], scene.sizes["x"]) != (height, width):
        raise ValueError("grid and scene sizes differ")
    num_classes = len(class_names)
    # in memory, so to_zarr(compute=False) writes them now: a verified store holds every coordinate chunk
    coords = {name: scene[name].load() for name in ("y", "x", "spatial_ref") if name in scene.coords}
    ds = xr.Dataset(coords=coords)
    # one dask chunk per array: to_zarr(compute=False) writes no data, and a graph of one task per block
    # would cost seconds to build (and be thrown away) at country scale
    ds["labels"] = (("y", "x"), da.full((height, width), IGNORE, dtype=np.uint8, chunks=-1))
    ds["labels"].attrs.update(class_names=list(class_names), nodata=IGNORE, grid_mapping="spatial_ref")
    encoding = {"labels": _encoding((height, width), grid.block, IGNORE)}
    if probs is not None:
        shape = (num_classes, height, width)
        ds["probs"] = (("class", "y", "x"), da.zeros(shape, dtype=probs, chunks=-1))
        ds["probs"].attrs.update(
            class_names=list(class_names),
            grid_mapping="spatial_ref",
            scale=1 / 255 if probs == "uint8" else 1.0,
            description="class probabilities" + (", quantised as round(255 p)" if probs == "uint8" else ""),
        )
        encoding["probs"] = _encoding(shape, grid.block, 0)
    block_rows, block_cols = grid.shape_in_blocks
    ds[MANIFEST] = (("block_y", "block_x"), da.zeros((block_rows, block_cols), dtype=np.uint8, chunks=-1))
    encoding[MANIFEST] = {"chunks": (1, 1), "fill_value": 0}
    from tilefuse import __version__

    ds.attrs.update(attrs)
    ds.attrs.update(
        {
            STORE_KIND: "prediction",
            storage.FORMAT_ATTR: storage.FORMAT,  # labels/probs chunks are written (checksummed) for done blocks
            "tilefuse_version": __version__,
            "tile": grid.tile,
            "overlap": grid.overlap,
            "margin": grid.margin,
            "block_size": grid.block,
            "height": height,
            "width": width,
            "probs": probs or "none",
            "class_names": list(class_names),
            "complete": False,
        }
    )
    missing = [key for key in SETTINGS if key not in ds.attrs]
    if missing:
        raise ValueError(f"prediction attrs lack {missing}")

    size = height * width // 64 + (num_classes * height * width // 64 if probs else 0)  # labels and probs compress well
    with create(path, "prediction", inputs=inputs, overwrite=overwrite, size=size, lock=True) as tmp:
        # compute=False writes metadata and coordinates only; unwritten chunks read as the fill value
        ds.to_zarr(
            tmp, mode="w-", zarr_format=3, encoding=storage.with_checksums(ds, encoding), compute=False, consolidated=False,
            write_empty_chunks=storage.WRITE_EMPTY_CHUNKS,
        )
        storage.consolidate(tmp)
    return path


def _bad_checkpoint_names(checkpoint: str | None, problem: str) -> str:
    """The refusal of a checkpoint whose class names would make a prediction store every reader calls corrupt."""
    return (
        f"checkpoint {checkpoint or '(unknown)'} cannot predict: its class names {problem}, which no prediction store may "
        "hold (every reader would call it corrupt); retrain it with consistent class names (re-ingest its stores with "
        "--label-map so that each name has one id)"
    )


def _store_kind(path: Path) -> str | None:
    try:
        return zarr.open_group(path, mode="r").attrs.get(STORE_KIND)
    except Exception:  # anything unreadable is "not a prediction store"
        return None


def prediction_attrs(path: str | os.PathLike) -> dict[str, Any]:
    """The attrs of a prediction store (settings, provenance, ``complete``)."""
    if _store_kind(Path(path)) != "prediction":
        raise InputError(f"{path} is not a prediction store: pass a store written by `tilefuse predict`")
    return zarr.open_group(path, mode="r").attrs.asdict()


SCENE_DIGEST = "scene_digest"
"""Attr identifying the scene a prediction was computed from (:func:`scene_digest`); a resume must read the same one."""


def check_resumable(path: str | os.PathLike, settings: dict[str, Any], scene: str | None = None) -> None:
    """Refuse to resume a store made by another checkpoint, from another scene or with other settings.

    The scene is compared by :data:`SCENE_DIGEST` where both the store and ``settings`` carry one (stores
    made before it was recorded are not checked for it); ``scene`` is the resolved path of the store the run
    reads, to tell a store replaced at the same path from another path.
    """
    found = prediction_attrs(path)
    names = found.get("class_names")
    problem = class_names_problem(names) if names is not None else None
    if problem:  # made by an earlier release from such a checkpoint: more blocks would not make it readable
        raise InputError(f"{path} cannot be resumed: {_bad_checkpoint_names(found.get('checkpoint'), problem)}")
    if SCENE_DIGEST in settings and SCENE_DIGEST in found and found[SCENE_DIGEST] != settings[SCENE_DIGEST]:
        if scene is not None and found.get("scene") == scene:
            raise InputError(
                f"{path} was computed from the scene store at {scene}, which was replaced since (another scene is there "
                "now): resume it with the scene it was computed from, or pass overwrite=True (--overwrite)"
            )
        raise InputError(
            f"{path} was computed from another scene ({found.get('scene', 'unknown')}) than this run reads: "
            "resume it with that scene store (store=, --store), or pass overwrite=True (--overwrite)"
        )
    for key, fix in DETERMINISM.items():
        if key in settings and key in found and found[key] != settings[key]:
            fix = fix.format(found[key], found[key])
            raise InputError(
                f"{path} was computed with {key}={found[key]!r} and this run would use {settings[key]!r}, "
                f"which mixes results that differ in the last bits: resume with {fix}, or pass overwrite=True (--overwrite)"
            )
    for key in SETTINGS:
        if key in settings and found.get(key) != settings[key]:
            fix = RESUME_WITH[key] if key != "probs" else RESUME_WITH["probs" if found.get(key) != "none" else "no probs"]
            fix = fix.format(found.get(key))
            raise InputError(f"{path} was made with {key}={found.get(key)!r}, not {settings[key]!r}: resume with {fix}, or pass overwrite=True (--overwrite)")


OUTPUTS = ("labels", "probs")
"""The arrays written block by block (one key per block: see :func:`store_chunk`)."""
CHECK_THREADS = 8
"""Threads that read done blocks' keys to check them on a resume (:func:`damaged_blocks`); memory: one key each."""


def _written(done: np.ndarray) -> dict[str, list[tuple[int, int]]]:
    """What a prediction with manifest ``done`` promises: the keys of done blocks (the manifest's own keys are optional)."""
    blocks = [tuple(int(i) for i in ij) for ij in np.argwhere(done)]
    return {"labels": blocks, "probs": blocks, MANIFEST: []}


def _stored_markers(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(rows, cols) of the manifest keys present in the store: blocks never marked have none (fill 0)."""
    rows, cols = [], []
    top = path / MANIFEST / "c"
    with os.scandir(top) if top.is_dir() else contextlib.nullcontext(()) as row_dirs:
        for row_dir in row_dirs:
            if row_dir.name.isdigit() and row_dir.is_dir():
                with os.scandir(row_dir.path) as entries:
                    found = [int(entry.name) for entry in entries if entry.name.isdigit()]
                rows += [int(row_dir.name)] * len(found)
                cols += found
    return np.asarray(rows, np.intp), np.asarray(cols, np.intp)


def done_blocks(path: str | os.PathLike) -> np.ndarray:
    """The completion manifest: a (block rows, block cols) bool array, True where a block is marked written.

    Only the markers present are read (a directory listing finds them), so
    this costs one small read per written block, not one per block of the scene.
    """
    path = Path(path)
    manifest = storage.open_group(path, written={MANIFEST: []}, fix=REPAIR["prediction"])[MANIFEST]
    done = np.zeros(manifest.shape, bool)
    rows, cols = _stored_markers(path)
    inside = (rows < done.shape[0]) & (cols < done.shape[1])
    rows, cols = rows[inside], cols[inside]
    if rows.size:
        done[rows, cols] = manifest.get_coordinate_selection((rows, cols)).astype(bool)
    return done


def _block_keys(check: storage.ArrayCheck, row: int, col: int) -> list[tuple[int, ...]]:
    """Key indices of block (row, col) in an output array (one key per block and class chunk)."""
    lead = np.ndindex(*(-(-n // u) for n, u in zip(check.shape[:-2], check.unit[:-2])))
    return [(*index, int(row), int(col)) for index in lead]


def damaged_blocks(path: str | os.PathLike, done: np.ndarray | None = None) -> list[tuple[int, int]]:
    """Blocks marked done whose ``labels``/``probs`` keys are missing, truncated or fail their checksum.

    Reads each done block's stored bytes once, without decoding. Stores written
    before checksummed storage (no :data:`tilefuse.storage.FORMAT_ATTR`) report none.
    """
    path = Path(path)
    done = done_blocks(path) if done is None else done
    group = zarr.open_group(path, mode="r")
    if group.attrs.get(storage.FORMAT_ATTR) != storage.FORMAT:
        return []
    checks = [check for name, check in storage.checks_for(group, _written(done)).items() if name in OUTPUTS]
    # the record of the store's last completion, if any: a block rewritten since is bitwise the same (determinism)
    recorded = {}
    if group.attrs.get(storage.DIGESTS_ATTR) == storage.DIGESTS:
        recorded = storage.read_digests(path, storage.checks_for(group), repair("prediction", storage.DIGESTS))

    def is_damaged(block) -> bool:
        row, col = block
        keys = [(check, index) for check in checks for index in _block_keys(check, row, col)]
        expected = [recorded[check.name][index] if check.name in recorded else None for check, index in keys]
        try:  # what the block's write recorded, also before the store was complete
            own = np.load(_block_digests_file(path, row, col), allow_pickle=False)
        except FileNotFoundError:  # written by an earlier release
            own = None
        except (OSError, ValueError, EOFError):
            return True
        if own is not None:
            sizes = [max(check.inner, 1) for check, _ in keys]
            if own.dtype != np.uint32 or own.shape != (sum(sizes),):
                return True
            expected = np.split(own, np.cumsum(sizes)[:-1])
        return any(storage.key_problem(path, check, index, wanted) for (check, index), wanted in zip(keys, expected))

    blocks = [(int(row), int(col)) for row, col in np.argwhere(done)]
    # reading is the cost (a resume reads every done block's bytes once): a few threads overlap it
    with ThreadPoolExecutor(min(CHECK_THREADS, max(1, len(blocks)))) as pool:
        return [block for block, bad in zip(blocks, pool.map(is_damaged, blocks)) if bad]


def _damaged_markers(path: Path) -> list[tuple[int, int]]:
    """Blocks whose manifest key is present but missing its checksum or truncated: whether they were written is unknown."""
    group = zarr.open_group(path, mode="r")
    if group.attrs.get(storage.FORMAT_ATTR) != storage.FORMAT:
        return []
    check = storage.checks_for(group, {MANIFEST: []})[MANIFEST]
    rows, cols = _stored_markers(path)
    return [(int(r), int(c)) for r, c in zip(rows, cols) if storage.key_problem(path, check, (int(r), int(c)))]


def _unmark(path: Path, blocks: list[tuple[int, int]]) -> None:
    """Mark ``blocks`` not done (and the store incomplete), removing their keys: the store never claims a block it does not hold."""
    group = zarr.open_group(path, mode="r+")
    checks = storage.checks_for(group)
    for row, col in blocks:
        group[MANIFEST][row, col] = 0
        for name in OUTPUTS:  # the block's keys go: a rewrite must not read (merge into) damaged bytes
            for index in _block_keys(checks[name], row, col) if name in checks else []:
                Path(path, storage.chunk_key(name, index)).unlink(missing_ok=True)
    group.attrs["complete"] = False
    storage.consolidate(path)


def pending_blocks(path: str | os.PathLike, grid: TileGrid) -> list[Block]:
    """Blocks to (re)compute, in row-major order: those not marked done, and done ones whose data is damaged.

    A damaged block is first unmarked and its keys removed (and the store
    marked incomplete), so the store never claims a block it does not hold;
    so is a block whose manifest key itself is damaged (readers refuse such a
    store, and ``--resume`` is what their message names).
    """
    path = Path(path)
    unreadable = _damaged_markers(path)
    if unreadable:
        _unmark(path, unreadable)
    done = done_blocks(path)
    damaged = damaged_blocks(path, done)
    if damaged:
        _unmark(path, damaged)
        for row, col in damaged:
            done[row, col] = False
    return [block for block in grid.blocks() if not done[block]]


BLOCK_DIGESTS = "digests"
"""Folder inside the manifest array holding, per done block, the crc32c its chunks end with (``ROW.COL.npy``)."""


def _block_digests_file(path: str | os.PathLike, row: int, col: int) -> Path:
    return Path(path, MANIFEST, BLOCK_DIGESTS, f"{int(row)}.{int(col)}.npy")


def _block_digests(path: str | os.PathLike, checks: list[storage.ArrayCheck], row: int, col: int) -> np.ndarray:
    """The crc32c each chunk of block (row, col) ends with, array by array and key by key (:func:`_block_keys`)."""
    return np.concatenate([storage.stored_digests(path, check, index) for check in checks for index in _block_keys(check, row, col)])


def write_block(
    path: str | os.PathLike,
    region: tuple[slice, slice],
    block: Block,
    labels: np.ndarray,
    probs: np.ndarray | None = None,
) -> None:
    """Write one block's labels (and probs) as whole chunks (fill-valued ones too), record where its chunks
    belong (:data:`BLOCK_DIGESTS`: a resume recomputes a done block whose chunks were moved before the store was
    complete and recorded whole), then mark the block done."""
    import io

    from tilefuse.outputs import write_file

    with storage.writing():  # arrays opened here write chunks equal to the fill value too
        group = zarr.open_group(path, mode="r+")
        labels_array, manifest = group["labels"], group[MANIFEST]
        probs_array = group["probs"] if probs is not None else None
    labels_array[region] = labels
    if probs_array is not None:
        probs_array[(slice(None), *region)] = probs
    checks = [check for name, check in storage.checks_for(group).items() if name in OUTPUTS]
    buffer = io.BytesIO()
    np.save(buffer, _block_digests(path, checks, block.row, block.col))
    _block_digests_file(path, block.row, block.col).parent.mkdir(exist_ok=True)
    write_file(_block_digests_file(path, block.row, block.col), buffer.getvalue())
    manifest[block.row, block.col] = 1


def mark_complete(path: str | os.PathLike) -> None:
    """Set ``complete`` once every block is marked done (the last write of a run), and consolidate the metadata."""
    if not done_blocks(path).all():
        raise RuntimeError(f"{path}: not every block is done")
    storage.record_digests(path, functools.partial(repair, "prediction"))  # before ``complete``: readers use the record of a complete store only
    zarr.open_group(path, mode="r+").attrs["complete"] = True
    storage.consolidate(path)


def open_prediction(path: str | os.PathLike, allow_partial: bool = False) -> xr.Dataset:
    """Open a prediction store lazily as an xarray Dataset with CRS.

    A partial store (a run that stopped before every block was written) is
    refused unless ``allow_partial``, which only warns; unwritten blocks read as 255.
    Reads are verified: a missing or damaged chunk of a written block raises InputError.
    ``path`` may be a Dataset this returned (:func:`store_path`).
    """
    path = store_path(path, "path", "prediction")
    from tilefuse.outputs import live_writer

    ds = open_store(path, "prediction")  # a complete store promises every chunk
    for name in OUTPUTS:  # what evaluate, export and quicklooks name the classes by: damaged is never used
        problem = class_names_problem(ds[name].attrs["class_names"]) if name in ds and "class_names" in ds[name].attrs else None
        if problem:
            raise InputError(f"{path}: the class_names of its array {name!r} {problem}: the store is corrupt, recompute it with `tilefuse predict ... --overwrite`")
    writer = None
    if not ds.attrs.get("complete", False):
        writer = live_writer(path)
        if writer is None:  # its writer may have completed it and let go of its lock since the open: look again
            ds = open_store(path, "prediction")
    if not ds.attrs.get("complete", False):
        done = done_blocks(path)
        message = (
            f"{path} is a partial prediction ({int(done.sum())} of {done.size} blocks written): "
            + (f"{writer} is writing it, wait for it to finish" if writer else "finish it with `tilefuse predict ... --resume` (Python: tilefuse.predict(..., resume=True))")
        )
        if not allow_partial:
            raise InputError(message)
        warnings.warn(message, stacklevel=2)
        ds = open_store(path, "prediction", written=_written(done))  # only done blocks are promised
    identity = ds.encoding.get("identity")
    ds = ds.drop_vars(MANIFEST)
    names = ds["probs"].attrs.get("class_names") if "probs" in ds else None
    if isinstance(names, list) and len(names) == ds.sizes.get("class"):  # probs.sel({"class": "water"})
        ds = ds.assign_coords({"class": names})
    ds.encoding["source"] = os.path.abspath(path)  # what :func:`store_path` takes it back to, also after a chdir
    ds.encoding["opened_by"] = "tilefuse"  # (drop_vars keeps no encoding)
    ds.encoding["identity"] = identity
    return ds


def store_path(value: Any, param: str, kind: str) -> Any:
    """A store given to the Python API as a path (``~`` expanded) or as the xarray Dataset tilefuse opened it as.

    ``tilefuse.predict``, ``open_prediction`` and ``open_scene`` (each records its store in ``encoding["source"]``)
    return lazy Datasets a notebook passes on: such a Dataset, unchanged (the same variables and sizes, each still
    the lazy array read from its store), stands for its store of ``kind`` (``scene`` or ``prediction``). Anything
    else (a Dataset built, computed or sliced in memory, another object) is one InputError naming ``param``: it
    was a TypeError traceback, and reading the store behind a changed Dataset would not be what was passed.
    """
    from tilefuse.outputs import local_path

    if isinstance(value, (str, os.PathLike)):
        return local_path(value, param)  # ~ is the home folder, a URL one line
    source = value.encoding.get("source") if isinstance(value, xr.Dataset) else None
    found = value.attrs.get(STORE_KIND) if source is not None else None
    if found in ("scene", "prediction") and found != kind:  # its store would be refused as the wrong kind
        raise InputError(f"{param}= is the {found} store {source} (opened with open_{found}), not a {kind} store: pass a {kind} store")
    if source is not None and os.path.isdir(source):
        from tilefuse.scene import open_scene
        from tilefuse.storage import store_identity

        opened = value.encoding.get("identity")
        if opened is not None and value.encoding.get("opened_by") == "tilefuse" and tuple(opened) != store_identity(source):
            raise InputError(
                f"{param}= is a Dataset opened from {source}, which was replaced since (another run rewrote it): "
                f"open it again (tilefuse.open_{kind}) and pass that"
            )

        try:
            with warnings.catch_warnings():  # a partial prediction: its reader says so
                warnings.simplefilter("ignore")
                fresh = open_prediction(source, allow_partial=True) if kind == "prediction" else open_scene(source)
        except (InputError, OSError):
            fresh = None
        if fresh is not None and _unchanged(value, fresh):
            return source
        if value.encoding.get("opened_by") != "tilefuse":
            raise InputError(
                f"{param}= is an xarray Dataset opened from {source} by plain xarray, whose reads are not verified: "
                f"pass that store's path, or the Dataset tilefuse.open_{kind} returns"
            )
        raise InputError(f"{param}= is an xarray Dataset changed since it was opened from {source}: pass that store's path{_WRITE[kind]}")
    what = f"an xarray {type(value).__name__}" if isinstance(value, (xr.Dataset, xr.DataArray)) else f"of type {type(value).__name__}"
    raise InputError(f"{param}= is {what}, not a path: pass the path of the {kind} store (str or pathlib.Path){_WRITE[kind]}")


def _unchanged(value: xr.Dataset, fresh: xr.Dataset) -> bool:
    """Whether ``value`` is still the Dataset its store opens as: the same variables and sizes, each data variable
    still the lazy array read from the store (its dask name), and the same coordinates and attrs (a shifted ``x``,
    a CRS written over ``spatial_ref``, renamed bands or class names were taken for the store's own, which the
    run then read). Nothing is read or computed."""
    if dict(fresh.sizes) != dict(value.sizes) or set(fresh.variables) != set(value.variables):
        return False
    if any(getattr(value[name].data, "name", None) != getattr(fresh[name].data, "name", 0) for name in fresh.data_vars):
        return False
    if not _same_attrs(value.attrs, fresh.attrs) or any(not _same_attrs(value[n].attrs, fresh[n].attrs) for n in fresh.variables):
        return False
    return all(value[name].variable.equals(fresh[name].variable) for name in fresh.coords)  # in memory: indexes, bands, CRS


def _same_attrs(a: dict, b: dict) -> bool:
    """``a == b`` for attrs that may hold numpy arrays (xarray's own comparison, on empty variables)."""
    return xr.Variable((), 0, attrs=a).identical(xr.Variable((), 0, attrs=b))


_WRITE = {"scene": " (data in memory: write it as a scene store with tilefuse.from_xarray first)", "prediction": ""}
