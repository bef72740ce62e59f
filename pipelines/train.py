"""``tilefuse train``: train a registered tile model on scene stores, streaming samples from zarr.

This module resolves the job (defaults, then a resumed run's saved job, then
the options given; a resume may change only :data:`FREE_ON_RESUME`), holds the
run folder's lock for the whole training (``@holds_output``), and calls the
engine: :func:`tilefuse.training_data.assemble` (stores -> model, config,
split, samplers, datasets; the sampler follows the model, see there) and
:func:`tilefuse.training.fit` (the loop). The split file and the sampler
indexes are written into the run folder right after it is created.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, fields
from pathlib import Path
from typing import Annotated, Any, Optional, Sequence

import typer

from tilefuse.errors import InputError, key_values, printable
from tilefuse.outputs import holds_output
from tilefuse.signals import terminating
from tilefuse.training_data import DataOptions

FREE_ON_RESUME = {"device", "amp", "checkpoint_every", "val_every", "log_every", "torch_threads"}
"""Options a resume may give anew: how often it saves, validates and logs, and how it computes (device, AMP,
threads), which the engine checks as resolved (``auto`` is the same device kind), refusing a change
(:func:`tilefuse.training.fit`)."""


def _option_names() -> tuple[set[str], set[str]]:
    from tilefuse.training import TrainSettings

    return {f.name for f in fields(DataOptions)}, {f.name for f in fields(TrainSettings)}


def _resolve_job(model: str, hparams: dict | None, stores: list[str], val_stores: list[str], options: dict, saved: dict | None) -> dict:
    """The full job description: defaults, then the saved run (on resume), then ``options``."""
    from tilefuse.training import TrainSettings

    import difflib

    data_names, loop_names = _option_names()
    unknown = sorted(set(options) - data_names - loop_names)
    if unknown:
        close = difflib.get_close_matches(unknown[0], sorted(data_names | loop_names), n=1)
        raise InputError(
            f"unknown training option {unknown[0]}=" + (f" (did you mean {close[0]}=?)" if close else "")
            + ": see help(tilefuse.train) and `tilefuse train --help` for the options"
        )
    if hparams is not None and not isinstance(hparams, dict):
        raise InputError(f"hparams= must be a dict of hyperparameter name -> value, got {type(hparams).__name__} {hparams!r:.60}")
    for key, value in (hparams or {}).items():  # saved in the checkpoint's JSON: refused after training, as a TypeError
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            raise InputError(
                f"hyperparameter {key}={value!s:.40} is of type {type(value).__name__}, which a checkpoint (JSON) cannot hold: "
                "pass a plain number, string, bool, list or dict (e.g. int(x) for a numpy integer)"
            ) from None
    if val_stores and options.get("val_fraction"):  # the stores validate: no share of the training stores is held out
        raise InputError(
            f"val_fraction= (--val-fraction) {options['val_fraction']} has no effect with val_stores= (--val-store), "
            "which validate instead: drop one of them"
        )
    if isinstance(options.get("modalities"), str):  # one modality, not its letters
        options = {**options, "modalities": [options["modalities"]]}
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
            raise InputError(f"the run holds a checkpoint of model {saved['model']!r}, not {model!r}: resume with model={saved['model']!r} (--model {saved['model']}) or use another out= (--out)")
        if hparams is not None and _as_saved(dict(hparams)) != saved["hparams"]:
            raise InputError(f"the run was trained with hyperparameters {saved['hparams']}, not {dict(hparams)}: resume with the same hparams= (--hparam)")
        for key in ("stores", "val_stores"):
            if job[key] != saved[key]:
                raise InputError(f"the run was trained on {key.replace('_', ' ')} {saved[key]}: resume with the same {key}= (the same --{key[:-1].replace('_', '-')} list)")
        job = {**job, "hparams": saved["hparams"], "data": {**job["data"], **saved["data"]}, "settings": {**job["settings"], **saved["settings"]}}
    for key, value in options.items():
        if value is None:
            continue
        section = "data" if key in data_names else "settings"
        if saved and key == "modalities" and job[section][key] is None and _as_saved(value) == _default_modalities(stores):
            continue  # the order the run took by default, spelled out
        if saved and key not in FREE_ON_RESUME and job[section][key] != _as_saved(value):
            flag = "--modality" if key == "modalities" else f"--{key.replace('_', '-')}"
            raise InputError(f"{key}= ({flag}) {_as_saved(value)} differs from the run's {job[section][key]}: resume with the same value (or start a new run)")
        job[section][key] = value
    return job


def _default_modalities(stores: list[str]) -> list[str] | None:
    """The modalities a run given none feeds: the first store's (:func:`tilefuse.training_data.assemble`)."""
    from tilefuse.scene import modalities, open_scene

    try:
        return modalities(open_scene(stores[0])) if stores else None
    except InputError:
        return None  # its own refusal comes later, with the store named


