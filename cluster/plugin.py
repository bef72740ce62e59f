"""One resident model per worker: a ``distributed.WorkerPlugin`` and the lookup tasks use.

Tasks carry a :class:`ModelSource` (a checkpoint path, its hash and device
options: a few hundred bytes), never a model. The plugin loads the checkpoint
once when a worker starts (and again on a restarted worker); :func:`load_runner`
returns that worker's runner, loading it on first use where no plugin ran
(the in-process ``sync`` mode loads it before the store is created,
:meth:`tilefuse.cluster.run.ClusterRun.start`).

A model that cannot load for bad input fails the plugin's setup: the error goes
back to the client (``register_plugin``), whose run ends in one line. Workers
started here (``local:N``) also drop dask's "failed to setup" report of it
(:func:`quiet_refused_setup`), which shared the run's stderr; a borrowed
cluster's workers log it as usual.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping

from distributed import WorkerPlugin

from tilefuse.cluster.malloc import single_arena

_RUNNERS: dict[str, tuple[Any, int | None]] = {}
"""key -> (runner, torch threads it was loaded with) in this process."""
_LOCK = threading.Lock()


@dataclass(frozen=True)
class ModelSource:
    """Where a worker gets its model: a checkpoint directory (on storage every worker can read)."""

    checkpoint: str
    checkpoint_hash: str
    model: str
    """Registered model name in the checkpoint's config."""
    device: str | None = None
    """torch device; None: the worker's GPU where it has one, else the CPU."""
    precision: str = "fp32"
    """fp32, or bf16/fp16 autocast."""
    torch_threads: int | None = None
    """torch intra-op threads per worker; None: an even share of the host's cores on a cluster, torch's
    default in-process. Results are bitwise reproducible for a given thread count (kernels split work by it)."""
    builder: Callable[..., Any] | None = field(default=None, compare=False)
    """The model's builder, shipped so workers can build models registered only in the client
    process (a notebook, a test module); pickled by reference where importable."""
    channels_last: bool = False
    """Feed the model NHWC tensors (see :class:`tilefuse.inference.TileRunner`)."""
    compile: bool = False
    """Wrap the model in ``torch.compile`` (compiles once per worker, on the first batch)."""

    @property
    def key(self) -> str:
        options = "".join(flag for flag, on in (("-cl", self.channels_last), ("-compiled", self.compile)) if on)
        return f"{self.checkpoint_hash[:16]}-{self.device or 'auto'}-{self.precision}{options}"


def load_runner(source: ModelSource):
    """This process's :class:`tilefuse.inference.TileRunner` for ``source``, loading the checkpoint once.

    Also sets torch's threads in the calling thread: OpenMP keeps the thread
    count per thread, and dask runs tasks in other threads than the plugin's.
    """
    import torch

    with _LOCK:
        entry = _RUNNERS.get(source.key)
        if entry is None:
            from tilefuse.checkpoint import load_checkpoint
            from tilefuse.inference import TileRunner
            from tilefuse.tile_model import available_models, register_model

            if source.builder is not None and source.model not in available_models():
                register_model(source.model)(source.builder)
            device = source.device or ("cuda" if torch.cuda.is_available() else "cpu")
            model, _ = load_checkpoint(source.checkpoint, device=device, expect_hash=source.checkpoint_hash)  # the one the run records
            runner = TileRunner(
                model, device=device, precision=source.precision, channels_last=source.channels_last, compile=source.compile
            )
            entry = _RUNNERS[source.key] = (runner, source.torch_threads)
        runner, threads = entry
        if source.torch_threads:  # the latest explicit setting wins, for later tasks too
            threads = source.torch_threads
            _RUNNERS[source.key] = (runner, threads)
        if threads and torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        return runner


def release_runner(source: ModelSource) -> None:
    """Drop this process's runner for ``source`` (frees its memory)."""
    with _LOCK:
        _RUNNERS.pop(source.key, None)


class _ExpectedFailures(logging.Filter):
    """Drops dask's "Compute Failed" report (a traceback per try) of a tilefuse task that failed on bad input.

    An :class:`~tilefuse.errors.InputError` (a damaged chunk, say) or a full, read-only or over-quota disk
    reaches the client, which ends in one line naming it; workers started here (``local:N``) share its
    stderr, where these reports were dozens of lines around that one. Other failures are still reported.
    Also dropped: the "Async instruction for <Task cancelled name=\"execute('tilefuse-...')\"> ended with
    CancelledError" of a tilefuse task cancelled by an interrupted run (Ctrl-C, SIGTERM).
    """

    def filter(self, record: logging.LogRecord) -> bool:
        from tilefuse.outputs import filesystem_reason

        text = str(record.msg)
        if text.startswith("Async instruction for") and "execute('tilefuse-" in text and text.endswith("ended with CancelledError"):
            return False
        if not (str(record.msg).startswith("Compute Failed") and isinstance(record.args, tuple) and len(record.args) >= 4):
            return True
        key, text = str(record.args[0]), str(record.args[3])
        if not key.startswith("tilefuse-"):
            return True
        return not (text.startswith("InputError(") or filesystem_reason(RuntimeError(text)) is not None)


