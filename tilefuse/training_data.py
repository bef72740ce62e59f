"""Training data assembly: scene stores and data options -> model, config, samplers, datasets, split.

One function, :func:`assemble`, shared by ``tilefuse train`` and
``tilefuse.train`` (``pipelines/train.py`` resolves options, holds the run
lock and calls it). It opens the stores and checks them (labels, modalities,
band counts, band order: :func:`check_band_names`, patch size), merges their
class lists, pools the band statistics of the stores it trains on, builds the model (or rebuilds a resumed run's), picks the sampler from the
model's spec (blended or margin-free models, PAD: random patches; a context
margin and no blending, S²Fin: labelled pixels per class; ``sampler=``
overrides), makes the spatially disjoint split (explicit validation stores,
blocks of the grid, or whole stores; on resume the run's saved split), and the
training and validation datasets.

Nothing is written: :meth:`TrainingData.save` writes the split file and the
sampler indexes into the run folder once the caller has created it (under
data-parallel training, rank 0 only). Given ``run=`` (a resume), the saved
split and indexes are read from it, so a restart does not read every store's
``valid`` and ``label`` again; a store changed since is indexed afresh.
Errors name the Python parameter and its CLI flag (``patch_size= (--patch-size)``).
"""

from __future__ import annotations

import math
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional, Sequence

from tilefuse.errors import InputError

OPEN_THREADS = 8
"""Stores opened at once at start-up (an archive of many stores waits mostly on metadata reads)."""


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
    jitter: float = 0.0
    """Random brightness: each band of each training sample is shifted by an offset drawn from N(0, jitter), in
    units of the band's standard deviation (sensors, dates and calibration differ between stores); 0 = off."""
    modality_jitter: Optional[dict[str, float]] = None
    """Calibration shift: modality name -> sigma; every band of that modality of a training sample is shifted by one
    offset drawn from N(0, sigma) standard deviations (SAR backscatter moves with incidence angle, moisture and
    processing; ``{"sar": 0.5}`` helped PAD and ``{"sar": 1.0}`` S²Fin on real chips, README "Results on small real
    data"); None = off."""
    modality_dropout: float = 0.0
    """With this probability one modality of a training sample, chosen uniformly, is replaced by zeros (its
    normalised band mean), never every modality: the model learns to classify from each alone too; 0 = off."""
    modality_dropout_fill: str = "zeros"
    """zeros | noise: what replaces a dropped modality (noise: N(0, 1) in normalised units). Noise was added
    while an all-zero input stalled PAD's ConvNeXt-V2 encoders; their drawn stem bias has cured that since
    (README, "Results on small real data")."""

    def check(self) -> None:
        """Refuse values no sampler can run with (one line naming the option)."""
        from tilefuse.training import _require

        whole = lambda low: (lambda v: isinstance(v, int) and v >= low)  # noqa: E731
        share = lambda v: 0 <= v < 1  # noqa: E731
        for name in ("patch_size", "pixels_per_class", "val_pixels", "window", "patches_per_window", "windows_per_round"):
            _require(name, getattr(self, name), "a whole number >= 1", whole(1))
        _require("block", self.block, "a whole number of px >= 0 (0 = auto)", whole(0))
        _require("min_labelled", self.min_labelled, "a share in 0..1", lambda v: 0 <= v <= 1)
        _require("jitter", self.jitter, "a number >= 0 (standard deviations; 0 = off)", lambda v: math.isfinite(v) and v >= 0)
        _require("modality_dropout", self.modality_dropout, "a share in 0..1 (below 1; 0 = off)", share)
        sigma = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0  # noqa: E731
        _require(
            "modality_jitter", self.modality_jitter, "a dict of modality name -> sigma >= 0, e.g. {'sar': 0.5}",
            lambda v: v is None or (isinstance(v, dict) and all(isinstance(k, str) and sigma(s) for k, s in v.items())),
        )
        for name in ("val_fraction", "test_fraction"):
            _require(name, getattr(self, name), "a share in 0..1 (below 1)", share)
        if self.val_fraction + self.test_fraction >= 1:
            total = self.val_fraction + self.test_fraction
            raise InputError(f"val_fraction + test_fraction = {total:g} leaves nothing to train on: lower them")
        if self.modality_dropout_fill not in ("zeros", "noise"):
            raise InputError(f"unknown modality_dropout_fill= {self.modality_dropout_fill!r} (--modality-dropout-fill): use zeros or noise")
        if self.split not in ("blocks", "stores"):
            raise InputError(f"unknown split= {self.split!r} (--split): use blocks or stores")
        if self.sampler not in ("auto", "patches", "pixels"):
            raise InputError(f"unknown sampler= {self.sampler!r} (--sampler): use auto, patches or pixels")


