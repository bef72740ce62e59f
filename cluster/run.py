"""One owner for a prediction run: options, checks, cluster, determinism record, blocks.

:func:`predict_scene` is the engine behind ``tilefuse predict`` and
:func:`tilefuse.predict` (both only resolve options and call it):

1. :func:`plan_prediction` checks everything that needs no worker: options
   (:meth:`PredictOptions.check`, once), the output path, the checkpoint (its
   weights' header, without loading them), the scene's modalities and band order
   (:func:`check_band_order`), the tile geometry and, on ``resume``, the store's
   settings; it writes nothing;
2. :class:`ClusterRun` owns the cluster side: it opens the client (or borrows
   the caller's, or none for ``sync``) and closes what it opened;
   :meth:`ClusterRun.prepare` probes every worker's device kind, cores and
   free memory in one call, fixes torch's threads per worker, checks the
   :data:`tilefuse.prediction.DETERMINISM` record against a resumed store,
   loads the model on the workers and only then creates the store (bad input
   leaves nothing behind) and finds the pending blocks;
3. :meth:`ClusterRun.run` runs them (:func:`tilefuse.cluster.blocks.run_blocks`),
   and the store is marked complete.

Nothing here is O(pixels): planning a 10^5 x 10^5 px scene touches its
metadata, coordinates and one manifest entry per block
(``tests/test_country_scale.py``).
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from tilefuse.errors import InputError, printable

if TYPE_CHECKING:
    import xarray as xr

    from tilefuse.checkpoint import ModelConfig
    from tilefuse.cluster.plugin import ModelSource
    from tilefuse.grid import Block, TileGrid
    from tilefuse.inference import BlockJob
    from tilefuse.tile_model import TileModelSpec

DEFAULT_TILE = 256
MAX_BLOCK = 32768
"""Largest block (and so tile) edge in px: a block's input window is held in memory (32,768^2 px of 5 float32
bands is 21 GB), and larger values are typos that failed deep in zarr or torch."""
MIN_STRIDE = 8
"""Smallest step between tiles (tile - overlap) in px: each tile is a model call (or a share of a batch) for
(tile - overlap)^2 new pixels, so --tile 1 (or --overlap tile-1) made one call per pixel or worse: 4 million tiles
per 2,048 px block, a 512^2 px scene not done in hours where 256 px tiles take seconds."""
MAX_READ_AHEAD = 16
"""Most blocks read ahead (``prefetch``): each holds its input window (about 110 MB at 2,048 px and 5 bands),
and workers get a task thread per block read ahead."""


def _whole(name: str, value: Any, low: int = 1, high: int | None = None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high)):
        bounds = f">= {low}" if high is None else f"in {low}..{high}"
        raise InputError(f"{name}= (--{name.replace('_', '-')}) must be a whole number {bounds}, got {value!r}")


@dataclass(frozen=True)
class PredictOptions:
    """How a scene is predicted: tiles, blocks, outputs and the worker's model settings (None: a default)."""

    tile: int = DEFAULT_TILE
    overlap: int | None = None
    """px; None: a quarter tile for blending models, 0 for the others."""
    blend: str = "gaussian"
    batch_size: int | None = None
    """None: from the workers' free memory; never more than the tiles of one block (:attr:`TileGrid.tiles_per_block`)."""
    block_size: int | None = None
    """None: :data:`tilefuse.scene.SHARD`, or the store's on ``resume``."""
    probs: str | None = None
    """dtype of the ``probs`` output (:data:`tilefuse.prediction.PROBS_DTYPES`), None for labels only."""
    device: str | None = None
    precision: str = "fp32"
    torch_threads: int | None = None
    """None: an even share of each host's cores per worker (this process's torch threads for ``sync``)."""
    resume: bool = False
    overwrite: bool = False
    channels_last: bool = False
    """Feed the model NHWC tensors (may change the last bits: recorded, and a resume must match)."""
    compile: bool = False
    """``torch.compile`` the model on each worker (likewise recorded)."""
    prefetch: int | None = None
    """Blocks whose inputs are read ahead while the model runs (0: none); None:
    :func:`tilefuse.cluster.blocks.default_prefetch` (none where the model runs on a CPU whose cores torch
    takes). Workers started here get ``1 + prefetch`` task threads (:func:`tilefuse.cluster.blocks.task_threads`)."""
    reader_threads: int | None = None
    """``sync``: threads reading ahead (None: ``prefetch``). Neither changes a bit of the output."""

    def check(self) -> "PredictOptions":
        """Refuse values no run can use, in one line naming the parameter; returns self."""
        from tilefuse.blending import WINDOWS
        from tilefuse.inference import PRECISIONS
        from tilefuse.prediction import PROBS_DTYPES
        from tilefuse.training import check_device

        if self.blend not in WINDOWS:
            raise InputError(f"unknown blend= (--blend) {self.blend!r}: choose one of {', '.join(WINDOWS)}")
        if self.precision not in PRECISIONS:
            raise InputError(f"unknown precision= (--precision) {self.precision!r}: choose one of {', '.join(PRECISIONS)}")
        if self.probs is not None and self.probs not in PROBS_DTYPES:
            raise InputError(f"unknown probs dtype {self.probs!r}: choose one of {', '.join(PROBS_DTYPES)}")
        from tilefuse.training import MAX_THREADS

        _whole("batch_size", self.batch_size)
        for name in ("tile", "block_size"):
            _whole(name, getattr(self, name), high=MAX_BLOCK)
        for name in ("torch_threads", "reader_threads"):
            _whole(name, getattr(self, name), high=MAX_THREADS)
        _whole("prefetch", self.prefetch, low=0, high=MAX_READ_AHEAD)
        for name in ("channels_last", "compile", "resume", "overwrite"):
            if not isinstance(getattr(self, name), bool):
                raise InputError(f"{name}= must be True or False, got {getattr(self, name)!r}")
        if self.resume and self.overwrite:  # the store would be resumed, overwrite ignored
            raise InputError("resume=True (--resume) and overwrite=True (--overwrite) contradict each other: pass one")
        overlap = self.overlap
        if overlap is not None and (isinstance(overlap, bool) or not isinstance(overlap, int) or not 0 <= overlap < self.tile):
            raise InputError(f"overlap= (--overlap) must be a whole number of px in 0..{self.tile - 1} (below the tile), got {overlap!r}")
        check_device(self.device)
        return self


