"""Schedule block tasks: in this process (``sync``) or on a dask cluster, in waves, reading ahead.

Per block the graph holds one compute task (:func:`tilefuse.inference.compute_block`),
up to four tiny tasks that split its sums into the pieces other tasks need
(own part, right/lower/lower-right spill strips), and one finish task
(:func:`tilefuse.inference.finish_block`) that waits for the block's own part
and the strips of its upper, left and upper-left neighbours. Blocks are
submitted in row-major order and at most ``window`` finish tasks are in flight,
so the scheduler never holds the graph of a whole country-scale scene.
The strips that wait for the next block row (lower and lower-right) wait on
disk, in a folder beside the prediction store (:func:`spill_folder`; their
tasks hand on a :class:`~tilefuse.inference.StripFile`), and each is deleted
once the block that takes it up is written: memory per worker stays bounded by
a few blocks, whatever the scene's width.

Reading overlaps the model. In this process (``sync``) a pool of
``reader_threads`` threads reads the inputs of the next ``prefetch`` blocks
(:func:`tilefuse.inference.read_block`) while the model runs the current one,
and one writer thread finishes and writes the previous block.
On a dask worker the read-ahead comes from its task threads: a compute task
reads its window without any lock and holds the runner's device lock
(:attr:`tilefuse.inference.TileRunner.lock`) only to run the model, so a
worker with ``1 + prefetch`` threads (:func:`task_threads`) reads ``prefetch``
blocks while it computes one. A reader that fails (a damaged chunk: an
:class:`~tilefuse.errors.InputError` naming it) fails its block's task, which
dask retries (:data:`RETRIES`) and then raises. Memory: ``prefetch`` input
windows more than without. Output: bitwise the same for any prefetch depth
and reader thread count (reads change when bytes arrive, never the sums).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from tqdm.auto import tqdm

from tilefuse.cluster.malloc import single_arena, trim_memory
from tilefuse.cluster.plugin import ModelSource, load_runner
from tilefuse.grid import Block
from tilefuse.errors import InputError
from tilefuse.inference import BlockJob, BlockOwn, BlockSums, Strip, compute_block, finish_block, read_block, run_block
from tilefuse.outputs import clean_stale, temporary_sibling

RETRIES = 2
"""Extra attempts of a failed task (a dead worker's tasks are rescheduled by dask on its own)."""
PIECES = ("own", "right", "down", "corner")
MAX_PREFETCH = 4


def default_prefetch(cores: int | None = None, device=None, torch_threads: int | None = None) -> int:
    """Blocks read ahead by default: one per four cores of a worker, at least 1, at most :data:`MAX_PREFETCH`.

    For a model on a CPU ``device`` only as many as the cores torch's threads (``torch_threads``, default
    this process's) leave free, often none: a reader thread there takes cores from the model (PAD atto,
    2048^2 px, ``sync`` on 2 cores: efficiency 0.74 reading one block ahead, 0.84 without;
    ``benchmarks/bench_engine.py``).
    """
    cores = cores or os.cpu_count() or 1
    depth = max(1, min(MAX_PREFETCH, cores // 4))
    if device is not None and getattr(device, "type", device) == "cpu":
        if torch_threads is None:
            import torch

            torch_threads = torch.get_num_threads()
        depth = min(depth, max(0, cores - torch_threads))
    return depth


def task_threads(prefetch: int | None = None, cores: int | None = None, device=None) -> int:
    """Task threads a dask worker with ``cores`` cores needs to read ``prefetch`` blocks ahead while it computes one.

    By default (``prefetch`` None) a worker whose model runs on a CPU ``device`` with torch on all its
    cores (the even share workers get) reads nothing ahead: one task thread (the rule ``sync`` follows).
    """
    if prefetch is None:
        prefetch = default_prefetch(cores, device, torch_threads=cores)
    return 1 + prefetch


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


@contextlib.contextmanager
def spill_folder(prediction: str | os.PathLike) -> Iterator[Path]:
    """A folder beside ``prediction`` for the strips that wait a block row, removed with what is left in it.

    It is named as the guarded writer's temporaries (:func:`tilefuse.outputs.temporary_sibling`: hidden,
    naming this process), so one left by a killed run is removed by the next run of that store.
    """
    clean_stale(prediction)
    folder = temporary_sibling(prediction)
    folder.mkdir()
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _spill_path(spill: Path, block: Block, name: str) -> str | None:
    """Where piece ``name`` of ``block`` waits, for the pieces that wait a block row (None for the others)."""
    return str(spill / f"{block.row}-{block.col}-{name}") if name in ("down", "corner") else None


def _taken_up(spill: Path, block: Block) -> list[str]:
    """The spilled strips ``block``'s finish takes up (its upper and upper-left neighbours'): done with once it is written."""
    return [_spill_path(spill, source, name) for source, name in _sources(block) if name != "right"]


def _compute(job: BlockJob, source: ModelSource, block: Block) -> BlockSums:
    trim_memory()  # the previous block's arrays are gone by now
    return compute_block(job, block, load_runner(source))  # reads unlocked, runs under the device lock


def _piece(sums: BlockSums, name: str, path: str | None = None):
    """Piece ``name`` of a block's sums; a packed strip is saved to ``path`` (when given) and handed on as its file."""
    piece = getattr(sums, name)
    if path is not None and isinstance(piece, Strip):
        return piece.save(path)
    return piece


def _finish(job: BlockJob, block: Block, own: BlockOwn, up, left, up_left) -> int:
    finish_block(job, block, own, up, left, up_left)
    return own.tiles


def run_blocks(
    job: BlockJob,
    source: ModelSource,
    blocks: list[Block],
    pending: list[Block],
    client=None,
    progress: bool = True,
    window: int | None = None,
    *,
    prefetch: int | None = None,
    reader_threads: int | None = None,
) -> int:
    """Compute and write every pending block; returns the number of tiles run through the model.

    ``client`` None runs everything here, in order, with ``reader_threads``
    threads (default ``prefetch``) reading the next ``prefetch`` blocks ahead
    (default :func:`default_prefetch` for the model's device; 0 reads each block when its turn comes).
    Otherwise tasks go to the cluster with at most ``window`` blocks in flight
    (default: one per task thread of the workers; see the module docstring for
    how workers read ahead).
    """
    for name, value, least in (("prefetch", prefetch, 0), ("reader_threads", reader_threads, 1), ("window", window, 1)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < least):
            raise InputError(f"{name}= must be a whole number >= {least}, got {value!r}")
    steps = plan(blocks, pending)
    bar = tqdm(total=len(pending), unit="block", desc="predict", disable=not progress)
    try:
        with spill_folder(job.prediction) as spill:
            if client is None:
                return _run_here(job, source, steps, bar, spill, prefetch, reader_threads)
            return _run_on_cluster(job, source, steps, bar, spill, client, window)
    finally:
        bar.close()


def _written(bar, spill: Path, block: Block) -> None:
    """After ``block`` is written: count it, and delete the spilled strips it took up."""
    for path in _taken_up(spill, block):
        Path(path).unlink(missing_ok=True)
    bar.update()


def _run_here(
    job: BlockJob, source: ModelSource, steps: list[Step], bar, spill: Path, prefetch: int | None, reader_threads: int | None
) -> int:
    single_arena()  # the reader and writer threads below share one malloc arena (tilefuse.cluster.malloc)
    runner = load_runner(source)
    if prefetch is None:
        prefetch = default_prefetch(device=runner.device)
    reader_threads = reader_threads or max(1, prefetch)
    pieces: dict[tuple[Block, str], object] = {}
    reads: dict[int, object] = {}
    tiles = 0
    with contextlib.ExitStack() as stack:
        pool = writing = None
        if prefetch:
            pool = ThreadPoolExecutor(reader_threads, thread_name_prefix="tilefuse-read")
            # on an error: drop the reads not started, wait for the running ones (no thread outlives the run)
            stack.callback(pool.shutdown, wait=True, cancel_futures=True)
            # one block is finished and written while the next one computes
            writer = ThreadPoolExecutor(1, thread_name_prefix="tilefuse-write")
            stack.callback(writer.shutdown, wait=True)
        for index, step in enumerate(steps):
            if pool is None:
                inputs = read_block(job, step.block, runner.pin)
            else:
                for ahead in range(index, min(index + 1 + prefetch, len(steps))):
                    if ahead not in reads:
                        reads[ahead] = pool.submit(read_block, job, steps[ahead].block, runner.pin)
                inputs = reads.pop(index).result()  # a reader's InputError (damaged chunk) is raised here
            trim_memory()  # the previous block's arrays are gone by now
            with runner.lock:
                sums = run_block(job, inputs, runner)
            del inputs
            for name in step.keep:
                pieces[step.block, name] = _piece(sums, name, _spill_path(spill, step.block, name))
            del sums
            if step.finish:
                finish = (job, step.block, pieces.pop((step.block, "own")), *(pieces.pop(key, None) for key in _sources(step.block)))
                if writing is not None:
                    tiles += writing[0].result()
                    _written(bar, spill, writing[1])
                if pool is None:
                    tiles += _finish(*finish)
                    _written(bar, spill, step.block)
                else:
                    writing = writer.submit(_finish, *finish), step.block
                del finish
        if writing is not None:
            tiles += writing[0].result()
            _written(bar, spill, writing[1])
    return tiles


NO_WORKERS_NOTICE_S = 10.0
"""Seconds without a single worker before a run on a cluster says that it waits for workers."""


def _next_finished(finishing, client, bar, poll_s: float = 0.01):
    """The next finish task of ``finishing`` to complete and its result. A cluster left without workers (all died
    or were stopped) is said once, in a line, after :data:`NO_WORKERS_NOTICE_S`, while waiting for a task and
    while fetching its result (a result whose worker died is recomputed, which needs a worker): the tasks wait for
    workers, and without a word the run looked hung for ever. It goes on waiting (an adaptive cluster may be
    starting workers); an interrupt keeps the blocks written for a resume."""
    import time

    checked = empty_since = time.monotonic()
    said = False

    def check() -> None:
        nonlocal checked, empty_since, said
        now = time.monotonic()
        if now - checked < 1.0:
            return
        checked = now
        if client.scheduler_info(n_workers=-1)["workers"]:
            empty_since, said = now, False
        elif not said and now - empty_since >= NO_WORKERS_NOTICE_S:
            said = True
            bar.write(
                f"tilefuse: the dask cluster has had no worker for {now - empty_since:.0f} s (they died or were stopped): "
                "waiting for workers; start some, or stop with Ctrl-C and finish later with --resume",
                file=sys.stderr,
            )

    while not finishing.has_ready():
        time.sleep(poll_s)
        check()
    future = next(finishing)
    while True:
        try:
            return future, future.result(timeout=1.0)
        except TimeoutError:
            check()


def _run_on_cluster(job: BlockJob, source: ModelSource, steps: list[Step], bar, spill: Path, client, window: int | None) -> int:
    from distributed import as_completed

    if window is None:
        # one block per task thread (a worker reads nthreads - 1 blocks while it computes one) and one queued
        # per worker, so a worker never waits for the client to submit its next block
        workers = client.scheduler_info(n_workers=-1)["workers"].values()
        window = max(1, sum(int(info.get("nthreads", 1)) + 1 for info in workers))
    run = uuid.uuid4().hex[:8]
    pieces: dict[tuple[Block, str], object] = {}
    finishing = as_completed(loop=client.loop)  # this client's loop: the default client may be another one, closed before this run ends
    finished: dict[str, Block] = {}  # finish task key -> its block
    in_flight = 0
    tiles = 0

    def collect() -> None:
        nonlocal in_flight, tiles
        future, result = _next_finished(finishing, client, bar)
        tiles += result
        in_flight -= 1
        # deleted here, not in the task: dask may run a finish again (its worker died before the result
        # arrived), and only once the client holds the result is the strip no longer needed
        _written(bar, spill, finished.pop(future.key))

    try:
        for step in steps:
            r, c = step.block
            sums = client.submit(_compute, job, source, step.block, key=f"tilefuse-compute-{run}-{r}-{c}", retries=RETRIES)
            for name in step.keep:
                pieces[step.block, name] = client.submit(
                    _piece, sums, name, _spill_path(spill, step.block, name), key=f"tilefuse-{name}-{run}-{r}-{c}", priority=1, retries=RETRIES
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
                finished[future.key] = step.block
                in_flight += 1
            while in_flight >= window:
                collect()
        while in_flight:
            collect()
    except BaseException:
        client.cancel([*pieces.values(), *finishing.futures])
        raise
    return tiles
