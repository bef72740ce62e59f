"""Block execution: one output block from scene store to prediction store, no cluster knowledge.

A block is computed in three steps, each a plain function a scheduler can run
anywhere:

1. :func:`read_block` (host, any thread: reader threads run it ahead of the
   model) reads the block's ``valid`` mask, picks the tiles with a valid pixel
   and reads the raw input window of every modality (its tiles plus the model
   margin) through :func:`tilefuse.storage.open_group`, so a damaged chunk is
   an :class:`~tilefuse.errors.InputError` naming it. Nothing touches the model.
2. :func:`run_block` (the model's device, under :attr:`TileRunner.lock`)
   moves the raw window to the device (pinned host memory and a non-blocking
   copy on CUDA), reflects it at scene edges, normalises it with the band
   statistics, cuts the tiles as views (``unfold``; one copy per tile into
   the batch buffer), runs them in fixed-shape batches, and sums
   ``softmax * window`` in fixed point into an accumulator on the device
   (:func:`accumulate`) that holds one tile row at a time (a band of
   ``tile`` rows: rows above the next tile row are final and handed on as
   they are done). The block's pixels that no
   neighbour's tile reaches are finished there, on the device, and only
   their labels (and probs) come back, as uint8 (or the probs dtype). Fixed-point sums come back only where other blocks need them
   (:class:`BlockSums`): the bands of the block's own region that its upper
   and left neighbours spill into, and the strips it spills into its right,
   lower and lower-right neighbours (the last two compressed, :class:`Strip`, and
   saved to disk while they wait a block row, :class:`StripFile`).
3. :func:`finish_block` adds, in those bands, the block's sums and the strips
   spilled into it by its upper, left and upper-left neighbours, finishes them
   with the same function (:func:`block_outputs`), masks with ``valid``, and
   writes ``labels`` (and ``probs``) as one aligned region.

Sums are kept in 64-bit fixed point (units of 2^-40): integer addition is
exact and associative, so a pixel's total does not depend on how tiles are
grouped into blocks, batches or workers, nor on the order blocks finish, and
labels and probs are one elementwise function of that total wherever they are
computed (argmax takes the first maximum; probs are float64 quotients, then
rounded), so finishing a pixel on the device or on the host gives the same
bits. The accumulator is the engine's main memory traffic (8 bytes per class
and pixel), so it is touched as little as exactness allows: where every tile
of a block runs, each tile assigns the truncated sums of the part no earlier
tile reached and adds only into its top and left overlap bands (``0 + x = x``:
the same integers as zero-filling and adding everywhere), and labels without
probs need no class sum (sums are >= 0, so a pixel is covered exactly where its
largest sum is > 0). Every model call sees the same input shape and memory layout (partial
batches are zero-padded into one persistent buffer), because kernels such as
oneDNN's pick their algorithm by shape and layout and would otherwise round a
tile's output differently depending on its batch or block; a model whose spec
says ``batch_invariant`` (its tiles never share a kernel call) runs partial
batches as they are, since padding would only cost it arithmetic on zeros.
Shape and layout are not all: a vectorised CPU kernel may round an element by
its position in the tensor (torch's sigmoid on AVX-512, over PAD's phase maps
of a few pixels per tile), so a model can give a tile's last bits by its slot in
the batch, which the block's tiles decide: such a model is bitwise the same for
one block size only (labels alike but at exact near-ties). Giving each tile a
slot of its own, independent of the blocks, is the remedy not built yet. Reading ahead
(prefetch depth, reader threads) changes only when bytes are read, never
which: the output is bitwise the same with or without it.
"""

from __future__ import annotations

import contextlib
import os
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, NamedTuple

import numpy as np
import torch
import zarr
from numcodecs import Blosc

from tilefuse import storage
from tilefuse.blending import tile_weights
from tilefuse.errors import InputError
from tilefuse.grid import Block, TileGrid
from tilefuse.prediction import write_block
from tilefuse.scene import IGNORE
from tilefuse.tile_model import TileModel, check_logits

