"""``tilefuse predict``: scene store in, georeferenced prediction store out, on any dask cluster.

Python API: :func:`predict` returns the prediction as a lazy xarray Dataset
with CRS. The CLI and the API resolve their options into
:class:`tilefuse.cluster.run.PredictOptions` and call one engine function,
:func:`tilefuse.cluster.run.predict_scene`, which checks everything that can
be checked before work starts (checkpoint, modalities, tile geometry, output
path, cluster, workers' devices), so bad input leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Iterator, Optional

import typer

from tilefuse.cluster.run import DEFAULT_TILE
from tilefuse.errors import InputError, printable

if TYPE_CHECKING:
    import xarray as xr


def predict(
    checkpoint: str | Path,
    store: str | Path,
    out: str | Path,
    *,
    tile: int = DEFAULT_TILE,
    overlap: int | None = None,
    blend: str = "gaussian",
    batch_size: int | None = None,
    block_size: int | None = None,
    probs: bool | str = False,
    cluster: Any = "sync",
    device: str | None = None,
    precision: str = "fp32",
    torch_threads: int | None = None,
    channels_last: bool = False,
    compile: bool = False,
    prefetch: int | None = None,
    reader_threads: int | None = None,
    resume: bool = False,
    overwrite: bool = False,
    quicklook: str | Path | None = None,
    listen: str | None = None,
    connect_timeout: float | None = None,
    progress: bool = True,
) -> "xr.Dataset":
    """Predict every pixel of scene ``store`` with checkpoint ``checkpoint`` into prediction store ``out``.

    Tiles of ``tile`` px overlap by ``overlap`` px (default a quarter tile for
    blending models, 0 for models that do not blend) and are blended with the
    ``blend`` window. ``block_size`` px output blocks (default 2048, the shard
    edge) are the unit of work, memory, writing and ``resume``. ``probs`` adds
    class probabilities (True: uint8-quantised, or a dtype name). ``cluster``
    is a spec (sync, local:N, cuda, tcp://..., scheduler file) or an existing
    ``distributed.Client``. ``torch_threads`` fixes torch's threads per worker
    (default: an even share of each host's cores); the output is bitwise the
    same whatever the block size, worker count or retries, given the same
    device kind, threads per worker and ``batch_size``. They are recorded in
    the store's attrs (``device_kind``, ``torch_threads``, ``batch_size``) and a
    ``resume`` that would use others is refused (without ``batch_size`` it takes
    the store's); so are ``precision``, ``channels_last`` (NHWC model inputs)
    and ``compile`` (``torch.compile`` on each worker).
    ``prefetch`` blocks are read ahead while the model runs (by ``reader_threads``
    threads in-process; workers started here get ``1 + prefetch`` task threads):
    neither changes the output. ``listen`` is the host a cluster started
    here listens on (default loopback), ``connect_timeout`` bounds connecting
    to an existing one (seconds). Returns the prediction lazily, with CRS.
    """
    from tilefuse.cluster.run import PredictOptions, predict_scene
    from tilefuse.signals import terminating
    from tilefuse.outputs import claim, local_path, os_errors_as_input, output_lock
    from tilefuse.prediction import open_prediction, store_path

    store = store_path(store, "store", "scene")  # a path, or the Dataset open_scene returned
    checkpoint, out = local_path(checkpoint, "checkpoint"), local_path(out, "out", output=True)  # ~ is the home folder
    quicklook = None if quicklook is None else local_path(quicklook, "quicklook", output=True, file=True)
    options = PredictOptions(
        tile=tile,
        overlap=overlap,
        blend=blend,
        batch_size=batch_size,
        block_size=block_size,
        probs=("uint8" if probs is True else probs) or None,
        device=device,
        precision=precision,
        torch_threads=torch_threads,
        resume=resume,
        overwrite=overwrite,
        channels_last=channels_last,
        compile=compile,
        prefetch=prefetch,
        reader_threads=reader_threads,
    )  # checked by predict_scene, before anything is written
    # one writer per prediction store, across every block; a full or read-only disk anywhere is one line;
    # SIGTERM (a batch system's cancel or time limit) unwinds: lock released, cluster closed, blocks kept for a resume
    stopped = f"stopped by SIGTERM: {out} keeps the blocks written so far; finish it with --resume (Python: resume=True)"
    with terminating(stopped), output_lock(out, inputs=[store, checkpoint]), os_errors_as_input(out, storage_only=True):
        if quicklook is not None:
            claim(quicklook, "png", inputs=[store, checkpoint, out], overwrite=True, what="quicklook")
        with _kept_on_full_disk(out):
            report = predict_scene(checkpoint, store, out, options, cluster=cluster, listen=listen, connect_timeout=connect_timeout, progress=progress)
        prediction = open_prediction(out)  # first: a store it cannot open is not reported as written
        if progress:
            print(printable(f"tilefuse: {report}"), file=sys.stderr)
        if quicklook is not None:
            from tilefuse.quicklook import quicklook_labels

            title = f"{prediction.attrs['model']} prediction of {Path(store).name}"
            quicklook_labels(prediction["labels"], prediction["labels"].attrs["class_names"], quicklook, title=title, inputs=[store, checkpoint, out])
    return prediction


@contextlib.contextmanager
def _kept_on_full_disk(out: Path) -> Iterator[None]:
    """A full disk or quota while prediction store ``out`` is written: one line saying that the store keeps the blocks
    written so far and that ``--resume`` finishes it once space is freed. Where no store was made yet, and for other
    refusals of the filesystem, the caller's :func:`tilefuse.outputs.os_errors_as_input` gives the line."""
    from tilefuse.outputs import filesystem_reason, found_kind, write_error

    try:
        yield
    except Exception as error:
        codes = frozenset(getattr(errno, name) for name in ("ENOSPC", "EDQUOT") if hasattr(errno, name))
        reason = filesystem_reason(error, codes)
        if reason not in {os.strerror(code) for code in codes} or found_kind(out) != "prediction":
            raise
        raise InputError(write_error(out, reason, kept=f"{out} keeps the blocks written so far")) from None


def predict_command(
    checkpoint: Annotated[Path, typer.Option("--checkpoint", help="Checkpoint directory (from `tilefuse train`).")],
    store: Annotated[Path, typer.Option("--store", help="Scene store to predict (from `tilefuse ingest` or `synth`).")],
    out: Annotated[Path, typer.Option("--out", help="Prediction store to write (zarr).")],
    tile: Annotated[int, typer.Option(help="Tile edge in output pixels.")] = DEFAULT_TILE,
    overlap: Annotated[
        Optional[int], typer.Option(help="Overlap of neighbouring tiles in px (default: tile/4; 0 for models that do not blend).")
    ] = None,
    blend: Annotated[str, typer.Option(help="Blending window: gaussian, hann, cosine or constant.")] = "gaussian",
    batch_size: Annotated[Optional[int], typer.Option(help="Tiles per model call (default: from free memory).")] = None,
    block_size: Annotated[
        Optional[int], typer.Option(help="Output block edge in px: unit of work, memory and resume (default: 2048, or the store's on --resume).")
    ] = None,
    probs: Annotated[bool, typer.Option("--probs", help="Also write class probabilities.")] = False,
    probs_dtype: Annotated[str, typer.Option(help="dtype of --probs: uint8 (quantised), float16 or float32.")] = "uint8",
    cluster: Annotated[str, typer.Option(help="sync, local:N, cuda, tcp://HOST:PORT or a scheduler file.")] = "sync",
    device: Annotated[Optional[str], typer.Option(help="torch device on each worker (default: its GPU if any, else cpu).")] = None,
    precision: Annotated[str, typer.Option(help="fp32, or bf16/fp16 autocast.")] = "fp32",
    torch_threads: Annotated[
        Optional[int], typer.Option(help="torch threads per worker (default: an even share of the cores; fix it for bitwise-reproducible output).")
    ] = None,
    channels_last: Annotated[bool, typer.Option("--channels-last", help="Feed the model NHWC tensors (often faster on GPUs).")] = False,
    compile: Annotated[bool, typer.Option("--compile", help="torch.compile the model on each worker (compiles on the first batch).")] = False,
    prefetch: Annotated[
        Optional[int], typer.Option(help="Blocks read ahead while the model runs (0: none; default: 1 per 4 cores of a worker, at most 4).")
    ] = None,
    reader_threads: Annotated[Optional[int], typer.Option(help="Threads reading ahead with --cluster sync (default: --prefetch).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Finish an interrupted prediction: only unfinished blocks run.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing prediction store.")] = False,
    quicklook: Annotated[Optional[str], typer.Option(help="Also write a quicklook PNG of the labels here.", show_default=False)] = None,
    listen: Annotated[
        Optional[str], typer.Option(help="Host that local:N/cuda clusters (scheduler, workers, dashboard) listen on [127.0.0.1; 0.0.0.0 exposes them].")
    ] = None,
    connect_timeout: Annotated[Optional[float], typer.Option(help="Seconds to reach an existing scheduler (tcp://, scheduler file) [10].")] = None,
) -> None:
    """Run a trained model over a whole scene store: overlap-blended tiles, blocks on a dask cluster."""
    predict(
        checkpoint,
        store,
        out,
        tile=tile,
        overlap=overlap,
        blend=blend,
        batch_size=batch_size,
        block_size=block_size,
        probs=probs_dtype if probs else False,
        cluster=cluster,
        device=device,
        precision=precision,
        torch_threads=torch_threads,
        channels_last=channels_last,
        compile=compile,
        prefetch=prefetch,
        reader_threads=reader_threads,
        resume=resume,
        overwrite=overwrite,
        quicklook=quicklook,
        listen=listen,
        connect_timeout=connect_timeout,
    )