def inspect_checkpoint(path: str | Path) -> tuple["ModelConfig", "TileModelSpec", str]:
    """Config, tile-model spec and hash of a checkpoint, without loading its weights.

    The model is built on the meta device (no memory) and the weights file's
    header is checked against it, so a missing or unreadable checkpoint fails
    here, in one line, before any work starts.
    """
    import torch
    from safetensors import SafetensorError, safe_open

    from tilefuse.checkpoint import WEIGHTS, read_checkpoint

    config, digest = read_checkpoint(path)  # one version of it, whole, even while a training run replaces it
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
    return config, model.spec, digest


def _band_stats(config: "ModelConfig", scene: "xr.Dataset") -> tuple[tuple, tuple]:
    """Per-modality (mean, std): the checkpoint's training statistics, or the store's for a checkpoint that has none
    (a wrapped model saved without them). One that has them for some modalities only is refused: normalising the
    others by another store's statistics would give plausible, wrong labels."""
    import numpy as np

    from tilefuse.scene import band_stats

    missing = [name for name in config.modalities if config.band_stats and name not in config.band_stats]
    if missing:
        raise InputError(
            f"the checkpoint has band statistics for {', '.join(sorted(config.band_stats))} but not for {', '.join(missing)}: "
            "its config.json is damaged or edited; retrain or restore it"
        )
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