FIXED_POINT = 2.0**40
"""Scale of the fixed-point sums: a weighted probability of 1 is 2^40 units (int64 holds 2^23 overlapping tiles)."""
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
TORCH_DTYPES = {"uint8": torch.uint8, "float16": torch.float16, "float32": torch.float32}
"""torch dtype of each ``probs`` dtype name."""
SLAB = 256
"""Rows finished at a time (bounds the float64 temporaries of probs, on the device and the host)."""
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
    scene_id: tuple[int, int] | None = None
    """:func:`scene_identity` of the scene store when the run was planned (None: not checked). A block that
    finds another store there (replaced mid-run: ``ingest``/``synth --overwrite``) fails (:func:`same_scene`):
    its pixels, read from the new scene, were written among the old scene's blocks, and the store was marked
    complete."""


def scene_identity(path: str | os.PathLike) -> tuple[int, int] | None:
    """(mtime in ns, size) of a store's root ``zarr.json``, None where it has none: a store written anew (renamed
    into place) has another one. Unlike the folder's inode, the same on every host of a shared filesystem
    (FUSE and SMB mounts number inodes per client)."""
    try:
        info = os.stat(os.path.join(path, "zarr.json"))
    except OSError:
        return None
    return info.st_mtime_ns, info.st_size


def same_scene(job: BlockJob) -> None:
    """Refuse, in one line, a scene store that is not the one the run planned (:attr:`BlockJob.scene_id`)."""
    if job.scene_id is None:
        return
    found = scene_identity(job.scene)
    if found != tuple(job.scene_id):
        raise InputError(
            f"scene store {job.scene} was {'removed' if found is None else 'replaced'} while this prediction read it "
            "(its blocks would mix two scenes): predict it again, with --overwrite, once the store is written"
        )


def _scene_group(job: BlockJob) -> zarr.Group:
    same_scene(job)
    return storage.open_group(job.scene)


class Strip(NamedTuple):
    """A spill strip, compressed: a whole row of them waits for the next block row.

    Blosc zstd with bit shuffle packs the int64 fixed-point sums about 2.2x
    (29 ms to encode a 2048 x 128 px strip of 7 classes, 15 ms to decode), which
    keeps that row (the only part of the run that grows with the scene's width)
    small on disk, where it waits (:meth:`save`). Only the strips that wait for
    the next block row (``down``, ``corner``) are packed; the others are taken
    up by the next block's finish and stay plain arrays.
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

    def save(self, path: str | os.PathLike) -> "StripFile":
        """Write the packed bytes to ``path`` (whole or not at all: a temporary renamed into place) and
        return its handle. The folder must exist: a run that removed it (it ended) gets no new file."""
        path = Path(path)
        tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex[:6]}.part")
        try:
            tmp.write_bytes(self.data)
            os.replace(tmp, path)
        except FileNotFoundError:
            if path.parent.is_dir():
                raise
            # an InputError, not a crash: a worker still running a piece of a run that failed elsewhere (its folder
            # already removed) logs no traceback for it (tilefuse.cluster.plugin)
            raise InputError(f"spill folder {path.parent} is gone: the prediction ended or the folder was removed; rerun with --resume") from None
        finally:
            tmp.unlink(missing_ok=True)
        return StripFile(str(path), self.shape, len(self.data), storage.crc32c(np.frombuffer(self.data, np.uint8)))


class StripFile(NamedTuple):
    """A :class:`Strip` saved to disk while it waits for the next block row: what a task hands on instead.

    A row of strips grows with the scene's width (about 6.7 MB per 2,048 px block of 7 classes, packed), so
    it waits on disk (:mod:`tilefuse.cluster.blocks` keeps it beside the prediction store) and worker memory
    does not grow with the scene. The handle is small; the file's size and crc32c make a missing, truncated
    or altered file an :class:`~tilefuse.errors.InputError`, never sums.
    """

    path: str
    shape: tuple[int, ...]
    size: int
    crc: int

    def unpack(self) -> np.ndarray:
        try:
            data = Path(self.path).read_bytes()
        except FileNotFoundError:
            data = None
        if data is None or len(data) != self.size or storage.crc32c(np.frombuffer(data, np.uint8)) != self.crc:
            what = "is missing" if data is None else "is damaged (size or checksum differs)"
            raise InputError(f"spill strip {self.path} {what}: it was removed or changed while the prediction ran; rerun with --resume")
        return Strip(self.shape, data).unpack()


_STRIP_CODEC = Blosc(cname="zstd", clevel=1, shuffle=Blosc.BITSHUFFLE)


@dataclass
class BlockOwn:
    """A block's contribution to its own region (see :func:`incoming`: ``(in_h, in_w)`` bands, ``own_h x own_w`` region).

    ``labels``/``probs`` are final for rows ``in_h:`` x cols ``in_w:``; ``top``
    holds the sums of rows ``:in_h`` (every column), ``left`` those of rows
    ``in_h:`` x cols ``:in_w``. All None when none of the block's tiles ran.
    """

    labels: np.ndarray | None = None
    probs: np.ndarray | None = None
    top: np.ndarray | None = None
    left: np.ndarray | None = None
    tiles: int = 0
    """Tiles run through the model."""


@dataclass
class BlockSums:
    """What a computed block hands on: its own part, and its spill into the right, lower and lower-right blocks."""

    own: BlockOwn
    right: np.ndarray | None = None
    """Taken up by the next block's finish: not packed."""
    down: Strip | None = None
    corner: Strip | None = None

    @property
    def tiles(self) -> int:
        return self.own.tiles


