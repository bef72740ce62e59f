"""Schedule block tasks: in this process (``sync``) or on a dask cluster, in waves.

Per block the graph holds one compute task (:func:`tilefuse.inference.compute_block`),
up to four tiny tasks that split its sums into the pieces other tasks need
(own region, right/lower/lower-right spill strips), and one finish task
(:func:`tilefuse.inference.finish_block`) that waits for the block's own sums
and the strips of its upper, left and upper-left neighbours. Blocks are
submitted in row-major order and at most ``window`` finish tasks are in flight,
so the scheduler never holds the graph of a whole country-scale scene and
memory stays bounded by a few blocks plus one row of spill strips.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import uuid
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterable

from tqdm.auto import tqdm

from tilefuse.cluster.plugin import ModelSource, load_runner
from tilefuse.grid import Block
from tilefuse.inference import BlockJob, BlockSums, compute_block, finish_block

RETRIES = 2
"""Extra attempts of a failed task (a dead worker's tasks are rescheduled by dask on its own)."""
PIECES = ("own", "right", "down", "corner")


@dataclass(frozen=True)
class Step:
    """Compute ``block``, keep the pieces named in ``keep``, and finish (write) it when ``finish``."""

    block: Block
    keep: tuple[str, ...]
    finish: bool


def plan(blocks: Iterable[Block], pending: Iterable[Block]) -> list[Step]:
    """Steps, in row-major order, that write every pending block.

    A pending block needs the strips of its upper, left and upper-left
    neighbours, so those are computed too (without being written) when they are
    done already: only on ``--resume``.
    """
    pending = set(pending)
    steps = []
    for block in sorted(blocks):
        r, c = block
        keep = tuple(
            name
            for name, target in zip(PIECES, (block, Block(r, c + 1), Block(r + 1, c), Block(r + 1, c + 1)))
            if target in pending
        )
        if keep:
            steps.append(Step(block, keep, block in pending))
    return steps


def _sources(block: Block) -> tuple[tuple[Block, str], ...]:
    r, c = block
    return ((Block(r - 1, c), "down"), (Block(r, c - 1), "right"), (Block(r - 1, c - 1), "corner"))


@lru_cache(maxsize=1)
def _libc():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def trim_memory() -> None:
    """Hand freed heap memory back to the OS (glibc only; elsewhere a no-op).

    glibc keeps freed memory below its mmap threshold in the heap; without a
    trim between blocks a worker's resident memory creeps up block by block.
    """
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def _compute(job: BlockJob, source: ModelSource, block: Block) -> BlockSums:
    trim_memory()  # the previous block's arrays are gone by now
    return compute_block(job, block, load_runner(source))


def _piece(sums: BlockSums, name: str):
    if name == "own":
        return sums.own, sums.tiles
    return getattr(sums, name)


def _finish(job: BlockJob, block: Block, own, up, left, up_left) -> int:
    own_sums, tiles = own
    finish_block(job, block, own_sums, up, left, up_left)
    return tiles


def run_blocks(
    job: BlockJob,
    source: ModelSource,
    blocks: list[Block],
    pending: list[Block],
    client=None,
    progress: bool = True,
    window: int | None = None,
) -> int:
    """Compute and write every pending block; returns the number of tiles run through the model.

    ``client`` None runs everything here, in order; otherwise tasks go to the
    cluster with at most ``window`` blocks in flight (default: one per worker).
    """
    steps = plan(blocks, pending)
    bar = tqdm(total=len(pending), unit="block", desc="predict", disable=not progress)
    try:
        if client is None:
            return _run_here(job, source, steps, bar)
        return _run_on_cluster(job, source, steps, bar, client, window)
    finally:
        bar.close()


def _run_here(job: BlockJob, source: ModelSource, steps: list[Step], bar) -> int:
    pieces: dict[tuple[Block, str], object] = {}
    tiles = 0
    for step in steps:
        sums = _compute(job, source, step.block)
        for name in step.keep:
            pieces[step.block, name] = _piece(sums, name)
        del sums
        if step.finish:
            neighbours = [pieces.pop(key, None) for key in _sources(step.block)]
            tiles += _finish(job, step.block, pieces.pop((step.block, "own")), *neighbours)
            bar.update()
    return tiles


def _run_on_cluster(job: BlockJob, source: ModelSource, steps: list[Step], bar, client, window: int | None) -> int:
    from distributed import as_completed

    if window is None:
        # one block per worker: a worker never starts the next block while holding the last one's sums
        window = max(1, len(client.scheduler_info(n_workers=-1)["workers"]))
    run = uuid.uuid4().hex[:8]
    pieces: dict[tuple[Block, str], object] = {}
    finishing = as_completed()
    in_flight = 0
    tiles = 0

    def collect() -> None:
        nonlocal in_flight, tiles
        tiles += next(finishing).result()
        in_flight -= 1
        bar.update()

    try:
        for step in steps:
            r, c = step.block
            sums = client.submit(_compute, job, source, step.block, key=f"tilefuse-compute-{run}-{r}-{c}", retries=RETRIES)
            for name in step.keep:
                pieces[step.block, name] = client.submit(
                    _piece, sums, name, key=f"tilefuse-{name}-{run}-{r}-{c}", priority=1, retries=RETRIES
                )
            del sums
            if step.finish:
                neighbours = [pieces.pop(key, None) for key in _sources(step.block)]
                future = client.submit(
                    _finish,
                    job,
                    step.block,
                    pieces.pop((step.block, "own")),
                    *neighbours,
                    key=f"tilefuse-finish-{run}-{r}-{c}",
                    priority=2,
                    retries=RETRIES,
                )
                finishing.add(future)
                in_flight += 1
            while in_flight >= window:
                collect()
        while in_flight:
            collect()
    except BaseException:
        client.cancel([*pieces.values(), *finishing.futures])
        raise
    return tiles