def _as_saved(value: Any) -> Any:
    """``value`` as the run folder's JSON gives it back (a tuple is a list): what a resume compares with."""
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError):  # not JSON: never equal to a saved value, as before
        return value


def _many(value: Any) -> bool:
    """Whether ``value`` is a sequence of stores rather than one store (a path, or a Dataset opened from one)."""
    import xarray as xr

    return not isinstance(value, (str, os.PathLike, xr.Dataset, xr.DataArray))


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
    nproc: int = 1,
    **options: Any,
) -> Path:
    """Train registered model ``model`` on scene ``stores`` into run folder ``out``; returns ``out``.

    ``options`` are fields of :class:`DataOptions` and
    :class:`tilefuse.training.TrainSettings` (``steps``, ``batch_size``,
    ``patch_size``, ``lr``, ``workers``, ...). ``out`` holds the latest
    checkpoint at its top level (``tilefuse predict --checkpoint out``), the
    resume state, ``log.jsonl``, ``curves.png`` and ``metrics.json``.
    ``resume`` continues a stopped run exactly; ``overwrite`` replaces one.

    Data-parallel (:mod:`tilefuse.distributed`): ``nproc`` > 1 runs this call in
    that many processes on this machine (one torch thread each unless
    ``torch_threads``); under ``torchrun`` every rank calls it. Rank 0 alone
    holds the run lock and writes the run folder.
    """
    from tilefuse import distributed
    from tilefuse.outputs import local_path
    from tilefuse.prediction import store_path
    from tilefuse.training import _require

    # one store may be given as itself (a str was iterated: "a.zarr" trained on stores a, ., z, ...)
    stores, val_stores = ([] if group is None else group for group in (stores, val_stores))
    stores = [store_path(s, "stores", "scene") for s in (stores if _many(stores) else [stores])]
    val_stores = [store_path(s, "val_stores", "scene") for s in (val_stores if _many(val_stores) else [val_stores])]
    out = local_path(out, "out", output=True)  # ~ is the home folder
    _require("nproc", nproc, "a whole number >= 1", lambda v: isinstance(v, int) and v >= 1)
    ranks = distributed.from_env()
    # SIGTERM (a batch system's cancel or time limit) unwinds: lock released, ranks stopped, last checkpoint kept
    stopped = f"stopped by SIGTERM: {out} keeps its last checkpoint; continue it with --resume (Python: resume=True)"
    with terminating(stopped if not ranks.launched else None):  # the process the user started (ranks are stopped by it)
        if nproc > 1 and not ranks.launched:
            kwargs = dict(stores=[str(p) for p in stores], out=str(out), val_stores=[str(p) for p in val_stores], hparams=hparams,
                          resume=resume, overwrite=overwrite, progress=progress, **options)
            distributed.launch_call("tilefuse.pipelines.train:train", {"model": model, **kwargs}, nproc)
        else:
            body = _train_locked if ranks.writer else _train
            body(model, stores, out, val_stores=val_stores, hparams=hparams, resume=resume, overwrite=overwrite, progress=progress, **options)
        return Path(os.path.abspath(out))  # a notebook keeps it across os.chdir