@dataclass
class PredictionPlan:
    """Everything a run needs that is known before any worker is asked: checked, nothing written yet."""

    store: Path
    out: Path
    checkpoint: Path
    options: PredictOptions
    """With ``overlap`` and ``block_size`` resolved."""
    config: "ModelConfig"
    spec: "TileModelSpec"
    grid: "TileGrid"
    class_names: list[str]
    settings: dict[str, Any]
    """The store's :data:`tilefuse.prediction.SETTINGS` (the determinism record is added by :class:`ClusterRun`)."""
    existing: dict[str, Any] | None
    """The attrs of the store a ``resume`` continues, None for a new store."""
    source: "ModelSource"
    band_mean: tuple
    band_std: tuple
    scene: "xr.Dataset" = field(repr=False)
    scene_id: tuple[int, int] | None = None
    """:func:`tilefuse.inference.scene_identity` of the scene store (:attr:`tilefuse.inference.BlockJob.scene_id`)."""

    @property
    def channels(self) -> int:
        return sum(self.config.modalities.values())

    @property
    def tile_pixels(self) -> int:
        return (self.grid.tile + 2 * self.grid.margin) ** 2

    def job(self, batch_size: int) -> "BlockJob":
        """The per-block task description (small, the same for every block)."""
        from tilefuse.inference import BlockJob

        return BlockJob(
            scene=str(self.store.resolve()),
            prediction=str(self.out.resolve()),
            grid=self.grid,
            modalities=tuple(self.config.modalities),
            band_mean=self.band_mean,
            band_std=self.band_std,
            num_classes=self.spec.num_classes,
            batch_size=batch_size,
            blend=self.settings["blend"],
            probs=self.options.probs,
            scene_id=self.scene_id,
        )


def check_band_order(scene: "xr.Dataset", config: "ModelConfig", store: Path, checkpoint: Path) -> None:
    """Refuse a scene whose band names of a modality disagree with those the checkpoint was trained on (its
    ``band_names``; see :func:`tilefuse.checkpoint.band_names_conflict` for the rule: made-up names such as
    ``b1`` and other naming schemes are not compared). A checkpoint without recorded names is not checked."""
    from tilefuse.checkpoint import band_names_conflict
    from tilefuse.scene import store_band_names
    from tilefuse.training_data import other_bands

    for name, trained in config.band_names.items():
        names = store_band_names(scene, name)
        problem = None if names is None else band_names_conflict(names, trained, "in the store", "in the checkpoint")
        differ = other_bands(names, trained, "in the store", "in the checkpoint") if problem else None
        if differ:
            raise InputError(
                f"{store} gives modality {name!r} the bands {names} but checkpoint {checkpoint} was trained on {trained}, "
                f"other bands ({differ}): the model would read bands it was not trained on; use a store with the "
                "checkpoint's bands (ingest them, in its order and with its names), or a checkpoint trained on these bands"
            )
        if problem:
            raise InputError(
                f"{store} gives modality {name!r} the bands {names} but checkpoint {checkpoint} was trained on {trained} "
                f"({problem}): the model would read its bands in the wrong order; re-ingest the store with its bands in "
                "the checkpoint's order and with its names, or use a checkpoint trained on this order"
            )