@dataclass
class BlockInput:
    """What :func:`read_block` read for one block: host arrays only (pinned where the model runs on CUDA)."""

    block: Block
    valid: np.ndarray
    """``valid`` over the block's extent (own region plus spill strips)."""
    tiles: np.ndarray
    """``(n, 2)`` row/column indices, in the block's tile grid, of the tiles to run, row-major."""
    data: dict[str, torch.Tensor]
    """Raw input window of each modality (the scene region holding it, in the store's dtype)."""


def incoming(grid: TileGrid, block: Block) -> tuple[int, int]:
    """Rows and columns of a block's own region, from its top and left edges, that neighbours' tiles reach.

    The upper (and upper-left) neighbour's tiles reach ``in_h`` rows down into
    the block, the left (and upper-left) one's ``in_w`` columns across; every
    other pixel of the block is covered by its own tiles alone.
    """
    own_rows, own_cols = grid.block_region(block)
    in_h = grid.block_extent(Block(block.row - 1, block.col))[0].stop - own_rows.start if block.row else 0
    in_w = grid.block_extent(Block(block.row, block.col - 1))[1].stop - own_cols.start if block.col else 0
    return max(0, in_h), max(0, in_w)


class TileRunner:
    """Runs batches of tiles through a model on its device: softmax, window weights, fixed-point scale.

    ``channels_last`` feeds the model NHWC tensors (and converts its weights);
    ``compile`` wraps it in ``torch.compile``. :attr:`lock` serialises the
    device phase of blocks run from several threads of one process (dask task
    threads): the batch buffers are the runner's.
    """

    def __init__(
        self,
        model: TileModel,
        device: str | torch.device = "cpu",
        precision: str = "fp32",
        *,
        channels_last: bool = False,
        compile: bool = False,
    ) -> None:
        if precision not in PRECISIONS:
            raise InputError(f"unknown precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
        self.device = torch.device(device)
        if precision == "fp16" and self.device.type != "cuda":
            raise InputError("fp16 autocast needs a GPU: use precision='bf16' or 'fp32' on a CPU")
        self.spec = model.spec
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        model = model.to(self.device).eval()
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = torch.compile(model, dynamic=False) if compile else model
        self.autocast_dtype = PRECISIONS[precision]
        self.lock = threading.Lock()
        self._buffers: dict[str, torch.Tensor] = {}
        self._weights: dict[tuple, torch.Tensor | None] = {}

    @property
    def pin(self) -> bool:
        """Whether host inputs should be pinned (page-locked) for non-blocking copies to the device."""
        return self.device.type == "cuda"

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def weights(self, blend: str, tile: int, overlap: int) -> torch.Tensor:
        """The tile window of :func:`tilefuse.blending.tile_weights` times 2^40 on the device (2^40 for "none"), cached.

        Scaling by a power of two is exact, so ``p * (w * 2^40)`` equals ``(p * w) * 2^40`` wherever the
        truncated result is not 0 (only products below 2^-126 could differ, and those truncate to 0 either way).
        """
        key = (blend, tile, overlap)
        if key not in self._weights:
            window = np.ones((1, 1), np.float32) if blend == "none" else tile_weights(blend, tile, overlap)
            self._weights[key] = torch.tensor(window * np.float32(FIXED_POINT), device=self.device)
        return self._weights[key]

    def band(self, shape: tuple[int, ...]) -> torch.Tensor:
        """The int64 band accumulator of ``shape`` (not zeroed: :func:`run_block` does), in memory kept from block to block."""
        flat = self._buffers.get("band")
        size = int(np.prod(shape))
        if flat is None or flat.numel() < size:
            flat = self._buffers["band"] = torch.empty(size, dtype=torch.int64, device=self.device)
        return flat[:size].view(shape)

    def buffer(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        """The persistent float32 input batch of one modality (the same memory and layout for every call)."""
        buf = self._buffers.get(name)
        if buf is None or tuple(buf.shape) != shape:
            buf = self._buffers[name] = torch.zeros(shape, dtype=torch.float32, device=self.device).to(memory_format=self.memory_format)
        return buf

    def scaled(self, batch: Mapping[str, torch.Tensor], count: int, weights: torch.Tensor, finite: torch.Tensor) -> torch.Tensor:
        """``(count, K, T, T)`` float32 ``softmax(logits) * weights`` on the device, of full, padded batches.

        ``weights`` are scaled to fixed point already (:meth:`weights`); truncating the result to int64
        (:func:`accumulate`) gives the fixed-point sums. ``finite`` (a bool scalar on the device) is and-ed
        with whether every logit of the ``count`` tiles is finite; the caller checks it once its results
        come to the host (:func:`check_finite`), so a GPU is not synchronised per batch.
        """
        height, width = next(iter(batch.values())).shape[-2:]
        margin = self.spec.margin
        size = len(next(iter(batch.values())))
        expected = (size, self.spec.num_classes, height - 2 * margin, width - 2 * margin)
        with torch.inference_mode(), self._autocast():
            logits = check_logits(self.model(dict(batch)), expected, height, width)
            finite &= torch.isfinite(logits[:count]).all()
            return torch.softmax(logits[:count].float(), dim=1).mul_(weights)

    def __call__(self, inputs: Mapping[str, np.ndarray], weights: np.ndarray | None, batch_size: int) -> np.ndarray:
        """int64 fixed point of :meth:`scaled` of ``n <= batch_size`` host tiles, on the host; the batch is padded to ``batch_size``."""
        count = len(next(iter(inputs.values())))
        batch = {}
        for name, array in inputs.items():
            buf = self.buffer(name, (batch_size, *array.shape[1:]))
            buf[:count].copy_(torch.from_numpy(np.asarray(array, np.float32)))
            buf[count:].zero_()
            batch[name] = buf
        scaled = np.float32(FIXED_POINT) * (np.ones((1, 1), np.float32) if weights is None else weights)
        finite = torch.ones((), dtype=torch.bool, device=self.device)
        sums = self.scaled(batch, count, torch.tensor(scaled, device=self.device), finite).to(torch.int64).cpu().numpy()
        check_finite(finite, f"{count} tiles")
        return sums


def check_finite(finite: torch.Tensor, where: str) -> None:
    """Refuse the results of a model that returned NaN or inf (:meth:`TileRunner.scaled`): their softmax is NaN,
    and the pixels were written as nodata in a store that looked complete."""
    if not bool(finite):
        raise InputError(
            f"the model returned non-finite logits (NaN or inf) for {where}: check the model and its checkpoint "
            "(weights of a diverged training, or a layer that overflows at this precision)"
        )


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
        rows, step = region[-2], array.chunks[-2]
        start, stop, _ = rows.indices(array.shape[-2])
        if stop - start <= step:
            return array[region]
        # one row of chunks at a time into the result: zarr holds a whole read twice over (a sharded read
        # decodes into per-shard buffers, then copies), so a 2,368^2 px window of 5 float32 bands peaked at
        # 2.5x its 107 MiB in one call and at 1.8x so, at the same speed
        out = np.empty(tuple(len(range(*r.indices(n))) for r, n in zip(region, array.shape)), array.dtype)
        for first in range(start - start % step, stop, step):
            part = slice(max(first, start), min(first + step, stop))
            out[..., part.start - start : part.stop - start, :] = array[(*region[:-2], part, region[-1])]
        return out
    except InputError:
        raise
    except Exception as error:  # codecs raise many types for corrupt data (stores without checksums)
        raise InputError(f"{where}: reading {name!r} failed ({type(error).__name__}: {error}): the store is corrupt, re-ingest it") from None


def read_block(job: BlockJob, block: Block, pin: bool = False) -> BlockInput:
    """Read what :func:`run_block` needs for ``block``: host work only, safe in any thread.

    Only blocks with a tile to run read their input window. ``pin`` copies it
    into page-locked memory (for non-blocking copies to a GPU).
    """
    grid = job.grid
    tile = grid.tile
    empty = BlockInput(block, np.zeros((0, 0), bool), np.zeros((0, 2), np.int64), {})
    window = grid.input_window(block)
    if window is None:
        return empty
    group = _scene_group(job)
    ext_rows, ext_cols = grid.block_extent(block)
    r0, c0 = ext_rows.start, ext_cols.start
    valid = _read(group, "valid", (ext_rows, ext_cols), job.scene)
    row_origins, col_origins = grid.block_tiles(block)
    tiles = np.array(
        [
            (i, j)
            for i, r in enumerate(row_origins)
            for j, c in enumerate(col_origins)
            if valid[r - r0 : r - r0 + tile, c - c0 : c - c0 + tile].any()
        ],
        np.int64,
    ).reshape(-1, 2)
    data = {}
    for name in job.modalities if len(tiles) else ():
        raw = torch.from_numpy(np.ascontiguousarray(_read(group, name, (slice(None), *window.read), job.scene)))
        data[name] = raw.pin_memory() if pin else raw
    same_scene(job)  # still the same store once everything is read: nothing came from a replacement
    return BlockInput(block, valid, tiles, data)


def _device_inputs(job: BlockJob, inputs: BlockInput, runner: TileRunner) -> dict[str, torch.Tensor]:
    """Normalised float32 input window of every modality on the device, reflection-padded where it leaves the scene.

    The same arithmetic as :func:`tilefuse.scene.normalise` (cast, subtract, divide, NaN/inf to 0), in place:
    this consumes ``inputs.data`` (on a CPU the reader's float32 arrays become the normalised ones).
    """
    device = runner.device
    window = job.grid.input_window(inputs.block)
    rows, cols = window.read
    index = None
    if window.needs_padding:
        index = (
            torch.from_numpy(window.rows - rows.start).to(device),
            torch.from_numpy(window.cols - cols.start).to(device),
        )
    out = {}
    for name, mean, std in zip(job.modalities, job.band_mean, job.band_std):
        data = inputs.data.pop(name).to(device, non_blocking=True)  # consumed: normalised in place where it can be
        if index is not None:
            data = data.index_select(1, index[0]).index_select(2, index[1])
        data = data.to(torch.float32)
        data -= torch.tensor(mean, dtype=torch.float32, device=device)[:, None, None]
        data /= torch.tensor(std, dtype=torch.float32, device=device)[:, None, None]
        out[name] = torch.nan_to_num_(data, nan=0.0, posinf=0.0, neginf=0.0)
    return out


def run_block(job: BlockJob, inputs: BlockInput, runner: TileRunner) -> BlockSums:
    """Run a block's tiles on the runner's device and finish what can be finished there (module docstring, step 2).

    Tile rows run top to bottom into a band of sums ``tile`` rows high. Once a
    tile row is done, the rows above the next one are final (no later tile
    reaches them): :class:`_BlockSink` takes them, and the band moves down by
    the stride: its last ``overlap`` rows (the next tile row's top band) are
    copied to its top. So the device holds one band, not the whole block, and
    rows are finished while their sums are still in cache.
    """
    if not len(inputs.tiles):
        return BlockSums(BlockOwn())
    grid, block = job.grid, inputs.block
    tile, stride, size = grid.tile, grid.stride, grid.tile + 2 * grid.margin
    ext_rows, ext_cols = grid.block_extent(block)
    row_origins, col_origins = grid.block_tiles(block)
    dy, dx = int(row_origins[0]) - ext_rows.start, int(col_origins[0]) - ext_cols.start
    sink = _BlockSink(job, inputs, runner.device)
    # every tile whole: the band runs past the scene edge, where reflected pixels land and are cut off
    band = runner.band((job.num_classes, tile, dx + (len(col_origins) - 1) * stride + tile))
    dense = len(inputs.tiles) == len(row_origins) * len(col_origins)
    if dense:  # the tiles cover the band but for its first dx columns
        band[:, :, :dx].zero_()
    else:
        band.zero_()
    kept = tile - stride  # rows a tile row hands on to the next one
    windows = _device_inputs(job, inputs, runner)
    # (rows, cols, C, size, size) views of every tile of the window: no copy
    views = {name: data.unfold(1, size, stride).unfold(2, size, stride).permute(1, 2, 0, 3, 4) for name, data in windows.items()}
    weights = runner.weights(job.blend, tile, grid.overlap)
    finite = torch.ones((), dtype=torch.bool, device=runner.device)
    row = 0  # the tile row the band starts at
    for start in range(0, len(inputs.tiles), job.batch_size):
        chosen = inputs.tiles[start : start + job.batch_size].tolist()
        count = len(chosen)
        batch = {}
        for name, view in views.items():
            buf = runner.buffer(name, (job.batch_size, *view.shape[2:]))
            for k, (i, j) in enumerate(chosen):  # a copy per tile: 7x faster than one advanced-index gather on a CPU
                buf[k].copy_(view[i, j])
            if runner.spec.batch_invariant:
                batch[name] = buf[:count]
            else:
                batch[name] = buf
                buf[count:].zero_()
        sums = runner.scaled(batch, count, weights, finite)
        for (i, j), tile_sums in zip(chosen, sums):
            while row < i:  # tile row done: hand on the rows above the next one, move the band down
                sink.rows(dy + row * stride, band[:, :stride])
                # rows stride: to :kept (a copy first where they overlap, an overlap above half the tile)
                band[:, :kept].copy_(band[:, stride:] if kept <= stride else band[:, stride:].clone())
                if not dense:
                    band[:, kept:].zero_()
                row += 1
            accumulate(band[:, :, dx + j * stride :], tile_sums, grid.overlap * (i > 0), grid.overlap * (j > 0), dense)
    sink.rows(dy + row * stride, band)
    check_finite(finite, f"block {tuple(block)}")
    return sink.sums(len(inputs.tiles))


class _BlockSink:
    """Where a block's final rows of sums go, in block pixels (rows and columns from its own region's corner).

    The parts other blocks need are copied to host arrays (:class:`BlockOwn`'s
    ``top`` and ``left``, :class:`BlockSums`' strips); the pixels only the
    block reaches are finished on the device (:func:`block_outputs`). Rows no
    tile reached keep zero sums, so they finish as nodata, as zero sums do.
    """

    def __init__(self, job: BlockJob, inputs: BlockInput, device: torch.device) -> None:
        grid = job.grid
        own_rows, own_cols = grid.block_region(inputs.block)
        ext_rows, ext_cols = grid.block_extent(inputs.block)
        own_h, own_w = own_rows.stop - own_rows.start, own_cols.stop - own_cols.start
        ext_h, ext_w = ext_rows.stop - own_rows.start, ext_cols.stop - own_cols.start
        in_h, in_w = incoming(grid, inputs.block)
        self.job = job
        self.parts = {
            "top": ((0, in_h), (0, own_w)),
            "left": ((in_h, own_h), (0, in_w)),
            "right": ((0, own_h), (own_w, ext_w)),
            "down": ((own_h, ext_h), (0, own_w)),
            "corner": ((own_h, ext_h), (own_w, ext_w)),
        }
        self.host = {
            name: np.zeros((job.num_classes, rows[1] - rows[0], cols[1] - cols[0]), np.int64)
            for name, (rows, cols) in self.parts.items()
        }
        self.centre = ((in_h, own_h), (in_w, own_w))
        self.valid = torch.from_numpy(inputs.valid[in_h:own_h, in_w:own_w]).to(device)
        self.labels = torch.full(self.valid.shape, IGNORE, dtype=torch.uint8, device=device)
        self.probs = None
        if job.probs is not None:
            self.probs = torch.zeros((job.num_classes, *self.valid.shape), dtype=TORCH_DTYPES[job.probs], device=device)

    def rows(self, first: int, sums: torch.Tensor) -> None:
        """Take the final sums ``(K, n, width)`` of rows ``first:first + n`` (any part past the extent is dropped)."""
        last = first + sums.shape[1]
        for name, ((r0, r1), (c0, c1)) in self.parts.items():
            lo, hi = max(first, r0), min(last, r1)
            if lo < hi and c0 < c1:
                torch.from_numpy(self.host[name][:, lo - r0 : hi - r0]).copy_(sums[:, lo - first : hi - first, c0:c1])
        (r0, r1), (c0, c1) = self.centre
        for lo in range(max(first, r0), min(last, r1), SLAB):
            hi = min(lo + SLAB, last, r1)
            labels, probs = block_outputs(sums[:, lo - first : hi - first, c0:c1], self.valid[lo - r0 : hi - r0], self.job.num_classes, self.job.probs)
            self.labels[lo - r0 : hi - r0] = labels
            if probs is not None:
                self.probs[:, lo - r0 : hi - r0] = probs

    def sums(self, tiles: int) -> BlockSums:
        """What the block hands on (empty parts as None, the strips that wait a block row packed)."""
        part = {name: array if array.size else None for name, array in self.host.items()}
        return BlockSums(
            BlockOwn(
                labels=self.labels.cpu().numpy(),
                probs=None if self.probs is None else self.probs.cpu().numpy(),
                top=part["top"],
                left=part["left"],
                tiles=tiles,
            ),
            right=part["right"],
            down=Strip.pack(self.host["down"]),
            corner=Strip.pack(self.host["corner"]),
        )


def accumulate(acc: torch.Tensor, scaled: torch.Tensor, top: int, left: int, fresh: bool) -> None:
    """Add one tile's fixed-point sums (``scaled`` truncated to int64) into ``acc`` at its top-left corner.

    With ``fresh``, every tile of the block runs in row-major order, so the tile's top ``top`` rows and
    the next ``left`` columns hold earlier tiles' sums and the rest holds nothing yet: it is assigned
    (``copy_`` truncates as ``.to(int64)`` does), and only the bands are added to. Else ``acc`` was zeroed
    and the whole tile is added. Either way each pixel ends with the same integer sum.
    """
    height, width = scaled.shape[-2:]
    region = acc[:, :height, :width]
    if not fresh:
        region += scaled.to(torch.int64)
        return
    region[:, top:, left:].copy_(scaled[:, top:, left:])
    if top:
        region[:, :top] += scaled[:, :top].to(torch.int64)
    if left:
        region[:, top:, :left] += scaled[:, top:, :left].to(torch.int64)


def compute_block(job: BlockJob, block: Block, runner: TileRunner) -> BlockSums:
    """:func:`read_block` then :func:`run_block` (under the runner's lock), in this thread."""
    inputs = read_block(job, block, pin=runner.pin)
    with runner.lock:
        return run_block(job, inputs, runner)


def combine(shape: tuple[int, int, int], pieces: list[np.ndarray | None], rows: slice | None = None) -> np.ndarray | None:
    """Rows ``rows`` of a region's total: pieces of sums that each cover its top-left corner.

    Every piece covers the region's top-left corner (the block's own sums all
    of it, the strips the top rows, left columns or both); None when nothing landed.
    """
    rows = rows or slice(0, shape[1])
    total = None
    for piece in pieces:
        if piece is None or piece.shape[1] <= rows.start:
            continue
        if total is None:
            total = np.zeros((shape[0], rows.stop - rows.start, shape[2]), np.int64)
        part = piece[:, rows, : shape[2]]
        total[:, : part.shape[1], : part.shape[2]] += part
    return total


ARGMAX_ROWS = 16
"""Rows of sums :func:`first_max` reduces at a time on a CPU (about 2 MB for 7 classes, 2,000 px wide: in cache)."""


def first_max(total: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The largest of the sums ``(K, h, w)`` over classes and the first class holding it (uint8), as ``total.max(dim=0)``.

    On a CPU, ``max(dim=0)`` (values and indices) runs at a third of the speed
    of ``amax``: there the sums are reduced in cache-sized slabs as keys
    ``sum * 2^b + (2^b - 1 - k)`` (``2^b >= K``), whose maximum holds the
    largest sum and, among equal sums, the lowest class ``k``: the same
    integers. Sums too large for the key (never from the engine's fixed
    point) take ``max(dim=0)``. On other devices ``max(dim=0)`` is fast.
    """
    classes = total.shape[0]
    if total.device.type != "cpu" or not total.numel():
        top, index = total.max(dim=0)
        return top, index.to(torch.uint8)
    bits = max(1, (classes - 1).bit_length())
    low = (1 << bits) - 1
    tie = (low - torch.arange(classes, dtype=torch.int64))[:, None, None]
    top = torch.empty(total.shape[1:], dtype=torch.int64)
    best = torch.empty(total.shape[1:], dtype=torch.int64)
    key = torch.empty((classes, min(ARGMAX_ROWS, total.shape[1]), total.shape[2]), dtype=torch.int64)
    for start in range(0, total.shape[1], ARGMAX_ROWS):
        part = total[:, start : start + ARGMAX_ROWS]
        rows = slice(start, start + part.shape[1])
        if int(torch.amax(part, 0, out=top[rows]).max()) >> (63 - bits):  # too large for a key
            best[rows] = low - part.max(dim=0).indices
            continue
        keys = torch.bitwise_left_shift(part, bits, out=key[:, : part.shape[1]]).add_(tie)
        torch.amax(keys, 0, out=best[rows])
    return top, (low - (best & low)).to(torch.uint8)


def block_outputs(
    total: torch.Tensor | None, valid: torch.Tensor, num_classes: int, probs: str | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Labels (uint8, argmax, 255 = nodata) and, when ``probs`` names a dtype, class probabilities, on ``valid``'s device.

    Labels take the first of equal maxima. Probabilities are the class sums
    divided by their total in float64 (exact inputs: the sums are integers;
    one correctly rounded division), quantised as ``round(255 p)`` (half to
    even) for uint8; 0 where nodata. Elementwise IEEE arithmetic, so a CPU
    and a GPU give the same bits.
    """
    out = None if probs is None else torch.zeros((num_classes, *valid.shape), dtype=TORCH_DTYPES[probs], device=valid.device)
    if total is None:
        return torch.full(valid.shape, IGNORE, dtype=torch.uint8, device=valid.device), out
    top, labels = first_max(total)
    # sums are >= 0, so a pixel got something (norm > 0) exactly where its largest sum is > 0
    covered = valid & (top > 0)
    labels.masked_fill_(~covered, IGNORE)
    if out is not None:
        norm = total.sum(dim=0)
        p = torch.where(covered, total.double() / torch.where(covered, norm, 1).double(), 0.0)
        # float16 through float32: two correctly rounded steps on every device (a direct cast may round twice on some)
        out = (p * 255).round().to(torch.uint8) if probs == "uint8" else p.to(torch.float32).to(TORCH_DTYPES[probs])
    return labels, out


def finish_block(
    job: BlockJob,
    block: Block,
    own: BlockOwn | None,
    up: Strip | None,
    left: np.ndarray | None,
    up_left: Strip | None,
) -> Block:
    """Finish the bands of a block its upper, left and upper-left neighbours spill into; write the block.

    The top band (rows ``:in_h``) adds the block's ``top`` sums, the upper
    strip, the left strip's top rows and the upper-left corner; the left band
    (rows ``in_h:``, cols ``:in_w``) the block's ``left`` sums and the rest of
    the left strip. The remaining pixels came finished from :func:`run_block`.
    """
    own = own or BlockOwn()
    grid = job.grid
    rows, cols = grid.block_region(block)
    own_h, own_w = rows.stop - rows.start, cols.stop - cols.start
    in_h, in_w = incoming(grid, block)
    labels = np.full((own_h, own_w), IGNORE, np.uint8)
    probs = None if job.probs is None else np.zeros((job.num_classes, own_h, own_w), job.probs)
    if own.labels is not None:
        labels[in_h:, in_w:] = own.labels
        if probs is not None:
            probs[:, in_h:, in_w:] = own.probs
    bands = (
        ((0, in_h, own_w), [own.top, up, left, up_left]),
        ((in_h, own_h, in_w), [own.left, None if left is None else left[:, in_h:]]),
    )
    if in_h or in_w:
        group = _scene_group(job)
    for (first, last, width), pieces in bands:
        if last <= first or not width:
            continue
        pieces = [piece.unpack() if isinstance(piece, (Strip, StripFile)) else piece for piece in pieces]
        shape = (job.num_classes, last - first, width)
        valid = _read(group, "valid", (slice(rows.start + first, rows.start + last), slice(cols.start, cols.start + width)), job.scene)
        for start in range(0, shape[1], SLAB):
            slab = slice(start, min(start + SLAB, shape[1]))
            total = combine(shape, pieces, slab)
            slab_labels, slab_probs = block_outputs(
                None if total is None else torch.from_numpy(total), torch.from_numpy(valid[slab]), job.num_classes, job.probs
            )
            labels[first + slab.start : first + slab.stop, :width] = slab_labels.numpy()
            if probs is not None:
                probs[:, first + slab.start : first + slab.stop, :width] = slab_probs.numpy()
    if in_h or in_w:
        same_scene(job)
    write_block(job.prediction, (rows, cols), block, labels, probs)
    return block