@dataclass
class TrainingData:
    """Everything :func:`tilefuse.training.fit` needs besides the loop settings and the run folder."""

    model: Any
    """The :class:`~tilefuse.tile_model.TileModel` (fresh, or rebuilt from a resumed run's config)."""
    config: Any
    """Its :class:`~tilefuse.checkpoint.ModelConfig`."""
    train: Any
    """Training :class:`~tilefuse.dataset.PatchDataset`."""
    val: Any = None
    """Validation dataset, or None."""
    split: Any = None
    """The :class:`~tilefuse.sampling.SpatialSplit` of ``stores``, or None."""
    stores: list[str] = field(default_factory=list)
    """Training then validation stores (resolved), in the split's order."""
    context: int = 0
    """Pixels of input a scored pixel needs around it (the split file's ``context``)."""
    pixels: bool = False
    """Whether the labelled-pixel sampler feeds the model (else random patches)."""
    val_batch_size: int | None = None
    index: Any = None
    """The :class:`~tilefuse.sampling.IndexCache` the samplers' indexes went through."""
    shares: dict[str, float] | None = None
    """The share of the labelled pixels the split gives train, val and test, where it was drawn here (not read back)."""
    digests: list[str] = field(default_factory=list)
    """:func:`~tilefuse.scene.scene_digest` of each of ``stores``, labels included (a resume must read the same scenes)."""
    notes: list[str] = field(default_factory=list)
    """What the caller should know but is no error (each also printed on stderr as ``tilefuse: note: ...``): classes
    of the model that no training pixel shows (:func:`untrained_classes`)."""

    def save(self, run: str | os.PathLike) -> None:
        """Write the split file and the sampler indexes into the (existing) run folder ``run``."""
        from tilefuse.sampling import INDEX_DIR, save_split

        if self.split is not None:
            save_split(run, self.split, self.stores, self.context)
        if self.index is not None:
            self.index.save(Path(run) / INDEX_DIR)


def class_names_of(scenes, paths) -> list[str]:
    """The merged class list of every store's labels (:func:`tilefuse.classes.merge_class_names`)."""
    from tilefuse.classes import merge_class_names, store_class_names

    names = merge_class_names([(str(path), store_class_names(ds)) for ds, path in zip(scenes, paths)])
    if not names:
        raise InputError(f"no labelled pixels in {', '.join(map(str, paths))}: ingest labels with --labels PATH")
    return names


def other_bands(names: list[str], reference: list[str], here: str = "here", there: str = "there") -> str | None:
    """How two band name lists of one modality hold other bands, not just the same ones in another order
    (``"'nir' there but not here; 'swir' here but not there"``), or None: the same named bands, or a difference
    that made-up names (``b4``, :func:`tilefuse.checkpoint.known_band_names`) in the other list may account for.
    Names are compared as :func:`tilefuse.checkpoint.band_names_conflict` compares them (case and spaces aside)."""
    from tilefuse.checkpoint import known_band_names

    ours, theirs = known_band_names(names), known_band_names(reference)
    extra = list(dict.fromkeys(n.strip() for n, k in zip(names, ours) if k is not None and k not in theirs))
    missing = list(dict.fromkeys(n.strip() for n, k in zip(reference, theirs) if k is not None and k not in ours))
    if not ((extra and None not in theirs) or (missing and None not in ours)):
        return None
    quoted = lambda found: ", ".join(map(repr, found))  # noqa: E731
    return "; ".join(
        [*([f"{quoted(missing)} {there} but not {here}"] if missing else []), *([f"{quoted(extra)} {here} but not {there}"] if extra else [])]
    )