def plan_prediction(checkpoint: str | Path, store: str | Path, out: str | Path, options: PredictOptions) -> PredictionPlan:
    """Check the options, output, checkpoint, scene and resume settings of a run; writes nothing (but stale temporaries).

    Raises :class:`InputError` with one line for anything that would make the
    run fail later.
    """
    from tilefuse.classes import default_class_name
    from tilefuse.cluster.plugin import ModelSource
    from tilefuse.grid import TileGrid
    from tilefuse.inference import scene_identity
    from tilefuse.outputs import claim, clean_stale
    from tilefuse.prediction import SCENE_DIGEST, check_resumable, prediction_attrs
    from tilefuse.scene import scene_digest
    from tilefuse.scene import SHARD, open_scene, require_modalities
    from tilefuse.tile_model import available_models

    options.check()
    store, out, checkpoint = Path(store), Path(out), Path(checkpoint)
    # an existing prediction without --overwrite or --resume is refused below, naming both (a partial one is to be resumed)
    claim(out, "prediction", inputs=[store, checkpoint], overwrite=options.overwrite, exist_ok=True)
    clean_stale(out)

    config, spec, digest = inspect_checkpoint(checkpoint)
    scene_id = scene_identity(store)  # the store this run reads (BlockJob.scene_id)
    scene = open_scene(store)
    require_modalities(scene, config.modalities, where=str(store))
    check_band_order(scene, config, store, checkpoint)
    overlap = options.overlap
    if overlap is None:
        overlap = options.tile // 4 if spec.blend else 0
    if not spec.blend and overlap:
        raise InputError(f"model {config.model!r} does not blend its tiles (each pixel is computed once): use overlap=0 (--overlap 0)")
    existing = prediction_attrs(out) if out.exists() and options.resume else None
    # a store begun with such tiles (before this bound) still resumes, with them only (check_resumable)
    if options.tile - overlap < MIN_STRIDE and not existing:
        tiles = TileGrid(scene.sizes["y"], scene.sizes["x"], options.tile, overlap, spec.margin, max(SHARD, options.tile)).num_tiles
        raise InputError(
            f"tile={options.tile} (--tile) with overlap={overlap} (--overlap) steps {options.tile - overlap} px from one tile to the next: "
            f"{tiles:,} tiles through the model for this {scene.sizes['y']} x {scene.sizes['x']} px scene; keep tile - overlap "
            f">= {MIN_STRIDE} px (e.g. --tile {DEFAULT_TILE} --overlap {DEFAULT_TILE // 4})"
        )
    block_size = options.block_size
    if block_size is None:
        block_size = int(existing["block_size"]) if existing else SHARD
    options = replace(options, overlap=overlap, block_size=block_size)
    class_names = list(config.class_names) or [default_class_name(k) for k in range(spec.num_classes)]
    if len(class_names) != spec.num_classes:
        raise InputError(f"checkpoint {checkpoint} names {len(class_names)} classes but its model has {spec.num_classes}")
    settings = {
        "model": config.model,
        "checkpoint_hash": digest,
        "tile": options.tile,
        "overlap": overlap,
        "margin": spec.margin,
        "blend": options.blend if spec.blend else "none",
        "block_size": block_size,
        "probs": options.probs or "none",
        "height": scene.sizes["y"],
        "width": scene.sizes["x"],
        SCENE_DIGEST: scene_digest(scene, config.modalities),  # a resume must read the same scene
    }
    if existing:
        # the settings (before the grid: a resume without --tile met 'raise --block-size' for the store's blocks);
        # device kind and threads once the workers are known
        check_resumable(out, settings, str(store.resolve()))
    elif out.exists() and not options.overwrite:
        raise InputError(f"{out} already exists: pass overwrite=True (--overwrite) to replace it or resume=True (--resume) to finish it")
    grid = TileGrid(scene.sizes["y"], scene.sizes["x"], options.tile, overlap, spec.margin, block_size)
    mean, std = _band_stats(config, scene)

    builder = available_models()[config.model].builder
    if getattr(builder, "__module__", "").startswith("tilefuse.models"):
        builder = None  # workers find built-in models in their own registry
    source = ModelSource(
        str(checkpoint.resolve()), digest, config.model, options.device, options.precision, options.torch_threads,
        builder=builder, channels_last=options.channels_last, compile=options.compile,
    )  # fmt: skip
    return PredictionPlan(store, out, checkpoint, options, config, spec, grid, class_names, settings, existing, source, mean, std, scene, scene_id)


