"""Block execution: one output block from scene store to prediction store, no cluster knowledge.

A block is computed in two steps, each a plain function a scheduler can run
anywhere:

1. :func:`compute_block` reads the block's input window (its tiles plus the
   model margin, reflected at scene edges) from the scene store, normalises it
   with the band statistics, skips tiles with no valid pixel, runs the rest
   through the model in fixed-shape batches, and sums their weighted class
   probabilities over the block's own region and the strips its tiles spill
   into the right, lower and lower-right neighbours (:class:`BlockSums`; the
   strips travel compressed, :class:`Strip`).
2. :func:`finish_block` adds the block's own sums and the strips spilled into
   it by its upper, left and upper-left neighbours, normalises, masks with
   ``valid``, and writes ``labels`` (and ``probs``) as one aligned region.

Sums are kept in 64-bit fixed point (units of 2^-40): integer addition is
exact and associative, so the result does not depend on how tiles are grouped
into blocks, batches or workers, nor on the order blocks finish. Every model
call sees the same input shape and memory layout (partial batches are padded,
inputs are C-contiguous), because kernels such as oneDNN's pick their
algorithm by shape and layout and would otherwise round a tile's output
differently depending on its batch or block.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Mapping, NamedTuple

import numpy as np
import torch
import zarr
from numcodecs import Blosc

from tilefuse import storage
from tilefuse.blending import tile_weights
from tilefuse.errors import InputError
from tilefuse.grid import Block, InputWindow, TileGrid
from tilefuse.prediction import write_block
from tilefuse.scene import IGNORE, normalise
from tilefuse.tile_model import TileModel

FIXED_POINT = 2.0**40
"""Scale of the fixed-point sums: a weighted probability of 1 is 2^40 units (int64 holds 2^23 overlapping tiles)."""
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
SLAB = 256
"""Rows processed at a time when normalising inputs and finishing blocks (bounds temporaries)."""
ACTIVATION_BYTES_PER_PIXEL = 2048
"""Rough activation memory per input pixel of a tile (512 float32 values), used to pick a batch size."""


def auto_batch_size(tile_pixels: int, channels: int, device: str | torch.device = "cpu") -> int:
    """A batch size from the free memory of ``device``: a quarter of it for activations.

    At least 2 (some kernels round batches of one differently); at most 8 on a
    CPU, where bigger batches only cost memory, and 64 on a GPU.
    """
    import psutil

    device = torch.device(device)
    if device.type == "cuda":
        free, ceiling = torch.cuda.mem_get_info(device)[0], 64
    else:
        free, ceiling = psutil.virtual_memory().available, 8
    per_tile = tile_pixels * (ACTIVATION_BYTES_PER_PIXEL + 4 * channels)
    return int(min(ceiling, max(2, free // 4 // per_tile)))


@dataclass(frozen=True)
class BlockJob:
    """Everything a block task needs besides the model: small, picklable, the same for every block."""

    scene: str
    """Path of the scene store."""
    prediction: str
    """Path of the prediction store (created beforehand with :func:`tilefuse.prediction.create_prediction`)."""
    grid: TileGrid
    modalities: tuple[str, ...]
    """Model inputs, in the model's order."""
    band_mean: tuple[tuple[float, ...], ...]
    band_std: tuple[tuple[float, ...], ...]
    num_classes: int
    batch_size: int
    blend: str = "gaussian"
    """Window kind of :mod:`tilefuse.blending`, or "none" for models that do not blend."""
    probs: str | None = None
    """dtype of the ``probs`` output, None to write labels only."""


class Strip(NamedTuple):
    """A spill strip, compressed: a whole row of them waits for the next block row.

    Blosc zstd with bit shuffle packs the int64 fixed-point sums about 2.5x,
    in milliseconds, which keeps that row (the only part of a worker's memory
    that grows with the scene's width) small.
    """

    shape: tuple[int, ...]
    data: bytes

    @classmethod
    def pack(cls, array: np.ndarray) -> "Strip | None":
        if not array.size:
            return None
        return cls(array.shape, _STRIP_CODEC.encode(np.ascontiguousarray(array)))

    def unpack(self) -> np.ndarray:
        return np.frombuffer(_STRIP_CODEC.decode(self.data), np.int64).reshape(self.shape)


_STRIP_CODEC = Blosc(cname="zstd", clevel=1, shuffle=Blosc.BITSHUFFLE)


@dataclass
class BlockSums:
    """Fixed-point sums of one block's tiles: ``(class, y, x)`` int64, None where nothing landed."""

    own: np.ndarray | None
    right: Strip | None
    down: Strip | None
    corner: Strip | None
    tiles: int = 0
    """Tiles run through the model."""