def check_band_names(scenes, paths, modalities, recorded: dict[str, list[str]] | None = None) -> dict[str, list[str]]:
    """The band names to record for each of ``modalities``; refuses stores that give a modality its bands in
    another order, or other bands (InputError, one line naming both stores, the modality, both name lists, the
    bands one holds and the other not (:func:`other_bands`) or the first band out of place, and the fix).

    Every store is compared with every other (and, on a resume, with the names the run ``recorded``; in effect
    with each distinct list that shares a known name with it, so an archive of many stores stays quick) by
    :func:`tilefuse.checkpoint.band_names_conflict`: made-up names (``b1``, ``b2``, ... that ingest gives
    bands without a description; ``1``, ``2``, ...) are unknown and compared with nothing, lists without a
    known name in common (``B02`` against ``blue``) are not compared, and otherwise each named band must sit
    at the same position. A store without a band coordinate is not checked. Recorded per modality: the run's
    names on a resume, else the store list with the most known names (the first of those).
    """
    from tilefuse.checkpoint import band_names_conflict, known_band_names
    from tilefuse.scene import store_band_names

    recorded = recorded or {}
    names_of: dict[str, list[str]] = {}
    for name in modalities:
        seen: list[tuple[list[str], str | None]] = []  # the distinct lists met so far, with where first (None: the run)
        sharing: dict[str, list[int]] = {}  # known name -> the lists in seen that hold it (only those can conflict)
        met: set[tuple[str, ...]] = set()

        def add(names: list[str], where: str | None) -> None:
            for known in set(known_band_names(names)) - {None}:
                sharing.setdefault(known, []).append(len(seen))
            seen.append((names, where))
            met.add(tuple(names))

        if name in recorded:
            add(list(recorded[name]), None)
        for ds, path in zip(scenes, paths):
            names = store_band_names(ds, name)
            if names is None or tuple(names) in met:
                continue
            candidates = sorted({i for known in set(known_band_names(names)) - {None} for i in sharing.get(known, ())})
            for ref, where in (seen[i] for i in candidates):
                problem = band_names_conflict(names, ref, *(("in the first", "in the second") if where else ("in the store", "in the run")))
                if problem is None:
                    continue
                here, there = ("in the store", "in the run") if where is None else ("in the first", "in the second")
                differ = other_bands(names, ref, here, there)
                if where is None:
                    if differ:
                        raise InputError(
                            f"{path} gives modality {name!r} the bands {names} but the run being resumed was trained on {ref}, "
                            f"other bands ({differ}): resume with the stores the run was trained on, or start a new run"
                        )
                    raise InputError(
                        f"{path} gives modality {name!r} the bands {names} but the run being resumed was trained on {ref} "
                        f"({problem}): resume with the stores the run was trained on (or re-ingest this one with its bands in the "
                        "run's order and with the same names), or start a new run"
                    )
                if differ:
                    raise InputError(
                        f"{path} and {where} give modality {name!r} other bands: {names} and {ref} ({differ}); the model "
                        "would mix them: train on them separately, or re-ingest one of them with the other's bands, in its order "
                        "and with its names"
                    )
                raise InputError(
                    f"{path} and {where} give modality {name!r} its bands in another order: {names} and "
                    f"{ref} ({problem}); the model would mix them: re-ingest one of them with its bands in the other's "
                    "order and with the same names, or train on them separately"
                )
            add(names, path)
        if name in recorded:
            names_of[name] = list(recorded[name])
        elif seen:  # the list with the most known names, the first of those (max keeps the first of equals)
            names_of[name] = max((ref for ref, _ in seen), key=lambda ref: sum(n is not None for n in known_band_names(ref)))
    return names_of


def label_counts(ds) -> list[int] | None:
    """Labelled pixels per class id of a store (the ``class_counts`` ingest records), None where not recorded."""
    counts = ds["label"].attrs.get("class_counts") if "label" in ds else None
    return [int(c) for c in counts] if isinstance(counts, list) else None


