"""PAD and S²Fin on real TerraMind chips (S1RTC + S2L2A, LULC labels) against a per-pixel baseline.

Train on three chips, test on the fourth (never seen, no validation split:
the last checkpoint is scored). All methods are scored on the held-out chip:

- the whole chip (every labelled pixel), for PAD (tiled inference through
  ``tilefuse predict``) and the logistic-regression baselines;
- a uniform sample of labelled pixels of the chip, for all methods alike
  (S²Fin's dense inference costs several ms per pixel on a CPU).

Baselines: per-pixel multinomial logistic regression (torch, LBFGS) on the
stacked normalised bands (12 optical + 2 SAR), fitted on every labelled
training pixel, and on S²Fin's few labelled pixels only.

    .venv/bin/python benchmarks/real_data.py [--data ../shared/data/terramind] [--work /tmp/tilefuse-real]

Needs ../shared/data (see its README); small CPU presets and short schedules.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

# TerraMind LULC codes (ESRI-style, 0 unused) -> contiguous class ids
CODES = {1: "water", 2: "trees", 3: "flooded_vegetation", 4: "crops", 5: "built_area", 6: "bare_ground", 7: "snow_ice", 8: "clouds", 9: "rangeland"}
LABEL_MAP = {code: i for i, code in enumerate(CODES)} | {0: 255}
CLASS_NAMES = list(CODES.values())
CHIPS = ["282D_485L_3_3", "433D_629L_3_1", "609U_541L_3_0", "637U_59R_1_3"]


def ingest_chips(data: Path, work: Path) -> dict[str, Path]:
    from tilefuse.pipelines.ingest import ingest

    stores = {}
    for chip in CHIPS:
        path = work / f"{chip}.zarr"
        if not path.exists():
            ingest(
                path,
                {"optical": data / "S2L2A" / f"{chip}.tif", "sar": data / "S1RTC" / f"{chip}.tif"},
                labels=data / "LULC" / f"{chip}.tif",
                label_map=LABEL_MAP,
                class_names=CLASS_NAMES,
            )
        stores[chip] = path
    return stores


def stacked_pixels(store: Path, band_stats: dict) -> tuple[np.ndarray, np.ndarray]:
    """(pixels, 14) normalised bands and (pixels,) labels (255 where unlabelled or not valid) of a whole chip."""
    from tilefuse.scene import IGNORE, normalise, open_scene

    ds = open_scene(store)
    bands = [
        normalise(ds[m].values, np.asarray(band_stats[m]["mean"], np.float32), np.asarray(band_stats[m]["std"], np.float32))
        for m in ("optical", "sar")
    ]
    x = np.concatenate(bands).reshape(len(bands[0]) + len(bands[1]), -1).T
    y = np.where(ds["valid"].values, ds["label"].values, IGNORE).ravel()
    return x, y


def fit_logistic(x: np.ndarray, y: np.ndarray, classes: int, iterations: int = 200):
    """Multinomial logistic regression by full-batch LBFGS (small L2)."""
    import torch

    torch.manual_seed(0)
    features, target = torch.from_numpy(x), torch.from_numpy(y.astype(np.int64))
    model = torch.nn.Linear(x.shape[1], classes)
    optimiser = torch.optim.LBFGS(model.parameters(), max_iter=iterations, line_search_fn="strong_wolfe")

    def closure():
        optimiser.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(features), target) + 1e-4 * model.weight.square().sum()
        loss.backward()
        return loss

    optimiser.step(closure)
    return lambda values: model(torch.from_numpy(values)).argmax(1).numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data" / "terramind")
    parser.add_argument("--work", type=Path, default=Path("/tmp/tilefuse-real"))
    parser.add_argument("--test", default="637U_59R_1_3")
    parser.add_argument("--pad-steps", type=int, default=60)
    parser.add_argument("--s2fin-steps", type=int, default=150)
    parser.add_argument("--pixels-per-class", type=int, default=50)
    parser.add_argument("--subset", type=int, default=4000, help="labelled test pixels scored for every method")
    args = parser.parse_args()

    import torch

    from tilefuse.checkpoint import load_checkpoint
    from tilefuse.dataset import PatchDataset
    from tilefuse.metrics import ConfusionMatrix, format_metrics
    from tilefuse.pipelines.evaluate import evaluate
    from tilefuse.pipelines.predict import predict
    from tilefuse.pipelines.train import train
    from tilefuse.prediction import open_prediction
    from tilefuse.sampling import LabelledPixelSampler
    from tilefuse.scene import IGNORE, open_scene

    args.work.mkdir(parents=True, exist_ok=True)
    stores = ingest_chips(args.data, args.work)
    train_stores = [stores[c] for c in CHIPS if c != args.test]
    test_store = stores[args.test]
    k = len(CLASS_NAMES)
    results, timings = {}, {}

    t0 = time.perf_counter()
    pad_run = train(
        "pad", train_stores, args.work / "pad", steps=args.pad_steps, batch_size=8, patch_size=128, lr=1e-3,
        val_fraction=0.0, workers=0, checkpoint_every=args.pad_steps, hparams={"preset": "atto"}, overwrite=True, progress=False,
    )
    timings["PAD train"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    predict(pad_run, test_store, args.work / "pad-pred.zarr", tile=224, cluster="sync", overwrite=True, progress=False)
    timings["PAD predict (chip)"] = time.perf_counter() - t0
    results["PAD atto, whole chip"] = evaluate(args.work / "pad-pred.zarr", test_store)

    t0 = time.perf_counter()
    s2_run = train(
        "s2fin", train_stores, args.work / "s2fin", steps=args.s2fin_steps, batch_size=32, pixels_per_class=args.pixels_per_class,
        allow_fewer=True, lr=1e-3, val_fraction=0.0, workers=0, checkpoint_every=args.s2fin_steps, overwrite=True, progress=False,
    )
    timings["S2Fin train"] = time.perf_counter() - t0
    s2_model, s2_config = load_checkpoint(s2_run)
    stats = s2_config.band_stats

    # the subset every method is scored on: uniform labelled pixels of the test chip, with 11 x 11 neighbourhoods
    subset = LabelledPixelSampler([test_store], ["optical", "sar"], 11, args.subset, per_class=False, repeat=False, allow_fewer=True, seed=0)
    rows, cols = subset.pixels[:, 1], subset.pixels[:, 2]
    truth = subset.pixels[:, 3]

    t0 = time.perf_counter()
    confusion = ConfusionMatrix(k)
    loader = torch.utils.data.DataLoader(PatchDataset(subset, stats, margin=5, augment=False), batch_size=256)
    with torch.no_grad():
        for inputs, target in loader:
            confusion.update(s2_model(inputs).argmax(1), target)
    timings[f"S2Fin predict ({len(truth)} px)"] = time.perf_counter() - t0
    results["S2Fin, pixel subset"] = confusion.compute(CLASS_NAMES)

    pad_labels = open_prediction(args.work / "pad-pred.zarr")["labels"].values
    results["PAD atto, pixel subset"] = ConfusionMatrix(k).update(pad_labels[rows, cols], truth).compute(CLASS_NAMES)

    # baselines on the same normalisation (pooled training statistics)
    train_x, train_y = zip(*(stacked_pixels(s, stats) for s in train_stores))
    x, y = np.concatenate(train_x), np.concatenate(train_y)
    keep = y != IGNORE
    test_x, test_y = stacked_pixels(test_store, stats)
    width = open_scene(test_store).sizes["x"]
    few = LabelledPixelSampler(  # the pixels S²Fin trained on (same arguments and seed as `train` used)
        train_stores, ["optical", "sar"], 11, args.pixels_per_class, allow_fewer=True, class_names=CLASS_NAMES, seed=42
    ).pixels
    widths = [open_scene(s).sizes["x"] for s in train_stores]
    few_x = np.stack([train_x[s][r * widths[s] + c] for s, r, c, _ in few.tolist()])
    for name, (fx, fy) in {
        "logistic regression, all training pixels": (x[keep], y[keep]),
        f"logistic regression, {args.pixels_per_class} px/class (S2Fin's pixels)": (few_x, few[:, 3]),
    }.items():
        t0 = time.perf_counter()
        classify = fit_logistic(fx, fy, k)
        timings[name] = time.perf_counter() - t0
        predicted = classify(test_x)
        results[f"{name}, whole chip"] = ConfusionMatrix(k).update(predicted, test_y).compute(CLASS_NAMES)
        results[f"{name}, pixel subset"] = ConfusionMatrix(k).update(predicted.reshape(-1, width)[rows, cols], truth).compute(CLASS_NAMES)

    print(f"\ntrain chips {', '.join(c for c in CHIPS if c != args.test)}; test chip {args.test} ({len(truth)} px subset)")
    print(f"{'method':<70} {'OA':>6} {'mIoU':>6} {'kappa':>6}")
    for name, m in results.items():
        kappa = "-" if m["kappa"] is None else f"{m['kappa']:.3f}"
        print(f"{name:<70} {m['overall_accuracy']:6.3f} {m['mean_iou']:6.3f} {kappa:>6}")
    print("\nseconds: " + ", ".join(f"{n} {v:.0f}" for n, v in timings.items()))
    print("\nPAD, whole chip:\n" + format_metrics(results["PAD atto, whole chip"]))
    (args.work / "results.json").write_text(json.dumps({"results": results, "seconds": timings}, indent=2))


if __name__ == "__main__":
    main()
