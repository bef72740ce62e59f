"""PAD and S²Fin on small real chips against per-pixel baselines, in two protocols.

    .venv/bin/python benchmarks/real_data.py --protocol same-region --methods logreg,hgb,pad,s2fin
    .venv/bin/python benchmarks/real_data.py --protocol leave-one-out --datasets terramind

Datasets (``../shared/data``, see its README): ``terramind`` (4 chips, S2L2A
12 bands + S1RTC 2 bands, LULC labels; chip 609U holds one class) and
``sen1floods11`` (one chip, S2 13 bands + S1, binary water). Each dataset trains
its own models (their band counts and classes differ).

Protocols:

- ``same-region``: every chip is cut into a top part (training) and a bottom
  part (test, never seen), with ``--gap`` rows between them (at least the
  model's context); one model is trained on the training parts of every chip
  of the dataset and scored on each test part.
- ``leave-one-out``: for each chip, train on the other chips, test on it.

The parts are written as cropped GeoTIFFs (rasterio windows) into ``--work``
and ingested as separate stores, so a model can never read a test pixel while
training. Models go through the public API (``tilefuse.ingest``,
``tilefuse.train``, ``tilefuse.predict``); every method is scored with
``tilefuse.metrics.ConfusionMatrix`` (what ``tilefuse.evaluate`` computes) on
the same pixels, S²Fin's on its labelled-pixel patches (dense S²Fin over a
whole test part costs minutes on a CPU).

Methods (``--methods``), all scored on the same test pixels (every labelled
test pixel, or ``--score-pixels`` uniform ones per chip):

- ``logreg``, ``hgb``: per-pixel multinomial logistic regression and
  HistGradientBoosting (scikit-learn, the ``bench`` extra; without it ``logreg``
  minimises the same objective with torch) on the stacked, standardised bands of
  every labelled training pixel;
- ``pad``: PAD (``--pad-preset``, default ``micro``, with the full-resolution
  ``pixel_head`` and its linear term ``pixel_head_linear``; 600 steps, batch 8,
  patch 96, lr 1e-3, ``rescale=[0.5, 2]``, ``modality_jitter={"sar": 0.5}``, no
  class balancing, unless
  ``--pad-option`` / ``--pad-hparam`` say otherwise), tiled inference with
  ``tilefuse.predict``; three models (training seeds 42, 1, 2) whose softmax
  probabilities are averaged, or one with ``--pad-option seed=N``;
- ``s2fin``: S²Fin (300 steps, batch 32, lr 1e-3, ``modality_jitter={"sar": 1.0}``)
  on ``--pixels-per-class`` labelled pixels per class, with
  ``logreg-few`` and ``hgb-few`` fitted on exactly those pixels. Which pixels
  are drawn moves S²Fin's margin over them by several hundredths of mIoU, so
  ``--draws N`` repeats the three on N draws (training seeds 42, 43, ...) and
  prints each draw's pooled scores with their mean, spread and minimum.

Prints OA, mIoU and kappa per test chip and pooled (summed confusion
matrices), and the wall time of each method (training + prediction); writes
``results.json`` into ``--work``. Extra training options go through
``--pad-option KEY=VALUE`` / ``--s2fin-option`` (and ``--pad-hparam`` /
``--s2fin-hparam``), as to ``tilefuse.train``.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

# PAD's default in this script: three models (these training seeds), softmax averaged
PAD_SEEDS = (42, 1, 2)

# TerraMind LULC codes (ESRI-style, 0 unused) -> contiguous class ids
TM_CODES = {1: "water", 2: "trees", 3: "flooded_vegetation", 4: "crops", 5: "built_area", 6: "bare_ground", 7: "snow_ice", 8: "clouds", 9: "rangeland"}


@dataclass
class Dataset:
    name: str
    chips: dict[str, dict[str, Path]]  # chip -> {"optical": tif, "sar": tif, "labels": tif}
    label_map: dict[int, int]
    class_names: list[str]


def datasets(root: Path) -> dict[str, Dataset]:
    tm = root / "terramind"
    chips = sorted(p.stem for p in (tm / "LULC").glob("*.tif"))
    flood = root / "sen1floods11"
    flood_chips = sorted(p.name.removesuffix("_LabelHand.tif") for p in (flood / "Labels").glob("*.tif"))
    return {
        "terramind": Dataset(
            "terramind",
            {c: {"optical": tm / "S2L2A" / f"{c}.tif", "sar": tm / "S1RTC" / f"{c}.tif", "labels": tm / "LULC" / f"{c}.tif"} for c in chips},
            {code: i for i, code in enumerate(TM_CODES)} | {0: 255},
            list(TM_CODES.values()),
        ),
        "sen1floods11": Dataset(
            "sen1floods11",
            {
                c: {
                    "optical": next((flood / "S2").glob(f"{c}*.tif")),
                    "sar": next((flood / "S1").glob(f"{c}*.tif")),
                    "labels": next((flood / "Labels").glob(f"{c}*.tif")),
                }
                for c in flood_chips
            },
            {-1: 255, 0: 0, 1: 1},
            ["not_water", "water"],
        ),
    }


def crop(src: Path, dst: Path, rows: slice, standardise: bool = False) -> Path:
    """Rows ``rows`` of GeoTIFF ``src`` as GeoTIFF ``dst`` (same georeference, shifted).

    ``standardise``: the experiment hook behind ``--normalise per-store``: each band is
    written as float32 standardised by that part's own valid-pixel mean and std (nodata
    and NaN become NaN), so the pooled statistics ``tilefuse.train`` computes over such
    stores are about (0, 1) and each store is, in effect, normalised by its own.
    """
    import rasterio
    from rasterio.windows import Window

    with rasterio.open(src) as f:
        start, stop, _ = rows.indices(f.height)
        window = Window(0, start, f.width, stop - start)
        profile = f.profile | {"height": stop - start, "transform": f.window_transform(window)}
        profile.pop("blockxsize", None), profile.pop("blockysize", None), profile.update(tiled=False)
        data = f.read(window=window)
        if standardise:
            values = data.astype(np.float64)
            if f.nodata is not None and not np.isnan(f.nodata):
                values[data == f.nodata] = np.nan
            mean = np.nanmean(values, axis=(1, 2), keepdims=True)
            std = np.nanstd(values, axis=(1, 2), keepdims=True)
            data = ((values - mean) / np.where(std > 0, std, 1.0)).astype(np.float32)
            profile.update(dtype="float32", nodata=float("nan"))
    dst.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(dst, "w", **profile) as out:
        out.write(data)
    return dst


def ingest_part(ds: Dataset, chip: str, part: str, rows: slice, work: Path, normalise: str = "pooled") -> Path:
    import tilefuse

    where = work / ds.name / ("" if normalise == "pooled" else normalise)
    store = where / f"{chip}-{part}.zarr"
    if store.exists():
        return store
    files = {
        key: crop(path, where / "tif" / f"{chip}-{part}-{key}.tif", rows, standardise=normalise == "per-store" and key != "labels")
        for key, path in ds.chips[chip].items()
    }
    labels = files.pop("labels")
    return tilefuse.ingest(store, files, labels=labels, label_map=ds.label_map, class_names=ds.class_names)


@dataclass
class Fold:
    train: list[Path]
    test: dict[str, Path]  # chip -> store


def folds(ds: Dataset, protocol: str, work: Path, test_rows: int, gap: int, normalise: str = "pooled") -> list[Fold]:
    import rasterio

    if protocol == "same-region":
        train, test = [], {}
        for chip, files in ds.chips.items():
            with rasterio.open(files["labels"]) as f:
                height = f.height
            train.append(ingest_part(ds, chip, "train", slice(0, height - test_rows - gap), work, normalise))
            test[chip] = ingest_part(ds, chip, "test", slice(height - test_rows, height), work, normalise)
        return [Fold(train, test)]
    if protocol == "leave-one-out":
        whole = {chip: ingest_part(ds, chip, "whole", slice(None), work, normalise) for chip in ds.chips}
        if len(whole) < 2:
            return []
        return [Fold([s for c, s in whole.items() if c != chip], {chip: whole[chip]}) for chip in whole]
    raise SystemExit(f"unknown protocol {protocol!r}: use same-region or leave-one-out")


# ---- pixels -------------------------------------------------------------------------------------

def stacked(store: Path, stats: dict) -> tuple[np.ndarray, np.ndarray, int]:
    """(pixels, bands) standardised bands, (pixels,) labels (255 = none / not valid), and the width."""
    import tilefuse
    from tilefuse.scene import IGNORE, normalise

    scene = tilefuse.open_scene(store)
    bands = [normalise(scene[m].values, np.asarray(stats[m]["mean"]), np.asarray(stats[m]["std"])) for m in ("optical", "sar")]
    x = np.concatenate(bands).reshape(sum(len(b) for b in bands), -1).T
    y = np.where(scene["valid"].values, scene["label"].values, IGNORE).ravel()
    return x, y, scene.sizes["x"]


def scored_pixels(store: Path, count: int | None, seed: int = 0) -> np.ndarray:
    """Flat indices of the labelled pixels scored on ``store`` (all, or ``count`` uniform ones)."""
    import tilefuse
    from tilefuse.scene import IGNORE

    scene = tilefuse.open_scene(store)
    y = np.where(scene["valid"].values, scene["label"].values, IGNORE).ravel()
    index = np.flatnonzero(y != IGNORE)
    if count is not None and count < len(index):
        index = np.sort(np.random.default_rng(seed).choice(index, count, replace=False))
    return index


def fit_pixels(kind: str, x: np.ndarray, y: np.ndarray, seed: int = 0) -> Callable[[np.ndarray], np.ndarray]:
    """A per-pixel classifier: ``logreg`` (multinomial, L2) or ``hgb`` (HistGradientBoosting).

    scikit-learn (the ``bench`` extra) fits both; without it ``logreg`` falls back to
    :func:`fit_logreg_torch`, the same objective minimised by torch's L-BFGS.
    """
    if len(np.unique(y)) == 1:
        only = y[0]
        return lambda values: np.full(len(values), only)
    try:
        from sklearn.ensemble import HistGradientBoostingClassifier
        from sklearn.linear_model import LogisticRegression
    except ImportError:
        if kind == "logreg":
            return fit_logreg_torch(x, y)
        raise SystemExit(f"method {kind!r} needs scikit-learn: pip install -e .[bench] (or leave {kind!r} out of --methods)")
    if kind == "logreg":
        model = LogisticRegression(max_iter=500, C=1.0)
    else:
        model = HistGradientBoostingClassifier(max_iter=100, learning_rate=0.1, early_stopping=False, random_state=seed)
    model.fit(x, y)
    return model.predict


def fit_logreg_torch(x: np.ndarray, y: np.ndarray, c: float = 1.0, max_iter: int = 500) -> Callable[[np.ndarray], np.ndarray]:
    """Multinomial logistic regression with scikit-learn's objective, ``C * sum(log loss) + |W|^2 / 2``
    (intercept not penalised), minimised in float64 by L-BFGS; strictly convex, so the same optimum."""
    import torch

    classes, target = np.unique(y, return_inverse=True)
    features = torch.from_numpy(np.asarray(x, np.float64))
    target = torch.from_numpy(target)
    weight = torch.zeros(features.shape[1], len(classes), dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(len(classes), dtype=torch.float64, requires_grad=True)
    optimiser = torch.optim.LBFGS([weight, bias], max_iter=max_iter, tolerance_grad=1e-6, tolerance_change=1e-12, line_search_fn="strong_wolfe")
    scale = c * len(target)  # the objective divided by it, for conditioning: same minimiser

    def objective() -> torch.Tensor:
        optimiser.zero_grad()
        loss = torch.nn.functional.cross_entropy(features @ weight + bias, target) + 0.5 * (weight**2).sum() / scale
        loss.backward()
        return loss

    optimiser.step(objective)
    w, b = weight.detach().numpy(), bias.detach().numpy()
    return lambda values: classes[np.argmax(np.asarray(values, np.float64) @ w + b, axis=1)]


# ---- methods: each trains on a fold and returns chip -> predicted labels at the scored pixels --------

@dataclass
class Context:
    ds: Dataset
    fold: Fold
    work: Path
    scored: dict[str, np.ndarray]  # chip -> flat indices
    truth: dict[str, np.ndarray]  # chip -> labels of the scored pixels
    args: argparse.Namespace
    seed: int = 42  # S²Fin's training seed, which also draws its labelled pixels (the few-pixel baselines get the same)
    cache: dict = field(default_factory=dict)

    def stats(self) -> dict:
        from tilefuse.dataset import pooled_band_stats
        import tilefuse

        if "stats" not in self.cache:
            self.cache["stats"] = pooled_band_stats([tilefuse.open_scene(s) for s in self.fold.train], ["optical", "sar"])
        return self.cache["stats"]


def run_pixel_baseline(kind: str, ctx: Context, few: bool = False) -> dict[str, np.ndarray]:
    from tilefuse.scene import IGNORE

    stats = ctx.stats()
    data = [stacked(s, stats) for s in ctx.fold.train]
    if few:  # exactly S²Fin's labelled pixels (same sampler arguments and seed as tilefuse.train)
        pixels = s2fin_pixels(ctx)
        x = np.stack([data[s][0][r * data[s][2] + c] for s, r, c, _ in pixels.tolist()])
        y = pixels[:, 3]
    else:
        x, y = np.concatenate([d[0] for d in data]), np.concatenate([d[1] for d in data])
        keep = y != IGNORE
        x, y = x[keep], y[keep]
    classify = fit_pixels(kind, x, y)
    return {chip: classify(stacked(store, stats)[0][ctx.scored[chip]]) for chip, store in ctx.fold.test.items()}


def parse_options(items: list[str]) -> dict:
    from tilefuse.errors import json_or_text

    return {key: json_or_text(value) for key, _, value in (item.partition("=") for item in items)}


def s2fin_options(ctx: Context) -> dict:
    return {
        "steps": 300, "batch_size": 32, "lr": 1e-3, "pixels_per_class": ctx.args.pixels_per_class, "allow_fewer": True,
        "modality_jitter": {"sar": 1.0}, "torch_threads": ctx.args.threads,
    } | parse_options(ctx.args.s2fin_option) | {"seed": ctx.seed}


def s2fin_pixels(ctx: Context) -> np.ndarray:
    from tilefuse.sampling import LabelledPixelSampler

    options = s2fin_options(ctx)
    patch = int(parse_options(ctx.args.s2fin_hparam).get("patch_size", 11))
    names = list(ctx.ds.class_names)
    return LabelledPixelSampler(
        [str(Path(p).resolve()) for p in ctx.fold.train], ["optical", "sar"], patch, options["pixels_per_class"],
        allow_fewer=options["allow_fewer"], class_names=names, seed=ctx.seed,
    ).pixels


def run_pad(ctx: Context) -> dict[str, np.ndarray]:
    """PAD through ``tilefuse.train`` / ``tilefuse.predict``: one model per training seed (``PAD_SEEDS``,
    ``--pad-seeds A,B,..`` or ``--pad-option seed=N``), their softmax probabilities averaged (an ensemble)."""
    import tilefuse
    from tilefuse.metrics import ConfusionMatrix

    # the best measured CPU schedule on these chips (README, "Results on small real data")
    defaults = {
        "steps": 600, "batch_size": 8, "patch_size": 96, "lr": 1e-3, "class_balance": False, "rescale": [0.5, 2.0],
        "modality_jitter": {"sar": 0.5}, "torch_threads": ctx.args.threads,
    }
    options = defaults | parse_options(ctx.args.pad_option)
    hparams = {"preset": ctx.args.pad_preset, "pixel_head": True, "pixel_head_linear": True} | parse_options(ctx.args.pad_hparam)
    if ctx.args.pad_seeds:
        seeds = [int(v) for v in ctx.args.pad_seeds.split(",")]
    else:  # one model where --pad-option seed=N names it, else the three-seed ensemble
        seeds = [options["seed"]] if "seed" in options else list(PAD_SEEDS)
    probs: dict[str, np.ndarray] = {}
    for seed in seeds:
        alone = ConfusionMatrix(len(ctx.ds.class_names))
        run = tilefuse.train(
            "pad", ctx.fold.train, ctx.work / "pad-run" / f"seed-{seed}", hparams=hparams,
            val_fraction=0.0, workers=0, checkpoint_every=options["steps"], overwrite=True, progress=False,
            **(options | {"seed": seed}),
        )
        for chip, store in ctx.fold.test.items():
            pred = ctx.work / f"pad-{chip}.zarr"
            tilefuse.predict(run, store, pred, tile=224, probs="float32", cluster="sync", overwrite=True, progress=False)
            p = tilefuse.open_prediction(pred)["probs"].values.reshape(len(ctx.ds.class_names), -1)[:, ctx.scored[chip]]
            probs[chip] = probs.get(chip, 0) + p
            alone.update(p.argmax(0), ctx.truth[chip])
        if len(seeds) > 1:  # each member's own score shows the spread the ensemble averages over
            print(f"    pad seed {seed} alone, pooled OA/mIoU/kappa:{_cell(alone.compute(ctx.ds.class_names))}", flush=True)
    return {chip: p.argmax(0) for chip, p in probs.items()}


def run_s2fin(ctx: Context) -> dict[str, np.ndarray]:
    import torch

    import tilefuse
    from tilefuse.sampling import LabelledPixelSampler
    from tilefuse.scene import normalise

    options = s2fin_options(ctx)
    run = tilefuse.train(
        "s2fin", ctx.fold.train, ctx.work / "s2fin-run", hparams=parse_options(ctx.args.s2fin_hparam), val_fraction=0.0,
        workers=0, checkpoint_every=options["steps"], overwrite=True, progress=False, **options,
    )
    model, config = tilefuse.load_checkpoint(run)
    model.eval()
    m = model.spec.margin
    stats = {n: (np.asarray(v["mean"], np.float32), np.asarray(v["std"], np.float32)) for n, v in config.band_stats.items()}
    out = {}
    for chip, store in ctx.fold.test.items():
        # the scored pixels' neighbourhoods; the sampler yields them shuffled, each naming its place
        width = tilefuse.open_scene(store).sizes["x"]
        sampler = LabelledPixelSampler([store], ["optical", "sar"], 2 * m + 1, 10**9, per_class=False, repeat=False, allow_fewer=True, seed=0)
        flat = sampler.pixels[:, 1] * width + sampler.pixels[:, 2]
        sampler.pixels = sampler.pixels[np.isin(flat, ctx.scored[chip])]
        predicted: dict[int, int] = {}
        batch: list = []

        def flush() -> None:
            inputs = {n: torch.from_numpy(np.stack([normalise(b.data[n], *stats[n]) for b in batch])) for n in ("optical", "sar")}
            with torch.no_grad():
                labels = model(inputs).argmax(1).reshape(-1).tolist()
            predicted.update({(b.y + m) * width + (b.x + m): label for b, label in zip(batch, labels)})
            batch.clear()

        for sample in sampler.iter_stream():
            batch.append(sample)
            if len(batch) == 256:
                flush()
        if batch:
            flush()
        out[chip] = np.array([predicted.get(int(i), 255) for i in ctx.scored[chip]])
    return out


METHODS: dict[str, Callable[[Context], dict[str, np.ndarray]]] = {
    "logreg": lambda ctx: run_pixel_baseline("logreg", ctx),
    "hgb": lambda ctx: run_pixel_baseline("hgb", ctx),
    "pad": run_pad,
    "s2fin": run_s2fin,
    "logreg-few": lambda ctx: run_pixel_baseline("logreg", ctx, few=True),
    "hgb-few": lambda ctx: run_pixel_baseline("hgb", ctx, few=True),
}
DRAWN = ("s2fin", "logreg-few", "hgb-few")  # the methods that learn from S²Fin's draw of labelled pixels


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--work", type=Path, default=Path("/tmp/tilefuse-real"))
    parser.add_argument("--protocol", default="same-region", choices=["same-region", "leave-one-out"])
    parser.add_argument("--datasets", default="terramind,sen1floods11")
    parser.add_argument("--methods", default="logreg,hgb,pad,s2fin,logreg-few,hgb-few")
    parser.add_argument("--test-rows", type=int, default=64, help="same-region: bottom rows of each chip held out for testing")
    parser.add_argument("--gap", type=int, default=32, help="same-region: rows between the training and test parts")
    parser.add_argument("--score-pixels", type=int, default=None, help="score this many uniform labelled pixels per test chip [all]")
    parser.add_argument("--pixels-per-class", type=int, default=50)
    parser.add_argument(
        "--draws", type=int, default=1,
        help="repeat S²Fin and its few-pixel baselines on N draws of labelled pixels (training seeds S, S+1, ...; "
        "S from --s2fin-option seed=S, else 42) and print each draw's pooled scores, their mean and spread [1]",
    )
    parser.add_argument("--pad-preset", default="micro", help="PAD preset [micro: ours, 2.3 M parameters; atto is the paper family's smallest]")
    parser.add_argument("--pad-option", action="append", default=[], help="KEY=VALUE training option for PAD (steps=300, lr=...)")
    parser.add_argument("--pad-hparam", action="append", default=[])
    parser.add_argument(
        "--pad-seeds", default="",
        help=f"A,B,...: one PAD model per training seed, softmax averaged [{','.join(map(str, PAD_SEEDS))}; one model with --pad-option seed=N]",
    )
    parser.add_argument("--s2fin-option", action="append", default=[])
    parser.add_argument("--s2fin-hparam", action="append", default=[])
    parser.add_argument(
        "--threads", type=int, default=2,
        help="torch threads, training included [2]; on a machine shared with other jobs use 1 (2 can be 10x slower there)",
    )
    parser.add_argument(
        "--normalise", default="pooled", choices=["pooled", "per-store"],
        help="pooled: the training stores' pooled band statistics (what tilefuse does); per-store: experiment, "
        "each part standardised by its own statistics before ingest",
    )
    args = parser.parse_args(argv)

    import torch

    from tilefuse.metrics import ConfusionMatrix

    torch.set_num_threads(args.threads)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if args.draws < 1:
        raise SystemExit(f"--draws must be at least 1, got {args.draws}")
    seeds = [int(parse_options(args.s2fin_option).get("seed", 42)) + d for d in range(args.draws)]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"unknown method {unknown[0]!r}: choose from {', '.join(METHODS)}")
    known = datasets(args.data)
    report: dict = {"protocol": args.protocol, "args": {k: str(v) for k, v in vars(args).items()}, "datasets": {}}
    for name in [d.strip() for d in args.datasets.split(",") if d.strip()]:
        ds = known[name]
        k = len(ds.class_names)
        per_chip: dict[str, dict[str, ConfusionMatrix]] = {m: {} for m in methods}  # the first draw's
        seconds = {m: 0.0 for m in methods}
        drawn = {m: [ConfusionMatrix(k) for _ in seeds] for m in methods if m in DRAWN}  # pooled, per draw
        for i, fold in enumerate(folds(ds, args.protocol, args.work, args.test_rows, args.gap, args.normalise)):
            scored = {chip: scored_pixels(store, args.score_pixels) for chip, store in fold.test.items()}
            truth = {chip: stacked(store, {m: {"mean": [0.0], "std": [1.0]} for m in ("optical", "sar")})[1][scored[chip]] for chip, store in fold.test.items()}
            work = args.work / ds.name / f"{args.protocol}-{i}{'' if args.normalise == 'pooled' else '-' + args.normalise}"
            work.mkdir(parents=True, exist_ok=True)
            ctx = Context(ds, fold, work, scored, truth, args)
            for method in methods:
                for d, seed in enumerate(seeds if method in drawn else seeds[:1]):
                    ctx.seed = seed
                    t0 = time.perf_counter()
                    predicted = METHODS[method](ctx)
                    elapsed = time.perf_counter() - t0
                    for chip, labels in predicted.items():
                        matrix = ConfusionMatrix(k).update(np.asarray(labels), truth[chip])
                        if d == 0:
                            per_chip[method][chip] = matrix
                        if method in drawn:
                            drawn[method][d].merge(matrix)
                    if d == 0:
                        seconds[method] += elapsed
                    print(f"  {ds.name} fold {i} {method}{f' seed {seed}' if len(seeds) > 1 and method in drawn else ''}: {elapsed:.0f} s", flush=True)
        results = {}
        print(f"\n{ds.name}, {args.protocol}: OA / mIoU / kappa (test pixels scored: {args.score_pixels or 'all'})")
        chips = sorted({c for m in per_chip.values() for c in m})
        print(f"{'method':<12}" + "".join(f"{c[:13]:>22}" for c in chips) + f"{'pooled':>22}{'seconds':>9}")
        for method in methods:
            pooled = ConfusionMatrix(k)
            row = {}
            for chip in chips:
                pooled.merge(per_chip[method][chip])
                row[chip] = per_chip[method][chip].compute(ds.class_names)
            row["pooled"] = pooled.compute(ds.class_names)
            collapsed = [chip for chip in chips if _collapsed(per_chip[method][chip])]
            results[method] = {"metrics": row, "seconds": seconds[method], "collapsed": collapsed}
            cells = "".join(_cell(row[c]) for c in [*chips, "pooled"])
            print(f"{method:<12}{cells}{seconds[method]:9.0f}")
        present = [c for c in ds.class_names if any(c in r["metrics"]["pooled"]["per_class"] for r in results.values())]
        print("pooled IoU per class: " + " ".join(f"{c[:10]:>10}" for c in present))
        for method, r in results.items():
            per_class = r["metrics"]["pooled"]["per_class"]
            ious = " ".join(f"{per_class[c]['iou']:10.3f}" if c in per_class else f"{'-':>10}" for c in present)
            print(f"{method:<21}{ious}" + (f"   collapsed to one class on {', '.join(r['collapsed'])}" if r["collapsed"] else ""))
        report["datasets"][ds.name] = results
        if len(seeds) > 1 and drawn:
            report.setdefault("draws", {})[ds.name] = draws_table(drawn, seeds, ds.class_names)
    args.work.mkdir(parents=True, exist_ok=True)
    (args.work / f"results-{args.protocol}.json").write_text(json.dumps(report, indent=2, default=str))
    return report


def draws_table(drawn: dict, seeds: list[int], class_names: list[str]) -> dict:
    """Print and return the pooled scores of each draw of labelled pixels, their mean and standard deviation,
    and S²Fin's mIoU / OA margin over the better few-pixel baseline of each draw."""
    scores = {m: [cm.compute(class_names) for cm in matrices] for m, matrices in drawn.items()}
    table = {m: {"miou": [r["mean_iou"] for r in rs], "oa": [r["overall_accuracy"] for r in rs]} for m, rs in scores.items()}
    baselines = [m for m in table if m != "s2fin"]
    margin = "s2fin" in table and bool(baselines)
    if margin:
        for key in ("miou", "oa"):
            best = np.max([table[m][key] for m in baselines], axis=0)
            table[f"margin_{key}"] = (np.asarray(table["s2fin"][key]) - best).tolist()
    print(f"\npooled mIoU (OA) over {len(seeds)} draws of labelled pixels (training seeds {seeds[0]}-{seeds[-1]})")
    columns = list(scores) + (["s2fin - best few"] if margin else [])
    print(f"{'seed':<8}" + "".join(f"{c:>18}" for c in columns))

    def row(label: str, pick) -> None:
        cells = [f"{pick(table[m]['miou']):.3f} ({pick(table[m]['oa']):.3f})" for m in scores]
        if margin:
            sign = "" if label == "sd" else "+"
            cells.append(f"{pick(table['margin_miou']):{sign}.3f} ({pick(table['margin_oa']):{sign}.3f})")
        print(f"{label:<8}" + "".join(f"{c:>18}" for c in cells))

    for d, seed in enumerate(seeds):
        row(str(seed), lambda v: v[d])
    row("mean", np.mean)
    row("sd", lambda v: np.std(v, ddof=1))
    row("median", np.median)
    row("min", np.min)
    if margin:
        best = max(baselines, key=lambda m: np.mean(table[m]["miou"]))
        gap = np.mean(table["s2fin"]["miou"]) - np.mean(table[best]["miou"])
        print(f"S²Fin's mean mIoU minus that of the better baseline on average ({best}): {gap:+.3f}")
    return {"seeds": seeds, **table}


def _collapsed(matrix) -> bool:
    """True when the scored truth holds several classes and the prediction only one."""
    m = matrix.matrix
    return bool((m.sum(axis=1) > 0).sum() > 1 and (m.sum(axis=0) > 0).sum() == 1)


def _cell(m: dict) -> str:
    kappa = "  -  " if m.get("kappa") is None else f"{m['kappa']:.3f}"
    return f"  {m['overall_accuracy']:.3f}/{m['mean_iou']:.3f}/{kappa:>6}"


if __name__ == "__main__":
    main()