def untrained_classes(class_names: Sequence[str], trained: set[int], held: set[int]) -> str | None:
    """The note naming the classes of ``class_names`` that held-out pixels hold (``held``: validation or test data)
    but no training pixel shows (not in ``trained``), or None: the model is scored on them and cannot learn them.
    Not an error (a class may be left out on purpose). A class named but labelled nowhere (a store's fixed legend)
    is no news and not named."""
    absent = [k for k in range(len(class_names)) if k in held and k not in trained]
    if not absent:
        return None
    listing = [f"{class_names[k]!r} (id {k})" for k in absent]
    them = "it" if len(absent) == 1 else "them"
    return (
        f"held-out pixels hold class{'es' if len(absent) > 1 else ''} {', '.join(listing[:-1]) + ' and ' if len(listing) > 1 else ''}"
        f"{listing[-1]} but no training pixel does: the model cannot learn {them}; train on stores that hold {them}, unless "
        f"{'it is' if len(absent) == 1 else 'they are'} left out on purpose"
    )


def default_block(unit: int, smallest: int) -> int:
    """Split block edge: a multiple of ``unit`` near 512 px, small enough for 4 blocks across the smallest store."""
    return unit * max(1, min(-(-512 // unit), smallest // (4 * unit)))


def rescale_range(data: DataOptions, pixels: bool) -> tuple[float, float] | None:
    """``data.rescale`` as ``(low, high)``, checked; None when off."""
    if data.rescale is None:
        return None
    value = data.rescale
    if pixels or not isinstance(value, (list, tuple)) or len(value) != 2 or not all(isinstance(v, (int, float)) and v > 0 for v in value) or value[0] > value[1]:
        raise InputError(f"rescale= must be [low, high] with 0 < low <= high, for patch models only; got {value!r}")
    return float(value[0]), float(value[1])


def _split(scenes, readers, paths: list[str], n_train: int, data: DataOptions, pixels: bool, tile: int, seed: int, has_val_stores: bool):
    """The split of all ``scenes`` (training then validation stores), or None, and the share of the labelled
    pixels each subset holds where the split was drawn from them (else None)."""
    import numpy as np

    from tilefuse.sampling import SUBSETS, SpatialSplit, labelled_per_block, spatial_split

    if has_val_stores:
        if data.test_fraction > 0:  # test blocks of the training stores (it was dropped without a word); the rest validates
            held, _ = _split(scenes[:n_train], readers[:n_train], paths[:n_train], n_train, replace(data, val_fraction=0.0), pixels, tile, seed, False)
            blocks = [np.ones((-(-ds.sizes["y"] // held.block), -(-ds.sizes["x"] // held.block)), np.int8) for ds in scenes[n_train:]]
            return SpatialSplit(held.block, (*held.assignment, *blocks)), None
        edge = max(max(ds.sizes["y"], ds.sizes["x"]) for ds in scenes)
        return SpatialSplit(edge, tuple(np.full((1, 1), 0 if i < n_train else 1, np.int8) for i in range(len(scenes)))), None
    if data.val_fraction <= 0 and data.test_fraction <= 0:
        return None, None
    if data.split == "stores":
        block = max(max(ds.sizes["y"], ds.sizes["x"]) for ds in scenes)
    else:
        if data.block and data.block < tile:  # held-out blocks would cut every training sample and hold none
            raise InputError(f"block= (--block) {data.block} is smaller than a sample ({tile} px): pass block >= {tile}, or 0 (auto)")
        block = data.block or default_block(32 if pixels else tile, min(min(ds.sizes["y"], ds.sizes["x"]) for ds in scenes))
    labelled = [labelled_per_block(reader, block) for reader in readers]
    if not any(w.sum() for w in labelled):
        raise InputError(f"no valid labelled pixels in {', '.join(paths)}: check the labels (255 = none) and the valid mask")
    # an edge block narrower than a sample holds no validation (or test) sample of its own: a validation of such
    # blocks alone was empty without a word; they stay in training (weight 0: never held out)
    fitting = [w * np.outer(_extents(ds.sizes["y"], block) >= tile, _extents(ds.sizes["x"], block) >= tile) for w, ds in zip(labelled, scenes)]
    weights = fitting if any(w.sum() for w in fitting) else labelled  # stores all smaller than a sample: as they come
    split = spatial_split(
        [(ds.sizes["y"], ds.sizes["x"]) for ds in scenes],
        by=data.split, val=data.val_fraction, test=data.test_fraction, block=block, weights=weights, seed=seed,
    )
    # of every labelled pixel: the blocks kept out of the draw (weight 0) are trained on
    total = sum(float(w.sum()) for w in labelled)
    shares = {s: sum(float(w[a == k].sum()) for w, a in zip(labelled, split.assignment)) / total for k, s in enumerate(SUBSETS)}
    return split, shares


def training_stores(split, n_train: int) -> list[int]:
    """Indexes of the stores among the first ``n_train`` (the training stores) that ``split`` gives at least one
    training block: all of them without a split; a store the split holds out whole (``split="stores"``) is not one."""
    if split is None:
        return list(range(n_train))
    kept = [i for i in range(n_train) if (split.assignment[i] == 0).any()]
    return kept or list(range(n_train))  # (a split always trains on something: never reached)


def _extents(size: int, block: int):
    """Edge in px of each block along an axis of ``size`` px (the last one may be shorter)."""
    import numpy as np

    return np.minimum(block, size - np.arange(0, size, block))


def _saved_split(run: Path | None, paths: list[str], scenes):
    """The split a resumed run saved, when it is for these stores and their shapes (else None)."""
    from tilefuse.sampling import SPLIT_FILE, load_split

    if run is None or not (run / SPLIT_FILE).is_file():
        return None
    saved = load_split(run)
    if saved.stores != paths or len(saved.split.assignment) != len(scenes):
        return None
    block = saved.split.block
    for a, ds, path in zip(saved.split.assignment, scenes, paths):
        h, w = ds.sizes["y"], ds.sizes["x"]
        if a.shape != (-(-h // block), -(-w // block)):  # a split afresh could train on blocks the run validated on
            raise InputError(
                f"{path} is {h} x {w} px, no longer the size the run split into {a.shape[0]} x {a.shape[1]} blocks of {block} px: "
                "it changed since the run started; resume with the store as it was, or start a new run"
            )
    return saved.split


def check_batch_memory(batch_size: int, sample_bytes: int) -> None:
    """Refuse a batch whose samples alone would take more than a quarter of the free memory (a typo, not a run:
    DataLoader workers assemble batches for ever before running out)."""
    import psutil

    from tilefuse.outputs import human_size

    free = psutil.virtual_memory().available
    if batch_size * sample_bytes > free // 4:
        raise InputError(
            f"batch_size= (--batch-size) {batch_size} would hold {human_size(batch_size * sample_bytes)} of samples per batch, "
            f"more than a quarter of the free memory ({human_size(free)}): lower it"
        )


def assemble(
    model: str,
    stores: Sequence[str | os.PathLike],
    *,
    val_stores: Sequence[str | os.PathLike] = (),
    data: DataOptions | None = None,
    hparams: dict[str, Any] | None = None,
    seed: int = 42,
    batch_size: int = 8,
    resumed: Any = None,
    run: str | os.PathLike | None = None,
) -> TrainingData:
    """The model and training data of registered model ``model`` on scene ``stores``.

    ``data`` are the :class:`DataOptions` (checked here); ``hparams`` the
    model's hyperparameters; ``seed`` fixes the weights, the split and the
    sampling; ``batch_size`` sizes validation batches of pixel models.
    ``resumed`` (a :class:`~tilefuse.checkpoint.ModelConfig`) rebuilds a
    stopped run's model, band counts and statistics instead of fresh ones;
    ``run`` is its folder, from which the saved split and sampler indexes are
    read (nothing is written: see :meth:`TrainingData.save`).

    The band statistics that normalise the model's inputs are pooled from the
    statistics ingest stored per store (:func:`~tilefuse.dataset.pooled_band_stats`)
    over the training stores the split trains on: never a validation store, nor a
    store ``split="stores"`` holds out whole. A split by blocks holds out parts of
    a store, whose statistics (computed at ingest over the whole store) therefore
    include the held-out blocks' pixels.
    """
    import tilefuse.training  # noqa: F401  (first: it sets OpenMP's wait policy before torch loads)

    import torch

    from tilefuse import distributed
    from tilefuse.checkpoint import ModelConfig
    from tilefuse.dataset import PatchDataset, pooled_band_stats
    from tilefuse.errors import printable
    from tilefuse.sampling import (
        INDEX_DIR,
        GridPatchSampler,
        IndexCache,
        LabelledPixelSampler,
        RandomPatchSampler,
        SceneReader,
        check_patch_fits,
    )
    from tilefuse.scene import band_dim, modalities as store_modalities, open_scene, require_modalities, scene_digest
    from tilefuse.tile_model import build_model

    data = data or DataOptions()
    data.check()
    if not stores:
        raise InputError("no training store: pass at least one store (--store)")
    train_paths = [str(Path(p).resolve()) for p in stores]
    val_paths = [str(Path(p).resolve()) for p in val_stores]
    paths = train_paths + val_paths
    for k, path in enumerate(paths):  # real paths: a symlink or another spelling of a store is the store
        if path in paths[:k]:
            first, again = ("--store" if i < len(train_paths) else "--val-store" for i in (paths.index(path), k))
            raise InputError(
                f"store {path} is given twice (as {first} and as {again}): its pixels would be both trained and "
                "validated on (or held out by two different splits); give each store once"
            )
    hparams = dict(hparams or {})
    run = None if run is None else Path(run)

    with ThreadPoolExecutor(OPEN_THREADS) as pool:  # opening is mostly waiting on metadata reads: overlap it
        scenes = list(pool.map(open_scene, paths))
    for ds, path in zip(scenes, paths):
        if "label" not in ds:
            raise InputError(f"{path} has no labels: ingest it with --labels PATH to train on it")
    available = store_modalities(scenes[0])
    names = data.modalities or available
    if not all(isinstance(n, str) for n in names) or len(set(names)) != len(names):  # a name twice fed it once, silently
        raise InputError(f"modalities= (--modality) must name each store modality once, in the model's order: got {list(names)} (the store has {', '.join(available)})")
    missing = [n for n in names if n not in available]
    if missing:
        raise InputError(f"{paths[0]} has no modality {missing[0]!r} (it has {', '.join(available)}): check modalities= (--modality)")
    if not data.modalities and resumed is None:  # the default, the first store's: another store may lack one
        have = [store_modalities(ds) for ds in scenes]
        common = [n for n in available if all(n in h for h in have)]
        for h, path in zip(have, paths):
            lacking = [n for n in available if n not in h]
            if lacking:
                raise InputError(
                    f"{path} has no modality {lacking[0]!r} (it has {', '.join(h)}): pass modalities= (--modality) "
                    f"to train on those every store has ({', '.join(common) or 'none'}), or ingest it there"
                )
    bands = dict(resumed.modalities) if resumed is not None else {n: int(scenes[0][n].sizes[band_dim(n)]) for n in names}
    strange = [n for n in data.modality_jitter or {} if n not in bands]
    if strange:
        raise InputError(f"modality_jitter= (--modality-jitter) names {strange[0]!r}, which the model does not read: name one of {', '.join(bands)}")
    for ds, path in zip(scenes, paths):
        require_modalities(ds, bands, where=path)
    names_of_bands = check_band_names(scenes, paths, list(bands), resumed.band_names if resumed is not None else None)
    class_names = class_names_of(scenes, paths)

    if resumed is not None:
        from tilefuse.classes import merge_class_names

        # a store re-ingested with other names for its ids must not go on training the run's weights under them
        fix = "resume with the stores the run was trained on, or start a new run"
        merge_class_names([("the run", list(resumed.class_names)), ("the stores", class_names)], fix=fix)
        if resumed.num_classes != len(class_names):
            raise InputError(
                f"the run's model has {resumed.num_classes} classes but the stores have {len(class_names)}: resume with the same stores"
            )
        net = resumed.build()
        band_stats = resumed.band_stats
    else:
        torch.manual_seed(seed)
        net = build_model(model, bands, len(class_names), **hparams)
        band_stats = None  # pooled below, over the stores the split trains on
    spec = net.spec
    if list(spec.modalities) != list(bands):
        raise InputError(
            f"model {model!r} reads modalities {list(spec.modalities)}, the stores give {list(bands)}: pass modalities= (--modality) for each, in order"
        )
    pixels = data.sampler == "pixels" or (data.sampler == "auto" and spec.margin > 0 and not spec.blend)
    if not pixels:
        for ds, path in zip(scenes, paths):
            check_patch_fits((ds.sizes["y"], ds.sizes["x"]), data.patch_size, path)
    # validation tiles of the patch size; pixel models validate on pixels, blocks of 512 px
    tile = 2 * spec.margin + 1 if pixels else data.patch_size
    check_batch_memory(batch_size, tile * tile * (4 * sum(spec.modalities.values()) + 8))  # float32 bands, int64 label
    readers = [SceneReader(p) for p in paths]  # one zarr handle per store, shared by the split and the samplers
    with ThreadPoolExecutor(OPEN_THREADS) as pool:
        list(pool.map(lambda reader: reader.group, readers))
    split, shares = _saved_split(run, paths, scenes), None
    if split is None:
        split, shares = _split(scenes, readers, paths, len(train_paths), data, pixels, tile, seed, bool(val_paths))
    if resumed is None:  # a new run (a resumed one keeps its statistics): never those of a store held out whole
        band_stats = pooled_band_stats([scenes[i] for i in training_stores(split, len(train_paths))], list(bands))
    digests = [scene_digest(ds, store_modalities(ds), labels=True) for ds in scenes]
    counts = [label_counts(ds) for ds in scenes]
    del scenes  # the samplers read zarr directly

    index = IndexCache(None if run is None else run / INDEX_DIR)
    modalities = list(bands)
    if pixels:
        sampler = LabelledPixelSampler(
            readers, modalities, 2 * spec.margin + 1, data.pixels_per_class,
            split=split, allow_fewer=data.allow_fewer, class_names=class_names, window=data.window, seed=seed, index=index,
        )
    else:
        sampler = RandomPatchSampler(
            readers, modalities, data.patch_size,
            margin=spec.margin, split=split, min_labelled=data.min_labelled, class_balance=data.class_balance,
            window=data.window, patches_per_window=data.patches_per_window,
            windows_per_round=data.windows_per_round, seed=seed, index=index,
        )
    notes = []
    trained = training_stores(split, len(train_paths))
    if pixels:  # the sampler counted the eligible pixels of each class in the training area (blocks included)
        known: set[int] | None = set(sampler.present)
    elif all(counts[i] is not None for i in trained):  # the stores' recorded counts (a split by blocks is not seen)
        known = {k for i in trained for k, c in enumerate(counts[i]) if c}
    else:  # a store written without counts: not read again for a note
        known = None
    if known is not None and split is not None:  # nothing held out: nothing scored that training lacks
        held = {k for c in counts if c is not None for k, n in enumerate(c) if n}
        note = untrained_classes(class_names, known, held - known)
        if note:
            notes.append(note)
    if notes and distributed.from_env().writer:  # once per job, not once per rank
        for note in notes:
            print(printable(f"tilefuse: note: {note}"), file=sys.stderr)
    val_data = None
    if split is not None and split.fraction("val") > 0:
        if pixels:
            val_sampler = LabelledPixelSampler(
                readers, modalities, tile, data.val_pixels, per_class=False, repeat=False,
                split=split, subset="val", allow_fewer=True, window=data.window, seed=seed, index=index,
            )
        else:
            val_sampler = GridPatchSampler(readers, modalities, tile, margin=spec.margin, split=split, subset="val", window=data.window)
        val_data = PatchDataset(val_sampler, band_stats, margin=spec.margin, augment=False)

    config = ModelConfig(
        model=model,
        modalities=dict(spec.modalities),
        num_classes=spec.num_classes,
        hparams=hparams,
        class_names=class_names,
        band_stats=band_stats,
        band_names=names_of_bands,
        extra={"stores": train_paths, "val_stores": val_paths, "sampler": "pixels" if pixels else "patches"},
    )
    train_data = PatchDataset(
        sampler, band_stats, margin=spec.margin, augment=True, rescale=rescale_range(data, pixels),
        jitter=data.jitter, modality_jitter=data.modality_jitter, modality_dropout=data.modality_dropout,
        modality_dropout_fill=data.modality_dropout_fill, seed=seed,
    )
    return TrainingData(
        model=net,
        config=config,
        train=train_data,
        val=val_data,
        split=split,
        stores=paths,
        context=spec.margin if pixels else data.patch_size // 2,
        pixels=pixels,
        val_batch_size=max(256, batch_size) if pixels else None,
        index=index,
        digests=digests,
        shares=shares,
        notes=notes,
    )