class TileRunner:
    """Runs batches of tiles through a model: softmax, window weights, fixed-point scale."""

    def __init__(self, model: TileModel, device: str | torch.device = "cpu", precision: str = "fp32") -> None:
        if precision not in PRECISIONS:
            raise InputError(f"unknown precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
        self.device = torch.device(device)
        if precision == "fp16" and self.device.type != "cuda":
            raise InputError("fp16 autocast needs a GPU: use --precision bf16 or fp32 on a CPU")
        self.model = model.to(self.device).eval()
        self.spec = model.spec
        self.autocast_dtype = PRECISIONS[precision]

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def __call__(self, inputs: Mapping[str, np.ndarray], weights: np.ndarray | None, batch_size: int) -> np.ndarray:
        """``(n, K, T, T)`` int64 ``softmax(logits) * weights * 2^40`` for ``n <= batch_size`` tiles.

        The batch is padded to ``batch_size`` so every call has the same shape.
        """
        count = len(next(iter(inputs.values())))
        tensors = {}
        for name, array in inputs.items():
            if count < batch_size:
                array = np.concatenate([array, np.zeros((batch_size - count, *array.shape[1:]), array.dtype)])
            # C order always: kernels pick their algorithm by memory layout too
            tensors[name] = torch.from_numpy(np.ascontiguousarray(array)).to(self.device)
        height, width = next(iter(tensors.values())).shape[-2:]
        margin = self.spec.margin
        expected = (batch_size, self.spec.num_classes, height - 2 * margin, width - 2 * margin)
        with torch.inference_mode(), self._autocast():
            logits = self.model(tensors)
            if tuple(logits.shape) != expected:
                raise InputError(
                    f"the model returned logits of shape {tuple(logits.shape)} for inputs of {height} x {width} px, "
                    f"expected {expected}: check its margin and number of classes"
                )
            probs = torch.softmax(logits[:count].float(), dim=1)
            if weights is not None:
                probs = probs * torch.tensor(weights, device=self.device)
            # truncation to int64 (values >= 0): the same on every device, and summed exactly later
            return (probs * FIXED_POINT).to(torch.int64).cpu().numpy()


def _read(group: zarr.Group, name: str, region: tuple[slice, ...], where: str) -> np.ndarray:
    """Read ``region`` of array ``name`` of a group from :func:`tilefuse.storage.open_group`.

    A missing array is an InputError naming it; a missing or damaged chunk
    already is one, naming the chunk (the verified store checks it before any
    codec runs); a codec failure in a store written without checksums becomes one.
    """
    try:
        array = group[name]
    except KeyError:
        raise InputError(f"{where} has no array {name!r}: the store is incomplete, re-ingest it") from None
    try:
        return array[region]
    except InputError:
        raise
    except Exception as error:  # codecs raise many types for corrupt data (stores without checksums)
        raise InputError(f"{where}: reading {name!r} failed ({type(error).__name__}: {error}): the store is corrupt, re-ingest it") from None


def _tile_inputs(job: BlockJob, group: zarr.Group, window: InputWindow) -> dict[str, np.ndarray]:
    """Normalised input window of every modality, reflection-padded where it leaves the scene.

    Normalised in slabs of rows into one float32 buffer, so the temporaries stay small.
    """
    rows, cols = window.read
    local_rows, local_cols = window.rows - rows.start, window.cols - cols.start
    plain = not window.needs_padding
    inputs = {}
    for name, mean, std in zip(job.modalities, job.band_mean, job.band_std):
        data = _read(group, name, (slice(None), rows, cols), job.scene)
        mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
        out = np.empty((data.shape[0], len(local_rows), len(local_cols)), np.float32)
        for start in range(0, len(local_rows), SLAB):
            slab = slice(start, start + SLAB)
            part = data[:, slab] if plain else data[:, local_rows[slab]][:, :, local_cols]
            out[:, slab] = normalise(part, mean, std)
        inputs[name] = out
    return inputs


def compute_block(job: BlockJob, block: Block, runner: TileRunner) -> BlockSums:
    """Run every tile a block owns and sum its weighted probabilities (see the module docstring)."""
    grid = job.grid
    tile, margin = grid.tile, grid.margin
    window = grid.input_window(block)
    if window is None:
        return BlockSums(None, None, None, None)
    group = storage.open_group(job.scene)
    own_rows, own_cols = grid.block_region(block)
    ext_rows, ext_cols = grid.block_extent(block)
    r0, c0 = ext_rows.start, ext_cols.start
    valid = _read(group, "valid", (ext_rows, ext_cols), job.scene)
    row_origins, col_origins = grid.block_tiles(block)
    tiles = [
        (int(r), int(c))
        for r in row_origins
        for c in col_origins
        if valid[r - r0 : r - r0 + tile, c - c0 : c - c0 + tile].any()
    ]
    if not tiles:
        return BlockSums(None, None, None, None)

    inputs = _tile_inputs(job, group, window)
    weights = None if job.blend == "none" else tile_weights(job.blend, tile, grid.overlap)
    size = tile + 2 * margin
    acc = np.zeros((job.num_classes, ext_rows.stop - r0, ext_cols.stop - c0), np.int64)
    first_row, first_col = int(row_origins[0]), int(col_origins[0])
    for start in range(0, len(tiles), job.batch_size):
        batch = tiles[start : start + job.batch_size]
        stacked = {
            name: np.stack([data[:, r - first_row : r - first_row + size, c - first_col : c - first_col + size] for r, c in batch])
            for name, data in inputs.items()
        }
        sums = runner(stacked, weights, job.batch_size)
        for (r, c), tile_sums in zip(batch, sums):
            h, w = min(tile, grid.height - r), min(tile, grid.width - c)
            acc[:, r - r0 : r - r0 + h, c - c0 : c - c0 + w] += tile_sums[:, :h, :w]

    own_h, own_w = own_rows.stop - r0, own_cols.stop - c0

    # strips are packed copies; `own` stays a view, so the accumulator lives exactly as long as it
    return BlockSums(
        own=acc[:, :own_h, :own_w],
        right=Strip.pack(acc[:, :own_h, own_w:]),
        down=Strip.pack(acc[:, own_h:, :own_w]),
        corner=Strip.pack(acc[:, own_h:, own_w:]),
        tiles=len(tiles),
    )


def combine(shape: tuple[int, int, int], pieces: list[np.ndarray | None], rows: slice | None = None) -> np.ndarray | None:
    """Rows ``rows`` of a block's total: its own sums plus its neighbours' spill strips.

    Every piece covers the block's top-left corner (the own sums all of it,
    the strips the top rows, left columns or both); None when nothing landed.
    """
    rows = rows or slice(0, shape[1])
    total = None
    for piece in pieces:
        if piece is None or piece.shape[1] <= rows.start:
            continue
        if total is None:
            total = np.zeros((shape[0], rows.stop - rows.start, shape[2]), np.int64)
        part = piece[:, rows]
        total[:, : part.shape[1], : part.shape[2]] += part
    return total


def block_outputs(
    total: np.ndarray | None, valid: np.ndarray, num_classes: int, probs: str | None
) -> tuple[np.ndarray, np.ndarray | None]:
    """Labels (uint8, argmax, 255 = nodata) and, when ``probs`` names a dtype, class probabilities.

    Probabilities are the class sums divided by their total (exact: the sums
    are integers), quantised as ``round(255 p)`` for uint8; 0 where nodata.
    """
    labels = np.full(valid.shape, IGNORE, np.uint8)
    out = None if probs is None else np.zeros((num_classes, *valid.shape), probs)
    if total is None:
        return labels, out
    norm = total.sum(axis=0)
    covered = valid & (norm > 0)
    labels[covered] = np.argmax(total, axis=0)[covered]
    if out is not None:
        for k in range(num_classes):
            p = np.divide(total[k], norm, out=np.zeros(valid.shape), where=covered)
            out[k] = np.rint(p * 255) if probs == "uint8" else p
    return labels, out


def finish_block(
    job: BlockJob,
    block: Block,
    own: np.ndarray | None,
    up: Strip | None,
    left: Strip | None,
    up_left: Strip | None,
) -> Block:
    """Combine a block's sums with the strips its upper, left and upper-left neighbours spill into it; write it.

    Works in slabs of rows, so the only block-sized arrays are the outputs.
    """
    rows, cols = job.grid.block_region(block)
    shape = (job.num_classes, rows.stop - rows.start, cols.stop - cols.start)
    valid = _read(storage.open_group(job.scene), "valid", (rows, cols), job.scene)
    pieces = [own, *(None if strip is None else strip.unpack() for strip in (up, left, up_left))]
    labels = np.empty(shape[1:], np.uint8)
    probs = None if job.probs is None else np.empty(shape, job.probs)
    for start in range(0, shape[1], SLAB):
        slab = slice(start, min(start + SLAB, shape[1]))
        total = combine(shape, pieces, slab)
        slab_labels, slab_probs = block_outputs(total, valid[slab], job.num_classes, job.probs)
        labels[slab] = slab_labels
        if probs is not None:
            probs[:, slab] = slab_probs
    write_block(job.prediction, (rows, cols), block, labels, probs)
    return block
