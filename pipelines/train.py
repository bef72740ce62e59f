"""``tilefuse train``: train a registered tile model on scene stores, streaming samples from zarr.

The sampler follows the model: blended or margin-free models (PAD) get random
patches (:class:`tilefuse.sampling.RandomPatchSampler`); models with a context
margin and no blending (S²Fin) get a fixed number of labelled pixels per class
with their neighbourhoods (:class:`tilefuse.sampling.LabelledPixelSampler`).
``sampler="patches"`` / ``"pixels"`` overrides the choice. Validation runs on a
spatially disjoint part of the stores (blocks of the grid, whole stores, or
``val_stores``) tiled once by :class:`tilefuse.sampling.GridPatchSampler`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Annotated, Any, Optional, Sequence

import typer

from tilefuse.errors import InputError
from tilefuse.outputs import holds_output

SPLIT_FILE = "split.json"


@dataclass
class DataOptions:
    """What the model is fed (the loop's own settings are :class:`tilefuse.training.TrainSettings`)."""

    modalities: Optional[list[str]] = None
    """Store modalities the model reads, in the model's order (default: all, in store order)."""
    sampler: str = "auto"
    """auto | patches | pixels."""
    patch_size: int = 256
    pixels_per_class: int = 50
    allow_fewer: bool = False
    min_labelled: float = 0.05
    class_balance: bool = False
    split: str = "blocks"
    val_fraction: float = 0.1
    test_fraction: float = 0.0
    block: int = 0
    """Split block edge in px; 0: a multiple of the patch size near 512, at most a quarter of the smallest store."""
    val_pixels: int = 2000
    """Pixel models: validate on this many labelled pixels drawn uniformly from the validation area."""
    window: int = 1024
    patches_per_window: int = 64
    windows_per_round: int = 8
    rescale: Optional[list[float]] = None
    """Patch models: random rescale by a factor in [low, high] then crop (PAD's paper: [0.5, 2]); None = off."""

    def check(self) -> None:
        """Refuse values no sampler can run with (one line naming the option)."""
        from tilefuse.training import _require

        whole = lambda low: (lambda v: isinstance(v, int) and v >= low)  # noqa: E731
        share = lambda v: 0 <= v < 1  # noqa: E731
        for name in ("patch_size", "pixels_per_class", "val_pixels", "window", "patches_per_window", "windows_per_round"):
            _require(name, getattr(self, name), "a whole number >= 1", whole(1))
        _require("block", self.block, "a whole number of px >= 0 (0 = auto)", whole(0))
        _require("min_labelled", self.min_labelled, "a share in 0..1", lambda v: 0 <= v <= 1)
        for name in ("val_fraction", "test_fraction"):
            _require(name, getattr(self, name), "a share in 0..1 (below 1)", share)
        if self.val_fraction + self.test_fraction >= 1:
            raise InputError(f"val_fraction + test_fraction = {self.val_fraction + self.test_fraction:g} leaves nothing to train on: lower them")
        if self.split not in ("blocks", "stores"):
            raise InputError(f"unknown split {self.split!r}: use blocks or stores")


FREE_ON_RESUME = {"device", "amp", "checkpoint_every", "val_every", "log_every", "torch_threads"}
"""Options a resume may change without changing what is computed."""


def _option_names() -> tuple[set[str], set[str]]:
    from tilefuse.training import TrainSettings

    return {f.name for f in fields(DataOptions)}, {f.name for f in fields(TrainSettings)}


def _resolve_job(model: str, hparams: dict | None, stores: list[str], val_stores: list[str], options: dict, saved: dict | None) -> dict:
    """The full job description: defaults, then the saved run (on resume), then ``options``."""
    from tilefuse.training import TrainSettings

    data_names, loop_names = _option_names()
    unknown = sorted(set(options) - data_names - loop_names)
    if unknown:
        raise TypeError(f"unknown training option(s) {unknown}")
    job = {
        "model": model,
        "hparams": dict(hparams or {}),
        "stores": stores,
        "val_stores": val_stores,
        "data": asdict(DataOptions()),
        "settings": asdict(TrainSettings()),
    }
    if saved:
        if saved["model"] != model:
            raise InputError(f"the run holds a checkpoint of model {saved['model']!r}, not {model!r}: resume with --model {saved['model']} or use another --out")
        if hparams is not None and dict(hparams) != saved["hparams"]:
            raise InputError(f"the run was trained with hyperparameters {saved['hparams']}, not {dict(hparams)}: resume with the same --hparam")
        for key in ("stores", "val_stores"):
            if job[key] != saved[key]:
                raise InputError(f"the run was trained on {key.replace('_', ' ')} {saved[key]}: resume with the same --{key[:-1].replace('_', '-')} list")
        job = {**job, "hparams": saved["hparams"], "data": {**job["data"], **saved["data"]}, "settings": {**job["settings"], **saved["settings"]}}
    for key, value in options.items():
        if value is None:
            continue
        section = "data" if key in data_names else "settings"
        if saved and key not in FREE_ON_RESUME and job[section][key] != value:
            raise InputError(f"--{key.replace('_', '-')} {value} differs from the run's {job[section][key]}: resume with the same value (or start a new run)")
        job[section][key] = value
    return job


def _class_names(scenes, paths) -> tuple[list[str], int]:
    """The merged class list of every store's labels (:func:`tilefuse.classes.merge_class_names`), and its length."""
    from tilefuse.classes import merge_class_names, store_class_names

    names = merge_class_names([(str(path), store_class_names(ds)) for ds, path in zip(scenes, paths)])
    if not names:
        raise InputError(f"no labelled pixels in {', '.join(map(str, paths))}: ingest labels with --labels PATH")
    return names, len(names)


def _default_block(unit: int, smallest: int) -> int:
    """Split block edge: a multiple of ``unit`` near 512 px, small enough for 4 blocks across the smallest store."""
    return unit * max(1, min(-(-512 // unit), smallest // (4 * unit)))


def _labelled_per_block(ds, block: int):
    from tilefuse.scene import IGNORE

    labelled = ((ds["label"] != IGNORE) & ds["valid"]).astype("int64")
    return labelled.coarsen(y=block, x=block, boundary="pad").sum().values


@holds_output("out", inputs=("stores", "val_stores"))  # one writer per run folder, for the whole training
def train(
    model: str,
    stores: Sequence[str | Path],
    out: str | Path,
    *,
    val_stores: Sequence[str | Path] = (),
    hparams: dict[str, Any] | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    **options: Any,
) -> Path:
    """Train registered model ``model`` on scene ``stores`` into run folder ``out``; returns ``out``.

    ``options`` are fields of :class:`DataOptions` and
    :class:`tilefuse.training.TrainSettings` (``steps``, ``batch_size``,
    ``patch_size``, ``lr``, ``workers``, ...). ``out`` holds the latest
    checkpoint at its top level (``tilefuse predict --checkpoint out``), the
    resume state, ``log.jsonl``, ``curves.png`` and ``metrics.json``.
    ``resume`` continues a stopped run exactly; ``overwrite`` replaces one.
    """
    import tilefuse.training  # noqa: F401  (first: it sets OpenMP's wait policy before torch loads)

    import numpy as np
    import torch

    from tilefuse.checkpoint import ModelConfig, read_config
    from tilefuse.dataset import PatchDataset, pooled_band_stats
    from tilefuse.sampling import (
        GridPatchSampler,
        LabelledPixelSampler,
        RandomPatchSampler,
        SpatialSplit,
        check_patch_fits,
        spatial_split,
    )
    from tilefuse.scene import band_dim, modalities as store_modalities, open_scene, require_modalities
    from tilefuse.tile_model import build_model
    from tilefuse.training import RunDir, TrainSettings, fit

    run = RunDir(out)
    run.check(resume, overwrite, inputs=[stores, val_stores])
    if not stores:
        raise InputError("no training store: pass at least one --store")
    train_paths = [str(Path(p).resolve()) for p in stores]
    val_paths = [str(Path(p).resolve()) for p in val_stores]
    saved = run.read_trainer()["job"] if resume else None
    job = _resolve_job(model, hparams, train_paths, val_paths, options, saved)
    data = DataOptions(**job["data"])
    settings = TrainSettings(**job["settings"])
    settings.check()
    data.check()
    if data.sampler not in ("auto", "patches", "pixels"):
        raise InputError(f"unknown sampler {data.sampler!r}: use auto, patches or pixels")

    paths = train_paths + val_paths
    scenes = [open_scene(p) for p in paths]
    for ds, path in zip(scenes, paths):
        if "label" not in ds:
            raise InputError(f"{path} has no labels: ingest it with --labels PATH to train on it")
    names = data.modalities or store_modalities(scenes[0])
    missing = [n for n in names if n not in store_modalities(scenes[0])]
    if missing:
        raise InputError(f"{paths[0]} has no modality {missing[0]!r} (it has {', '.join(store_modalities(scenes[0]))}): check --modality")
    bands = {n: int(scenes[0][n].sizes[band_dim(n)]) for n in names}
    if resume:
        config = read_config(run.state)
        bands = dict(config.modalities)
    for ds, path in zip(scenes, paths):
        require_modalities(ds, bands, where=path)
    class_names, num_classes = _class_names(scenes, paths)

    if resume:
        if config.num_classes != num_classes:
            raise InputError(f"the run's model has {config.num_classes} classes but the stores have {num_classes}: resume with the same stores")
        net = config.build()
        band_stats = config.band_stats
    else:
        torch.manual_seed(settings.seed)
        net = build_model(model, bands, num_classes, **job["hparams"])
        band_stats = pooled_band_stats(scenes[: len(train_paths)], list(bands))
    spec = net.spec
    if list(spec.modalities) != list(bands):
        raise InputError(f"model {model!r} reads modalities {list(spec.modalities)}, the stores give {list(bands)}: pass --modality for each, in order")
    pixels = data.sampler == "pixels" or (data.sampler == "auto" and spec.margin > 0 and not spec.blend)

    # split: explicit validation stores, or blocks / whole stores of the training stores
    if not pixels:
        for ds, path in zip(scenes, paths):
            check_patch_fits((ds.sizes["y"], ds.sizes["x"]), data.patch_size, path)
    # validation tiles of the patch size; pixel models validate on pixels, blocks of 512 px
    tile = 2 * spec.margin + 1 if pixels else data.patch_size
    split: SpatialSplit | None = None
    if val_paths:
        edge = max(max(ds.sizes["y"], ds.sizes["x"]) for ds in scenes)
        split = SpatialSplit(edge, tuple(np.full((1, 1), 0 if i < len(train_paths) else 1, np.int8) for i in range(len(paths))))
    elif data.val_fraction > 0 or data.test_fraction > 0:
        block = data.block or _default_block(32 if pixels else tile, min(min(ds.sizes["y"], ds.sizes["x"]) for ds in scenes))
        if data.split == "stores":
            block = max(max(ds.sizes["y"], ds.sizes["x"]) for ds in scenes)
        weights = [_labelled_per_block(ds, block) for ds in scenes]
        if not any(w.sum() for w in weights):
            raise InputError(f"no valid labelled pixels in {', '.join(paths)}: check the labels (255 = none) and the valid mask")
        split = spatial_split(
            [(ds.sizes["y"], ds.sizes["x"]) for ds in scenes],
            by=data.split, val=data.val_fraction, test=data.test_fraction, block=block, weights=weights, seed=settings.seed,
        )

    if pixels:
        sampler = LabelledPixelSampler(
            paths, list(bands), 2 * spec.margin + 1, data.pixels_per_class,
            split=split, allow_fewer=data.allow_fewer, class_names=class_names, window=data.window, seed=settings.seed,
        )
    else:
        sampler = RandomPatchSampler(
            paths, list(bands), data.patch_size,
            margin=spec.margin, split=split, min_labelled=data.min_labelled, class_balance=data.class_balance,
            window=data.window, patches_per_window=data.patches_per_window,
            windows_per_round=data.windows_per_round, seed=settings.seed,
        )
    val_data = None
    if split is not None and split.fraction("val") > 0:
        if pixels:
            val_sampler = LabelledPixelSampler(
                paths, list(bands), tile, data.val_pixels, per_class=False, repeat=False,
                split=split, subset="val", allow_fewer=True, window=data.window, seed=settings.seed,
            )
        else:
            val_sampler = GridPatchSampler(paths, list(bands), tile, margin=spec.margin, split=split, subset="val", window=data.window)
        val_data = PatchDataset(val_sampler, band_stats, margin=spec.margin, augment=False)

    config = ModelConfig(
        model=model,
        modalities=dict(spec.modalities),
        num_classes=spec.num_classes,
        hparams=job["hparams"],
        class_names=class_names,
        band_stats=band_stats,
        extra={"stores": train_paths, "val_stores": val_paths, "sampler": "pixels" if pixels else "patches"},
    )
    run.start(resume, overwrite, inputs=[stores, val_stores])  # guarded: replaces only a run folder
    if split is not None:
        context = spec.margin if pixels else data.patch_size // 2
        (run.path / SPLIT_FILE).write_text(json.dumps({"stores": paths, "context": context, **split.to_dict()}))
    fit(
        net, config, PatchDataset(sampler, band_stats, margin=spec.margin, augment=True, rescale=_rescale(data, pixels), seed=settings.seed),
        val_data, settings, run,
        job=job, resume=resume, progress=progress, val_batch_size=max(256, settings.batch_size) if pixels else None,
    )
    return run.path


def _rescale(data: DataOptions, pixels: bool) -> tuple[float, float] | None:
    if data.rescale is None:
        return None
    value = data.rescale
    if pixels or not isinstance(value, (list, tuple)) or len(value) != 2 or not all(isinstance(v, (int, float)) and v > 0 for v in value) or value[0] > value[1]:
        raise InputError(f"rescale= must be [low, high] with 0 < low <= high, for patch models only; got {value!r}")
    return float(value[0]), float(value[1])


def _parse_hparams(items: list[str] | None) -> dict[str, Any] | None:
    if items is None:
        return None
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InputError(f"--hparam {item!r} is not KEY=VALUE: write e.g. --hparam preset=femto")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def train_command(
    model: Annotated[str, typer.Option("--model", help="Registered model name (see `tilefuse models`).")],
    store: Annotated[list[Path], typer.Option("--store", help="Scene store to train on (repeat for several).")],
    out: Annotated[Path, typer.Option("--out", help="Run folder: checkpoint, state, log, curves.")],
    steps: Annotated[Optional[int], typer.Option(help="Training iterations [1000].")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Samples per batch [8].")] = None,
    patch_size: Annotated[Optional[int], typer.Option(help="Random patch edge in px [256].")] = None,
    pixels_per_class: Annotated[Optional[int], typer.Option(help="Labelled pixels per class, pixel models [50].")] = None,
    allow_fewer: Annotated[Optional[bool], typer.Option("--allow-fewer", help="Use every pixel of a class with fewer than asked.")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Peak learning rate of AdamW [1e-4].")] = None,
    weight_decay: Annotated[Optional[float], typer.Option(help="AdamW weight decay [0.05].")] = None,
    warmup: Annotated[Optional[int], typer.Option(help="Linear warm-up iterations [0].")] = None,
    grad_clip: Annotated[Optional[float], typer.Option(help="Gradient norm clip, 0 = off [1.0].")] = None,
    val_fraction: Annotated[Optional[float], typer.Option(help="Share of labelled pixels held out for validation [0.1].")] = None,
    test_fraction: Annotated[Optional[float], typer.Option(help="Share held out for testing, never seen [0].")] = None,
    split: Annotated[Optional[str], typer.Option(help="Hold out blocks of the grid or whole stores: blocks|stores [blocks].")] = None,
    block: Annotated[Optional[int], typer.Option(help="Split block edge in px [0 = auto].")] = None,
    val_store: Annotated[Optional[list[Path]], typer.Option("--val-store", help="Validate on this store instead of a split.")] = None,
    modality: Annotated[Optional[list[str]], typer.Option("--modality", help="Store modality to feed, in model order (repeat).")] = None,
    sampler: Annotated[Optional[str], typer.Option(help="auto|patches|pixels [auto: by the model's margin/blend].")] = None,
    min_labelled: Annotated[Optional[float], typer.Option(help="Minimum labelled share of a random patch [0.05].")] = None,
    class_balance: Annotated[Optional[bool], typer.Option("--class-balance", help="Draw patch centres uniformly over classes.")] = None,
    checkpoint_every: Annotated[Optional[int], typer.Option(help="Checkpoint every N steps [500].")] = None,
    val_every: Annotated[Optional[int], typer.Option(help="Validate every N steps [0 = at checkpoints].")] = None,
    log_every: Annotated[Optional[int], typer.Option(help="Log every N steps [10].")] = None,
    workers: Annotated[Optional[int], typer.Option(help="DataLoader worker processes [2].")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed of weights, sampling and split [42].")] = None,
    device: Annotated[Optional[str], typer.Option(help="auto|cpu|cuda[:N] [auto].")] = None,
    amp: Annotated[Optional[bool], typer.Option("--amp/--no-amp", help="bf16 autocast [on with CUDA].")] = None,
    torch_threads: Annotated[Optional[int], typer.Option(help="torch threads of the training process [the cores it may use].")] = None,
    hparam: Annotated[Optional[list[str]], typer.Option("--hparam", help="Model hyperparameter KEY=VALUE (repeat).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out exactly where it stopped.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing run in --out.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bar.")] = False,
) -> None:
    """Train a model on scene stores, streaming random patches (or labelled pixels) from zarr."""
    options = {
        "steps": steps, "batch_size": batch_size, "patch_size": patch_size, "pixels_per_class": pixels_per_class,
        "allow_fewer": allow_fewer, "lr": lr, "weight_decay": weight_decay, "warmup": warmup, "grad_clip": grad_clip,
        "val_fraction": val_fraction, "test_fraction": test_fraction, "split": split, "block": block,
        "modalities": modality, "sampler": sampler, "min_labelled": min_labelled, "class_balance": class_balance,
        "checkpoint_every": checkpoint_every, "val_every": val_every, "log_every": log_every, "workers": workers,
        "seed": seed, "device": device, "amp": amp, "torch_threads": torch_threads,
    }
    path = train(
        model, store, out, val_stores=val_store or (), hparams=_parse_hparams(hparam),
        resume=resume, overwrite=overwrite, progress=not quiet, **options,
    )
    summary = json.loads((path / "metrics.json").read_text())
    val = summary.get("val") or {}
    scores = ", ".join(f"{k} {v:.4f}" for k, v in val.items() if k in ("overall_accuracy", "mean_iou", "kappa") and v is not None)
    typer.echo(f"trained {summary['step']} steps -> {path}" + (f" (validation: {scores})" if scores else ""))
