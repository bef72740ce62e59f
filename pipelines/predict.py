"""``tilefuse predict``: scene store in, georeferenced prediction store out, on any dask cluster.

Python API: :func:`predict` returns the prediction as a lazy xarray Dataset
with CRS. Everything that can be checked before work starts (checkpoint,
modalities, tile geometry, output path, cluster) is checked first, so bad
input leaves nothing behind.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from tilefuse.errors import InputError
from tilefuse.outputs import holds_output

if TYPE_CHECKING:
    import xarray as xr

    from tilefuse.checkpoint import ModelConfig
    from tilefuse.tile_model import TileModelSpec

DEFAULT_TILE = 256


def inspect_checkpoint(path: str | Path) -> tuple["ModelConfig", "TileModelSpec", str]:
    """Config, tile-model spec and hash of a checkpoint, without loading its weights.

    The model is built on the meta device (no memory) and the weights file's
    header is checked against it, so a missing or unreadable checkpoint fails
    here, in one line, before any work starts.
    """
    import torch
    from safetensors import SafetensorError, safe_open

    from tilefuse.checkpoint import WEIGHTS, checkpoint_hash, read_config

    config = read_config(path)
    with torch.device("meta"):
        model = config.build()
    try:
        with safe_open(str(Path(path) / WEIGHTS), framework="pt") as weights:
            stored = {key: tuple(weights.get_slice(key).get_shape()) for key in weights.keys()}
    except (SafetensorError, OSError, ValueError) as error:
        raise InputError(f"checkpoint weights {Path(path) / WEIGHTS} are unreadable ({error}): retrain or restore them") from None
    wanted = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    if stored != wanted:
        differing = sorted(set(stored) ^ set(wanted)) or sorted(k for k in wanted if stored[k] != wanted[k])
        raise InputError(f"weights in {path} do not fit model {config.model!r} (first difference: {differing[0]})")
    return config, model.spec, checkpoint_hash(path)


def _band_stats(config: "ModelConfig", scene: "xr.Dataset") -> tuple[tuple, tuple]:
    """Per-modality (mean, std): the checkpoint's training statistics where it has them, else the store's."""
    import numpy as np

    from tilefuse.scene import band_stats

    means, stds = [], []
    for name, bands in config.modalities.items():
        stats = config.band_stats.get(name)
        if stats and len(stats.get("mean", [])) == bands and len(stats.get("std", [])) == bands:
            mean = np.asarray(stats["mean"], np.float32)
            std = np.asarray(stats["std"], np.float32)
            std = np.where(std > 0, std, 1.0)
        else:
            mean, std = band_stats(scene, name)
        means.append(tuple(float(v) for v in mean))
        stds.append(tuple(float(v) for v in std))
    return tuple(means), tuple(stds)


def _worker_device(source, tile_pixels: int, channels: int) -> tuple[str, int]:
    """(device type, batch size from free memory) of the worker this runs on."""
    import torch

    from tilefuse.inference import auto_batch_size

    device = torch.device(source.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        return "cpu-only", 0
    return device.type, auto_batch_size(tile_pixels, channels, device)


def _worker_kind(source) -> tuple[str, int]:
    """(device kind: ``cpu`` or ``cuda:<GPU name>``, this host's cores) of the worker this runs on."""
    import os

    import torch

    device = torch.device(source.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    kind = device.type
    if device.type == "cuda":
        try:
            kind = f"cuda:{torch.cuda.get_device_name(device)}"
        except (AssertionError, RuntimeError, ValueError):  # no such GPU: _worker_device says so in one line
            kind = "cuda:none"
    return kind, os.cpu_count() or 1


@holds_output("out", inputs=("store", "checkpoint"))  # one writer per prediction store, across every block
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
    same whatever the block size, batch size (>= 2), worker count or retries,
    given the same device kind and threads per worker. Both are recorded in
    the store's attrs (``device_kind``, ``torch_threads``) and a ``resume``
    that would use others is refused. ``listen`` is the host a cluster started
    here listens on (default loopback), ``connect_timeout`` bounds connecting
    to an existing one (seconds). Returns the prediction lazily, with CRS.
    """
    import torch

    from tilefuse.blending import WINDOWS
    from tilefuse.classes import default_class_name
    from tilefuse.cluster.blocks import run_blocks
    from tilefuse.cluster.client import CONNECT_TIMEOUT, LOOPBACK, cluster_client, dashboard_link, workers_per_host
    from tilefuse.cluster.plugin import ModelPlugin, ModelSource, unset_malloc_trim
    from tilefuse.grid import TileGrid
    from tilefuse.inference import PRECISIONS, BlockJob
    from tilefuse.prediction import (
        PROBS_DTYPES,
        check_resumable,
        create_prediction,
        mark_complete,
        open_prediction,
        pending_blocks,
        prediction_attrs,
    )
    from tilefuse.scene import SHARD, open_scene, require_modalities
    from tilefuse.tile_model import available_models
    from tilefuse.training import check_device

    started = time.perf_counter()
    store, out = Path(store), Path(out)
    if blend not in WINDOWS:
        raise InputError(f"unknown --blend {blend!r}: choose one of {', '.join(WINDOWS)}")
    if precision not in PRECISIONS:
        raise InputError(f"unknown --precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    probs_dtype = ("uint8" if probs is True else probs) or None
    if probs_dtype is not None and probs_dtype not in PROBS_DTYPES:
        raise InputError(f"unknown probs dtype {probs_dtype!r}: choose one of {', '.join(PROBS_DTYPES)}")
    for name, value in (("tile", tile), ("batch_size", batch_size), ("block_size", block_size), ("torch_threads", torch_threads)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise InputError(f"{name}= (--{name.replace('_', '-')}) must be a whole number >= 1, got {value!r}")
    if overlap is not None and (isinstance(overlap, bool) or not isinstance(overlap, int) or not 0 <= overlap < tile):
        raise InputError(f"overlap= (--overlap) must be a whole number of px in 0..{tile - 1} (below the tile), got {overlap!r}")
    check_device(device)
    from tilefuse.outputs import claim, clean_stale

    claim(out, "prediction", inputs=[store, checkpoint], overwrite=overwrite, exist_ok=resume)
    if quicklook is not None:
        claim(quicklook, "png", inputs=[store, checkpoint, out], overwrite=True, what="quicklook")
    clean_stale(out)

    config, spec, digest = inspect_checkpoint(checkpoint)
    scene = open_scene(store)
    require_modalities(scene, config.modalities, where=str(store))
    if overlap is None:
        overlap = tile // 4 if spec.blend else 0
    if not spec.blend and overlap:
        raise InputError(f"model {config.model!r} does not blend its tiles (each pixel is computed once): use --overlap 0")
    window = blend if spec.blend else "none"

    existing = prediction_attrs(out) if out.exists() and resume else None
    if block_size is None:
        block_size = int(existing["block_size"]) if existing else SHARD
    if block_size < 1:
        raise InputError(f"--block-size must be >= 1, got {block_size}")
    grid = TileGrid(scene.sizes["y"], scene.sizes["x"], tile, overlap, spec.margin, block_size)
    class_names = list(config.class_names) or [default_class_name(k) for k in range(spec.num_classes)]
    if len(class_names) != spec.num_classes:
        raise InputError(f"checkpoint {checkpoint} names {len(class_names)} classes but its model has {spec.num_classes}")
    settings = {
        "model": config.model,
        "checkpoint_hash": digest,
        "tile": tile,
        "overlap": overlap,
        "margin": spec.margin,
        "blend": window,
        "block_size": block_size,
        "probs": probs_dtype or "none",
        "height": grid.height,
        "width": grid.width,
    }
    if existing:
        check_resumable(out, settings)  # the settings; device kind and threads once the cluster is known
    elif out.exists() and not overwrite:
        raise InputError(f"{out} already exists: pass --overwrite to replace it or --resume to finish it")
    mean, std = _band_stats(config, scene)
    channels = sum(config.modalities.values())

    builder = available_models()[config.model].builder
    if getattr(builder, "__module__", "").startswith("tilefuse.models"):
        builder = None  # workers find built-in models in their own registry
    source = ModelSource(
        str(Path(checkpoint).resolve()), digest, config.model, device, precision, torch_threads, builder=builder
    )
    with cluster_client(cluster, timeout=CONNECT_TIMEOUT if connect_timeout is None else connect_timeout, listen=listen or LOOPBACK) as client:
        if client is None:
            kind, _ = _worker_kind(source)
            kinds_cores = {"sync": (kind, None)}
        else:
            hosts = workers_per_host(client)
            if not hosts:
                raise InputError(f"the dask cluster {cluster!r} has no workers: start some (dask worker ...)")
            kinds_cores = client.run(_worker_kind, source)
        device_kind = ",".join(sorted({kind for kind, _ in kinds_cores.values()}))
        if torch_threads is None:
            # one count for every worker (an even share of its host's cores, the smallest), so it can be recorded
            if client is None:
                threads_used = torch.get_num_threads()
            else:
                threads_used = min(
                    max(1, cores // hosts[address.split("://")[-1].rsplit(":", 1)[0]])
                    for address, (_, cores) in kinds_cores.items()
                )
            from dataclasses import replace

            source = replace(source, torch_threads=threads_used)
        else:
            threads_used = torch_threads
        settings.update(device_kind=device_kind, torch_threads=threads_used, torch_version=torch.__version__)
        if existing:
            check_resumable(out, settings)
        if client is not None:
            if unset_malloc_trim(client) and progress:
                print("tilefuse: restarted workers without MALLOC_TRIM_THRESHOLD_ (it halves torch's CPU speed)", file=sys.stderr)
            client.register_plugin(ModelPlugin(source, hosts), name=f"tilefuse-model-{source.key}")
            link = dashboard_link(client)
            if progress:
                print(f"tilefuse: dask dashboard at {link}" if link else "tilefuse: no dask dashboard (install bokeh)", file=sys.stderr)
        tile_pixels = (tile + 2 * spec.margin) ** 2
        if client is None:
            devices = [_worker_device(source, tile_pixels, channels)]
        else:
            devices = list(client.run(_worker_device, source, tile_pixels, channels).values())
        kinds = {kind for kind, _ in devices}
        if "cpu-only" in kinds:
            raise InputError(f"--device {device} asks for a GPU but {'a worker has' if client else 'this machine has'} none")
        if precision == "fp16" and kinds != {"cuda"}:
            raise InputError("fp16 autocast needs a GPU on every worker: use --precision bf16 or fp32")
        if batch_size is None:
            batch_size = min(size for _, size in devices)

        if existing is None:
            create_prediction(
                out,
                scene,
                grid,
                class_names=class_names,
                attrs={**settings, "scene": str(store.resolve()), "checkpoint": str(Path(checkpoint).resolve())},
                probs=probs_dtype,
                overwrite=overwrite,
                inputs=[store, checkpoint],
            )
        pending = pending_blocks(out, grid)
        job = BlockJob(
            scene=str(store.resolve()),
            prediction=str(out.resolve()),
            grid=grid,
            modalities=tuple(config.modalities),
            band_mean=mean,
            band_std=std,
            num_classes=spec.num_classes,
            batch_size=batch_size,
            blend=window,
            probs=probs_dtype,
        )
        threads = torch.get_num_threads()
        try:
            tiles = run_blocks(job, source, grid.blocks(), pending, client=client, progress=progress) if pending else 0
        finally:
            torch.set_num_threads(threads)  # sync runs set this process's torch threads
    mark_complete(out)
    if progress:
        seconds = time.perf_counter() - started
        print(
            f"tilefuse: wrote {out} ({grid.height} x {grid.width} px, {len(pending)} blocks, "
            f"{tiles} of {grid.num_tiles} tiles run, batch {batch_size}) in {seconds:.1f} s",
            file=sys.stderr,
        )
    prediction = open_prediction(out)
    if quicklook is not None:
        from tilefuse.quicklook import quicklook_labels

        quicklook_labels(
            prediction["labels"], class_names, quicklook, title=f"{config.model} prediction of {store.name}", inputs=[store, checkpoint, out]
        )
    return prediction


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
    resume: Annotated[bool, typer.Option("--resume", help="Finish an interrupted prediction: only unfinished blocks run.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing prediction store.")] = False,
    quicklook: Annotated[Optional[Path], typer.Option(help="Also write a quicklook PNG of the labels here.")] = None,
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
        resume=resume,
        overwrite=overwrite,
        quicklook=quicklook,
        listen=listen,
        connect_timeout=connect_timeout,
    )