def _train(model, stores, out, *, val_stores, hparams, resume, overwrite, progress, **options) -> Path:
    """:func:`train` in this process (one rank of a job: rank 0 also writes)."""
    from tilefuse.training import RunDir, TrainSettings, fit  # first: it sets OpenMP's wait policy before torch loads

    from tilefuse import distributed
    from tilefuse.checkpoint import read_config
    from tilefuse.sampling import SPLIT_FILE, split_sha256
    from tilefuse.training_data import assemble

    writer = distributed.from_env().writer
    run = RunDir(out)
    if writer:
        run.check(resume, overwrite, inputs=[stores, val_stores])
    if not stores:
        raise InputError("no training store: pass at least one in stores= (--store)")
    train_paths = [str(Path(p).resolve()) for p in stores]
    val_paths = [str(Path(p).resolve()) for p in val_stores]
    saved = run.read_trainer()["job"] if resume else None
    if saved and "split_sha256" in saved:  # runs saved before it was recorded are not checked
        run.check_split(saved["split_sha256"])  # before the split file is read
    job = _resolve_job(model, hparams, train_paths, val_paths, options, saved)
    data = DataOptions(**job["data"])
    settings = TrainSettings(**job["settings"])
    settings.check()
    prepared = assemble(
        model, train_paths, val_stores=val_paths, data=data, hparams=job["hparams"], seed=settings.seed,
        batch_size=settings.batch_size, resumed=read_config(run.state) if resume else None, run=run.path if resume else None,
    )
    # after assemble, whose checks name what changed in a store (its classes, its size) where they can
    job["scene_digests"] = prepared.digests
    if saved and "scene_digests" in saved:  # runs saved before they were recorded are not checked
        for path, was, now in zip([*train_paths, *val_paths], saved["scene_digests"], job["scene_digests"]):
            if was != now:
                raise InputError(
                    f"{path} is not the scene store the run was trained on (replaced since: its grid, bands, band "
                    "statistics or labels differ): resume with that store, or start a new run"
                )
    # the split the run trained with: the file found was checked above; one rebuilt for a deleted file must be it
    job["split_sha256"] = split_sha256(prepared.split, prepared.stores, prepared.context)
    if saved and "split_sha256" in saved and job["split_sha256"] != saved["split_sha256"]:
        raise InputError(
            f"{run.path / SPLIT_FILE} was deleted and the split rebuilt in its place is not the one the run was trained "
            "with: restore the file, or start a new run with overwrite=True (--overwrite)"
        )
    if writer and progress and prepared.shares and data.split == "stores":  # whole stores: often far from what was asked
        asked = {"train": 1 - data.val_fraction - data.test_fraction, "val": data.val_fraction, "test": data.test_fraction}
        held = ", ".join(f"{name} {share:.0%} (asked {asked[name]:.0%})" for name, share in prepared.shares.items())
        print(f"tilefuse: note: split by whole stores, the labelled pixels go to {held}", file=sys.stderr)
    if writer:
        run.start(resume, overwrite, inputs=[stores, val_stores])  # guarded: replaces only a run folder
        prepared.save(run.path)  # split file and sampler indexes (one writer: this process holds the run lock)
    fit(
        prepared.model, prepared.config, prepared.train, prepared.val, settings, run,
        job=job, resume=resume, progress=progress, val_batch_size=prepared.val_batch_size,
    )
    return run.path