class WorkerInfo(NamedTuple):
    """What one worker reports before a run (:func:`probe_worker`)."""

    kind: str
    """Device kind: ``cpu`` or ``cuda:<GPU name>`` (``cuda:none`` where a GPU is asked for but missing)."""
    device: str
    """torch device type, or ``cpu-only`` where a GPU is asked for and the worker has none."""
    cores: int
    batch_size: int
    """From the device's free memory (0 on a ``cpu-only`` worker)."""
    threads: int
    """torch's threads in the probing thread (what ``sync`` runs with)."""
    version: str = ""
    """The tilefuse version the worker runs."""


def probe_worker(source: "ModelSource", tile_pixels: int, channels: int) -> WorkerInfo:
    """Device kind, cores, free-memory batch size and torch threads of the worker (or process) this runs on."""
    import torch

    from tilefuse.inference import auto_batch_size

    device = torch.device(source.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    kind = device.type
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return WorkerInfo("cuda:none", "cpu-only", os.cpu_count() or 1, 0, torch.get_num_threads(), _version())
        try:
            kind = f"cuda:{torch.cuda.get_device_name(device)}"
        except (AssertionError, RuntimeError, ValueError) as error:
            raise InputError(f"device={source.device!r} (--device): no such GPU on this worker ({error})") from None
    from tilefuse import __version__

    return WorkerInfo(kind, device.type, os.cpu_count() or 1, auto_batch_size(tile_pixels, channels, device), torch.get_num_threads(), __version__)


def _version() -> str:
    from tilefuse import __version__

    return __version__


def _probe_workers(client, cluster: Any, source: "ModelSource", tile_pixels: int, channels: int) -> dict[str, WorkerInfo]:
    """:func:`probe_worker` on every worker of ``client``; workers that cannot import tilefuse, or run another
    version of it, are one InputError line (they were distributed's 'ModuleNotFoundError' traceback, or ran
    blocks with other code than the one recorded in the store)."""
    where = cluster if isinstance(cluster, str) else "the dask cluster"
    try:
        workers = client.run(probe_worker, source, tile_pixels, channels)
    except InputError:
        raise
    except Exception as error:  # client.run re-raises a worker's failure as a bare Exception holding its text
        import re

        text = str(error)
        missing = re.search(r"No module named '?([\w.]+)", text)
        if missing is None:
            raise
        module = missing.group(1)
        fix = (
            f"install tilefuse {_version()} in the workers' environment" if module.split(".")[0] == "tilefuse"
            else f"make {module} importable on the workers too (the model or its builder comes from it)"
        )
        raise InputError(f"the workers of {where} cannot import {module} ({text.splitlines()[0]}): {fix}") from None
    ours = _version()
    others = sorted({info.version for info in workers.values() if info.version != ours})
    if others:
        raise InputError(
            f"the workers of {where} run tilefuse {', '.join(v or 'older than 0.1' for v in others)}, this process {ours}: install the same version on "
            "the workers (a prediction records one version)"
        )
    return workers


class ClusterRun:
    """A prediction run on a cluster: client lifetime, worker probe, determinism record, model plugin, blocks.

    Use as a context manager: entering opens the client for ``cluster`` (a spec,
    or an existing ``distributed.Client``, which is borrowed and left open);
    leaving closes what was opened and restores this process's torch threads
    (``sync`` runs set them). :meth:`prepare` does everything before blocks
    run (it creates the store last), :meth:`run` runs them.
    """

    def __init__(
        self,
        plan: PredictionPlan,
        cluster: Any = "sync",
        *,
        listen: str | None = None,
        connect_timeout: float | None = None,
        progress: bool = True,
    ) -> None:
        self.plan = plan
        self.cluster = cluster
        self.source = plan.source
        """The plan's model source, with torch threads fixed once the workers are known."""
        self.listen = listen
        self.connect_timeout = connect_timeout
        self.progress = progress
        self.client = None
        self.workers: dict[str, WorkerInfo] = {}
        """Worker address (``sync`` in-process) -> what it reported (:meth:`probe`)."""
        self.hosts: dict[str, int] = {}
        self.job: "BlockJob | None" = None
        self._stack = None

    def __enter__(self) -> "ClusterRun":
        import contextlib

        import torch

        from tilefuse.cluster.client import CONNECT_TIMEOUT, LOOPBACK, cluster_client
        from tilefuse.cluster.plugin import quiet_reported_here

        timeout = CONNECT_TIMEOUT if self.connect_timeout is None else self.connect_timeout
        with contextlib.ExitStack() as stack:
            stack.enter_context(quiet_reported_here())
            self.client = stack.enter_context(
                cluster_client(self.cluster, timeout=timeout, listen=self.listen or LOOPBACK, prefetch=self.plan.options.prefetch)
            )
            stack.callback(torch.set_num_threads, torch.get_num_threads())
            self._stack = stack.pop_all()
        return self

    def __exit__(self, *exc) -> None:
        stack, self._stack = self._stack, None
        if stack is not None:
            # the exception too: a cluster started here that closes on an error or interrupt tells its workers first
            # (tilefuse.cluster.client.cluster_client), so they do not report their peers' close under running tasks
            stack.__exit__(*exc)

    def _say(self, message: str) -> None:
        if self.progress:
            print(printable(f"tilefuse: {message}"), file=sys.stderr)

    def probe(self) -> dict[str, Any]:
        """Ask every worker for its device and cores; returns the determinism record, fixes the source's threads.

        Refuses, in one line, a cluster without workers, a GPU device on a
        worker without one, and fp16 anywhere but on GPUs.
        """
        import torch

        from tilefuse.cluster.client import host_of, workers_per_host

        source, client, plan = self.source, self.client, self.plan
        if client is None:
            self.workers = {"sync": probe_worker(source, plan.tile_pixels, plan.channels)}
        else:
            self.hosts = workers_per_host(client)
            if not self.hosts:
                raise InputError(f"the dask cluster {self.cluster!r} has no workers: start some (dask worker ...)")
            self.workers = _probe_workers(client, self.cluster, source, plan.tile_pixels, plan.channels)
        devices = {info.device for info in self.workers.values()}
        if "cpu-only" in devices:
            raise InputError(
                f"device={source.device!r} (--device) asks for a GPU but {'a worker has' if client else 'this machine has'} none"
            )
        if source.precision == "fp16" and devices != {"cuda"}:
            raise InputError("precision='fp16' (--precision fp16) autocast needs a GPU on every worker: use bf16 or fp32")
        threads = source.torch_threads
        if threads is None:
            # one count for every worker (an even share of its host's cores, the smallest), so it can be recorded
            if client is None:
                threads = self.workers["sync"].threads
            else:
                threads = min(max(1, info.cores // self.hosts[host_of(address)]) for address, info in self.workers.items())
            self.source = replace(source, torch_threads=threads)
        return {
            "device_kind": ",".join(sorted({info.kind for info in self.workers.values()})),
            "torch_threads": threads,
            "precision": source.precision,
            "channels_last": source.channels_last,
            "compile": source.compile,
            "torch_version": torch.__version__,
        }

    def start(self) -> None:
        """Load the model on every worker (once per worker; restarted workers load it again)."""
        from tilefuse.cluster.client import dashboard_link
        from tilefuse.cluster.malloc import malloc_trim_workers
        from tilefuse.cluster.plugin import ModelPlugin, load_runner, release_runner

        client = self.client
        if client is None:
            # the model stays for this run only: a notebook predicting with one checkpoint after another
            # kept every one of them resident (on its GPU, too)
            self._stack.callback(release_runner, self.source)
            # loaded now, as on workers: a checkpoint that no longer loads (rewritten since the plan) leaves no store
            load_runner(self.source)
            return
        slow = malloc_trim_workers(client)
        if slow:  # a borrowed cluster: its workers are its owner's to restart
            self._say(
                f"{slow} worker(s) run with MALLOC_TRIM_THRESHOLD_ (it halves torch's CPU speed); tilefuse never restarts "
                "a cluster it did not start: start its workers without it (see cluster/slurm.md) to predict faster"
            )
        name = f"tilefuse-model-{self.source.key}"
        client.register_plugin(ModelPlugin(self.source, self.hosts), name=name)
        if not isinstance(self.cluster, str):  # a borrowed client's workers outlive the run: take the model back
            self._stack.callback(_unregister_plugin, client, name)
        link = dashboard_link(client)
        self._say(f"dask dashboard at {link}" if link else "no dask dashboard (install bokeh)")

    def prepare(self) -> "list[Block]":
        """Everything before blocks run: probe, resume check, model plugin, then create (or reuse) the store.

        Returns the pending blocks (all of them for a new store; on a resume
        those not done or damaged) and sets :attr:`job`.
        """
        from tilefuse.prediction import check_resumable, create_prediction, pending_blocks

        plan = self.plan
        settings = {**plan.settings, **self.probe()}
        batch_size = self._batch_size()
        if not plan.spec.batch_invariant:  # a tile's bits follow its batch's shape: part of the determinism record
            settings["batch_size"] = batch_size
        if plan.existing:
            check_resumable(plan.out, settings, str(plan.store.resolve()))
        self.start()
        self.job = plan.job(batch_size)
        if plan.existing is None:
            inputs = [plan.store, plan.checkpoint]
            attrs = {**settings, "scene": str(plan.store.resolve()), "checkpoint": str(plan.checkpoint.resolve())}
            create_prediction(
                plan.out, plan.scene, plan.grid, class_names=plan.class_names, attrs=attrs, probs=plan.options.probs,
                overwrite=plan.options.overwrite, inputs=inputs,
            )  # fmt: skip
        return pending_blocks(plan.out, plan.grid)

    def _batch_size(self) -> int:
        """Tiles per model call: ``batch_size`` as asked, else the one a resumed store was computed with, else the
        largest every worker's free memory allows; at most a block's tiles (a larger batch would only hold padding)."""
        plan = self.plan
        recorded = (plan.existing or {}).get("batch_size")
        asked = plan.options.batch_size or (recorded if isinstance(recorded, int) and not isinstance(recorded, bool) else None)
        batch_size = asked or min(info.batch_size for info in self.workers.values())
        return min(batch_size, plan.grid.tiles_per_block)

    def run(self, pending: "list[Block]") -> int:
        """Compute and write ``pending`` blocks (after :meth:`prepare`); returns the tiles run through the model."""
        from tilefuse.cluster.blocks import run_blocks

        if not pending:
            return 0
        options = self.plan.options
        return run_blocks(
            self.job, self.source, self.plan.grid.blocks(), pending, client=self.client, progress=self.progress,
            prefetch=options.prefetch, reader_threads=options.reader_threads,
        )  # fmt: skip


def _unregister_plugin(client, name: str) -> None:
    """Remove the model plugin ``name`` from ``client``'s workers (its teardown frees each worker's model)."""
    import contextlib

    with contextlib.suppress(Exception):  # a closing client or a vanished worker: nothing left to free
        client.unregister_worker_plugin(name)


def _task_block(key: Any, grid: "TileGrid | None") -> str:
    """The block a tilefuse task key (``tilefuse-<piece>-<run>-<row>-<col>``, :mod:`tilefuse.cluster.blocks`) works
    on, with its pixels; other keys as they are."""
    import re

    match = re.fullmatch(r"tilefuse-[a-z]+-[0-9a-f]+-(\d+)-(\d+)", str(key))
    if match is None or grid is None:
        return f"task {key!r}"
    from tilefuse.grid import Block

    rows, cols = grid.block_region(Block(int(match[1]), int(match[2])))
    return f"block {match[1]},{match[2]} (rows {rows.start}..{rows.stop - 1}, columns {cols.start}..{cols.stop - 1})"


def cluster_failure(error: BaseException, cluster: Any, out: Path | None, grid: "TileGrid | None" = None) -> InputError | None:
    """The one-line :class:`InputError` for a cluster that went away under a run, or None for other errors.

    A scheduler that died or became unreachable (the client's futures cancelled with
    ``scheduler-connection-lost``, a closed comm) and a task that kept killing its workers (dask's
    ``KilledWorker``, e.g. out of memory: named by its block of ``grid``) ended in distributed's traceback;
    the blocks written so far are kept and recorded, so the fix is a resume (``out``: the store blocks were
    being written to, None before).
    """
    if cluster is None or cluster == "sync":
        return None
    from distributed.client import FutureCancelledError
    from distributed.comm.core import CommClosedError
    from distributed.scheduler import KilledWorker

    where = cluster if isinstance(cluster, str) else "the dask cluster"
    then = "run again" if out is None else f"rerun with resume=True (--resume): {out} keeps the blocks written so far"
    if isinstance(error, KilledWorker):
        return InputError(
            f"the workers of {where} died running {_task_block(error.task, grid)}, one after another (out of memory? see their logs): {then}"
        )
    if isinstance(error, (FutureCancelledError, CommClosedError)):
        reason = getattr(error, "reason", None) or type(error).__name__
        return InputError(f"lost the connection to {where} mid-run ({reason}): start its scheduler and workers, then {then}")
    return None


@dataclass(frozen=True)
class RunReport:
    """What a finished run did."""

    out: Path
    height: int
    width: int
    blocks: int
    """Blocks computed and written by this run (all of them, but on a resume)."""
    tiles: int
    """Tiles run through the model by this run."""
    total_tiles: int
    batch_size: int
    seconds: float

    def __str__(self) -> str:
        return (
            f"wrote {self.out} ({self.height} x {self.width} px, {self.blocks} blocks, "
            f"{self.tiles} of {self.total_tiles} tiles run, batch {self.batch_size}) in {self.seconds:.1f} s"
        )


def unfinished_training(config: "ModelConfig", checkpoint: Path) -> str | None:
    """A note where ``checkpoint`` was saved before its training run reached its last step (a run still going, or one
    stopped early): legitimate to predict with, but rarely what a user means to map with."""
    step, steps = config.extra.get("step"), config.extra.get("steps")
    if not (isinstance(step, int) and isinstance(steps, int) and step < steps):
        return None
    return (
        f"note: checkpoint {checkpoint} holds step {step} of {steps} of a training run that has not finished "
        "(finish its training with resume=True (--resume), then predict again with overwrite=True (--overwrite))"
    )


def predict_scene(
    checkpoint: str | Path,
    store: str | Path,
    out: str | Path,
    options: PredictOptions = PredictOptions(),
    *,
    cluster: Any = "sync",
    listen: str | None = None,
    connect_timeout: float | None = None,
    progress: bool = True,
) -> RunReport:
    """Predict scene store ``store`` with ``checkpoint`` into prediction store ``out`` (see the module docstring).

    ``cluster`` is a spec (:mod:`tilefuse.cluster.client`) or a ``distributed.Client``;
    ``listen`` and ``connect_timeout`` are passed to it. The caller holds the
    output's lock (:func:`tilefuse.outputs.holds_output`).
    """
    from tilefuse.prediction import mark_complete

    started = time.perf_counter()
    plan = plan_prediction(checkpoint, store, out, options)
    with ClusterRun(plan, cluster, listen=listen, connect_timeout=connect_timeout, progress=progress) as run:
        note = unfinished_training(plan.config, plan.checkpoint)
        if note:
            run._say(note)
        pending = None
        try:
            pending = run.prepare()
            tiles = run.run(pending)
        except Exception as error:
            failure = cluster_failure(error, cluster, None if pending is None else plan.out, plan.grid)
            if failure is None:
                raise
            raise failure from None
    mark_complete(plan.out)
    grid = plan.grid
    return RunReport(plan.out, grid.height, grid.width, len(pending), tiles, grid.num_tiles, run.job.batch_size, time.perf_counter() - started)