class _ReportedHere(logging.Filter):
    """Drops what a run says itself, from the scheduler and nannies of a cluster started here (``local:N``: they
    run in this process and log on its stderr, around the run's one line): the scheduler's "Task ... marked as
    failed because N workers died" of a tilefuse task (the run names its block,
    :func:`tilefuse.cluster.run.cluster_failure`), and a nanny's "Worker process still alive after 4.0 seconds,
    killing" while an interrupted run (Ctrl-C, SIGTERM) closes its cluster; and a client's reports of its scheduler
    lost mid-run (tracebacks of the closed connection, "Failed to reconnect ... closing client"), which the run
    names in its one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        text = str(record.msg)
        if text.startswith("Task %s marked as failed because") and args and str(args[0]).startswith("tilefuse-"):
            return False
        if record.name == "distributed.client" and (text.startswith("Failed to reconnect to scheduler") or _connection_lost(record)):
            return False  # the scheduler lost mid-run: the run says so in its one line, naming --resume
        return not text.startswith("Worker process still alive after")


def _connection_lost(record: logging.LogRecord) -> bool:
    """A client's report (with traceback) of its scheduler connection closing or refused, or of what that cancelled."""
    import asyncio

    from distributed.comm import CommClosedError

    error = record.exc_info[1] if record.exc_info else None
    return isinstance(error, (CommClosedError, ConnectionError, asyncio.CancelledError))


@contextlib.contextmanager
def quiet_reported_here() -> Iterator[None]:
    """:class:`_ReportedHere` on this process's ``distributed.scheduler``, ``distributed.nanny`` and
    ``distributed.client`` loggers for the block."""
    loggers, quiet = [logging.getLogger(f"distributed.{name}") for name in ("scheduler", "nanny", "client")], _ReportedHere()
    for logger in loggers:
        logger.addFilter(quiet)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(quiet)


class _RefusedSetup(logging.Filter):
    """Drops a worker's "Worker plugin tilefuse-model-... failed to setup" report (with its traceback) of a model
    that could not load for bad input: an :class:`~tilefuse.errors.InputError` (the checkpoint rewritten since the
    run recorded its hash, say) or a full, read-only or over-quota disk. The error goes back to the client, whose
    run ends in one line naming it; the workers of a cluster started here (``local:N``) share its stderr, where
    this was a traceback per worker around that line. Other failures are still reported."""

    def filter(self, record: logging.LogRecord) -> bool:
        from tilefuse.errors import InputError
        from tilefuse.outputs import filesystem_reason

        args = record.args if isinstance(record.args, tuple) else ()
        if not (str(record.msg).startswith("Worker plugin %s failed to setup") and args and str(args[0]).startswith("tilefuse-model-")):
            return True
        error = record.exc_info[1] if record.exc_info else None
        return not (isinstance(error, InputError) or (error is not None and filesystem_reason(error) is not None))


def quiet_refused_setup() -> None:
    """Install :class:`_RefusedSetup` on this process's ``distributed.worker`` logger (once): for the workers of a
    cluster started here (:func:`tilefuse.cluster.client.dask_setup`); a borrowed cluster's worker logs keep it."""
    logger = logging.getLogger("distributed.worker")
    if not any(isinstance(f, _RefusedSetup) for f in logger.filters):
        logger.addFilter(_RefusedSetup())


def quiet_expected_failures() -> None:
    """Install :class:`_ExpectedFailures` on this worker's ``distributed.worker`` loggers (once)."""
    for name in ("distributed.worker", "distributed.worker.state_machine"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _ExpectedFailures) for f in logger.filters):
            logger.addFilter(_ExpectedFailures())


class ModelPlugin(WorkerPlugin):
    """Loads a checkpoint once per worker, onto that worker's device.

    ``workers_per_host`` (host -> worker count) sets torch threads to an even
    share of each host's cores when ``source.torch_threads`` is not given.
    """

    def __init__(self, source: ModelSource, workers_per_host: Mapping[str, int] | None = None) -> None:
        self.source = source
        self.workers_per_host = dict(workers_per_host or {})
        self.name = f"tilefuse-model-{source.key}"

    def setup(self, worker) -> None:
        source = self.source
        if source.torch_threads is None and self.workers_per_host:
            host = worker.address.split("://")[-1].rsplit(":", 1)[0]
            share = self.workers_per_host.get(host)
            if share:
                from dataclasses import replace

                source = replace(source, torch_threads=max(1, (os.cpu_count() or 1) // share))
        single_arena()  # before the task and zarr threads allocate (tilefuse.cluster.malloc)
        quiet_expected_failures()
        load_runner(source)

    def teardown(self, worker) -> None:
        release_runner(self.source)