_train_locked = holds_output("out", inputs=("stores", "val_stores"))(_train)  # one writer per run folder, for the whole training


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
    min_lr: Annotated[Optional[float], typer.Option(help="Learning rate the cosine ends at [0].")] = None,
    ema_decay: Annotated[Optional[float], typer.Option(help="Checkpoint an exponential moving average of the weights with this decay, e.g. 0.99 [0 = off].")] = None,
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
    rescale: Annotated[Optional[tuple[float, float]], typer.Option(help="Patch models: rescale each patch by a random factor in LOW HIGH, then crop (PAD's paper: 0.5 2) [off].")] = None,
    jitter: Annotated[Optional[float], typer.Option(help="Shift each band of each training sample by an offset from N(0, JITTER) standard deviations, e.g. 0.3 [0 = off].")] = None,
    modality_jitter: Annotated[Optional[list[str]], typer.Option("--modality-jitter", help="NAME=SIGMA: shift every band of modality NAME of each training sample by one offset from N(0, SIGMA) standard deviations, a calibration shift, e.g. sar=0.5 (repeat per modality) [off].")] = None,
    modality_dropout: Annotated[Optional[float], typer.Option(help="With probability P replace one modality of a training sample, chosen uniformly, by zeros (its band mean), e.g. 0.3 [0 = off].", metavar="P")] = None,
    modality_dropout_fill: Annotated[Optional[str], typer.Option(help="What replaces a dropped modality: zeros (its band mean) | noise (N(0, 1) standard deviations) [zeros].")] = None,
    val_pixels: Annotated[Optional[int], typer.Option(help="Validation pixels drawn, pixel models [2000].")] = None,
    window: Annotated[Optional[int], typer.Option(help="Edge in px of the window read at once and cut into samples [1024].")] = None,
    patches_per_window: Annotated[Optional[int], typer.Option(help="Random patches cut from each window read [64].")] = None,
    windows_per_round: Annotated[Optional[int], typer.Option(help="Windows whose patches are shuffled together [8].")] = None,
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
    nproc: Annotated[int, typer.Option(help="Data-parallel processes on this machine (DDP; gloo on CPU, NCCL on GPUs) [1].")] = 1,
) -> int:
    """Train a model on scene stores, streaming random patches (or labelled pixels) from zarr."""
    options = {
        "steps": steps, "batch_size": batch_size, "patch_size": patch_size, "pixels_per_class": pixels_per_class,
        "allow_fewer": allow_fewer, "lr": lr, "min_lr": min_lr, "ema_decay": ema_decay, "weight_decay": weight_decay, "warmup": warmup, "grad_clip": grad_clip,
        "val_fraction": val_fraction, "test_fraction": test_fraction, "split": split, "block": block,
        "modalities": modality, "sampler": sampler, "min_labelled": min_labelled, "class_balance": class_balance,
        "rescale": None if rescale is None else list(rescale), "jitter": jitter, "modality_jitter": key_values(modality_jitter, "--modality-jitter", "sar=0.5", value=float, form="NAME=SIGMA"), "modality_dropout": modality_dropout,
        "modality_dropout_fill": modality_dropout_fill, "val_pixels": val_pixels, "window": window,
        "patches_per_window": patches_per_window, "windows_per_round": windows_per_round,
        "checkpoint_every": checkpoint_every, "val_every": val_every, "log_every": log_every, "workers": workers,
        "seed": seed, "device": device, "amp": amp, "torch_threads": torch_threads,
    }
    from tilefuse.distributed import JobFailed

    try:
        path = train(
            model, store, out, val_stores=val_store or (), hparams=key_values(hparam, "--hparam", "preset=femto"),
            resume=resume, overwrite=overwrite, progress=not quiet, nproc=nproc, **options,
        )
    except JobFailed as failed:  # the failing rank's message is printed already
        return failed.code
    summary = json.loads((path / "metrics.json").read_text())
    val = summary.get("val") or {}
    scores = ", ".join(f"{k} {v:.4f}" for k, v in val.items() if k in ("overall_accuracy", "mean_iou", "kappa") and v is not None)
    typer.echo(printable(f"trained {summary['step']} steps -> {out}" + (f" (validation: {scores})" if scores else "")))
    return 0
