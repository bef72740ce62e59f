"""Samplers: uniform positions, chunk-window reuse, splits without leakage, labelled pixels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rioxarray  # noqa: F401
import torch
import xarray as xr

from tilefuse.errors import InputError
from tilefuse.sampling import (
    GridPatchSampler,
    LabelledPixelSampler,
    RandomPatchSampler,
    SceneReader,
    SpatialSplit,
    cut_reflect,
    eligible_origins,
    grid_origins,
    spatial_split,
)
from tilefuse.scene import IGNORE, write_scene

CLASSES = ["water", "forest", "field"]


def labelled_scene(h: int, w: int, seed: int = 0, invalid_disk: bool = True, sar_bands: int = 2) -> xr.Dataset:
    """A small scene: 3-band optical, SAR, blocky labels of 3 classes, an invalid disk and a few unlabelled pixels."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    label = ((yy // 23 + 2 * (xx // 31)) % 3).astype(np.uint8)
    optical = (label[None] * 1.5 + rng.normal(size=(3, h, w))).astype(np.float32)
    sar = rng.normal(size=(sar_bands, h, w)).astype(np.float32)
    valid = np.ones((h, w), bool)
    if invalid_disk:
        valid &= (yy - h * 0.3) ** 2 + (xx - w * 0.6) ** 2 > (min(h, w) * 0.2) ** 2
    optical[:, ~valid] = np.nan
    label[rng.random((h, w)) < 0.05] = IGNORE
    ds = xr.Dataset(
        {
            "optical": (("optical_band", "y", "x"), optical),
            "sar": (("sar_band", "y", "x"), sar),
            "valid": (("y", "x"), valid),
            "label": (("y", "x"), label),
        },
        coords={"x": 500_000 + 10.0 * np.arange(w) + 5, "y": 4_000_000 - 10.0 * np.arange(h) - 5},
    )
    ds["label"].attrs["class_names"] = CLASSES
    return ds.rio.write_crs("EPSG:32632")


def write(ds: xr.Dataset, path: Path, chunk: int = 64) -> Path:
    return write_scene(ds, path, chunk=chunk, shard=None)


class ArrayReader:
    """SceneReader's interface over in-memory arrays (fast statistical tests)."""

    def __init__(self, ds: xr.Dataset, chunk: int = 64, name: str = "memory") -> None:
        self.path = Path(name)
        self.arrays = {k: ds[k].values for k in ("optical", "sar", "valid", "label")}
        self.shape = self.arrays["valid"].shape
        self.chunk = (chunk, chunk)
        self.reads = 0

    def has(self, name: str) -> bool:
        return name in self.arrays

    def read(self, y0, y1, x0, x1, names):
        self.reads += 1
        return {n: self.arrays[n][..., y0:y1, x0:x1] for n in names}


def chi2_pvalue(statistic: float, dof: int) -> float:
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), torch.tensor(statistic / 2, dtype=torch.float64)))


def brute_force_origins(valid, label, region, patch, margin, min_labelled):
    """The eligibility rule written out per origin, independent of the vectorised version."""
    h, w = valid.shape
    out = np.zeros((h - patch + 1, w - patch + 1), bool)
    c, t = patch // 2, patch - 2 * margin
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            target = (label != IGNORE) & valid
            labelled = target[i + margin : i + margin + t, j + margin : j + margin + t].sum()
            out[i, j] = (
                valid[i + c, j + c]
                and labelled >= min_labelled * t * t
                and (region is None or region[i : i + patch, j : j + patch].all())
            )
    return out


def test_eligible_origins_match_the_rule_written_out():
    rng = np.random.default_rng(1)
    valid = rng.random((30, 27)) > 0.2
    label = np.where(rng.random((30, 27)) > 0.4, 1, IGNORE).astype(np.uint8)
    region = np.ones((30, 27), bool)
    region[:, 20:] = False
    for patch, margin, frac, reg in [(5, 0, 0.0, None), (7, 2, 0.3, region), (6, 1, 0.6, region)]:
        fast = eligible_origins(valid, label, reg, patch, margin, frac)
        np.testing.assert_array_equal(fast, brute_force_origins(valid, label, reg, patch, margin, frac))


def test_grid_origins_cover_every_target_pixel_once():
    for n, tile, margin in [(100, 32, 0), (100, 25, 0), (97, 21, 5), (21, 21, 5), (50, 11, 5)]:
        cover = np.zeros(n, int)
        for origin, owned in grid_origins(n, tile, margin):
            cover[owned : origin + tile - margin] += 1
        assert (cover[margin : n - margin] == 1).all(), (n, tile, margin)
        assert (cover[:margin] == 0).all() and (cover[n - margin :] == 0).all()
    assert grid_origins(10, 11, 0) == []


def _expected_origins(ds: xr.Dataset, patch: int, min_labelled: float) -> np.ndarray:
    return brute_force_origins(ds["valid"].values, ds["label"].values, None, patch, 0, min_labelled)


def _cover(n: int, patch: int, window: int, stride: int) -> np.ndarray:
    """How many windows (starts every ``stride``, ``window`` long, clipped) hold each origin's patch, counted directly."""
    starts = range(0, n - patch + 1, stride)
    return np.array([sum(a <= o and o + patch <= min(a + window, n) for a in starts) for o in range(n - patch + 1)])


def _cells(a: np.ndarray, cell: int) -> np.ndarray:
    return np.array([a[i : i + cell, j : j + cell].sum() for i in range(0, a.shape[0], cell) for j in range(0, a.shape[1], cell)], float)


def _pooled_chi2(observed: list[np.ndarray], probabilities: list[np.ndarray]) -> float:
    """p-value of independent multinomial groups (counts per cell) against their cell probabilities."""
    statistic, dof = 0.0, 0
    for o, p in zip(observed, probabilities):
        keep = p > 0
        assert o[~keep].sum() == 0, "draws where the law says none"
        expected = o.sum() * p[keep] / p[keep].sum()
        statistic += ((o[keep] - expected) ** 2 / expected).sum()
        dof += keep.sum() - 1
    return chi2_pvalue(statistic, dof)


SCENES = [(150, 130, 0, True), (100, 170, 1, False)]
PATCH = 16


def _sampler(k: int, per_round: int, seed: int) -> tuple[RandomPatchSampler, list[np.ndarray]]:
    scenes = [labelled_scene(h, w, seed=s, invalid_disk=d) for h, w, s, d in SCENES]
    readers = [ArrayReader(ds, chunk=32, name=f"mem{i}") for i, ds in enumerate(scenes)]
    sampler = RandomPatchSampler(
        readers, ["optical", "sar"], PATCH, window=64, patches_per_window=k, windows_per_round=per_round, min_labelled=0.2, seed=seed
    )
    return sampler, [_expected_origins(ds, PATCH, 0.2) for ds in scenes]


def test_random_patch_origins_are_uniform_over_eligible_origins_of_all_stores():
    """One patch per round: i.i.d. draws from the marginal law, which must be uniform over eligible origins."""
    sampler, eligible = _sampler(k=1, per_round=1, seed=7)
    assert sampler.geometry[0] == (64, 32)
    assert sampler.num_origins == sum(int(e.sum()) for e in eligible)
    counts = [np.zeros(e.shape, np.int64) for e in eligible]
    for sample in _take(sampler.iter_stream(0), 5000):
        counts[sample.store][sample.y, sample.x] += 1
    observed = [np.concatenate([_cells(c, 16) for c in counts])]
    assert _pooled_chi2(observed, [np.concatenate([_cells(e, 16) for e in eligible])]) > 1e-3
    # the test has power: a law ignoring the valid mask and labels would be rejected
    assert _pooled_chi2(observed, [np.concatenate([_cells(np.ones(e.shape), 16) for e in eligible])]) < 1e-6


def test_window_draws_and_origins_within_windows_follow_the_weighted_law():
    """Several patches per window: windows drawn prop. to sum of 1/cover, origins inside prop. to 1/cover.

    Together they give every origin the probability sum_w P(w) P(o | w) = c(o) (1/c(o)) / N = 1 / N.
    """
    k, window, stride = 8, 64, 32
    sampler, eligible = _sampler(k=k, per_round=6, seed=3)
    samples = _take(sampler.iter_stream(0), 6 * k * 200)
    inverse = [e / np.outer(_cover(h, PATCH, window, stride), _cover(w, PATCH, window, stride)) for (h, w, _, _), e in zip(SCENES, eligible)]
    windows = sampler.table.windows.tolist()
    law = np.array([inverse[s][y0 : y1 - PATCH + 1, x0 : x1 - PATCH + 1].sum() for s, y0, y1, x0, x1 in windows])
    picked = np.bincount([t.window for t in samples], minlength=len(windows)) / k  # k patches per pick
    assert _pooled_chi2([picked], [law]) > 1e-3
    assert _pooled_chi2([picked], [(law > 0).astype(float)]) < 1e-6, "the window test has no power"

    observed, weighted, flat = [], [], []
    for index, (s, y0, y1, x0, x1) in enumerate(windows):
        counts = np.zeros((y1 - y0 - PATCH + 1, x1 - x0 - PATCH + 1))
        for t in samples:
            if t.window == index:
                counts[t.y - y0, t.x - x0] += 1
        if counts.sum():
            observed.append(_cells(counts, 8))
            weighted.append(_cells(inverse[s][y0 : y1 - PATCH + 1, x0 : x1 - PATCH + 1], 8))
            flat.append(_cells(eligible[s][y0 : y1 - PATCH + 1, x0 : x1 - PATCH + 1].astype(float), 8))
    assert _pooled_chi2(observed, weighted) > 1e-3
    assert _pooled_chi2(observed, flat) < 1e-6, "the within-window test has no power"


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def test_each_window_is_decoded_once_per_round_and_rounds_mix_windows(tmp_path, monkeypatch):
    path = write(labelled_scene(256, 256, invalid_disk=False), tmp_path / "s.zarr")
    reads = []
    original = SceneReader.read

    def counting(self, y0, y1, x0, x1, names):
        reads.append(tuple(names))
        return original(self, y0, y1, x0, x1, names)

    monkeypatch.setattr(SceneReader, "read", counting)
    sampler = RandomPatchSampler([path], ["optical", "sar"], 32, window=64, patches_per_window=16, windows_per_round=8, seed=0)
    reads.clear()
    samples = sampler.round(stream=0, number=0)
    decodes = [r for r in reads if "optical" in r]
    assert len(samples) == 8 * 16
    assert len(decodes) <= 8, "a window decoded more than once in a round"
    windows = [s.window for s in samples]
    assert len(set(windows)) >= 4
    same = np.mean([a == b for a, b in zip(windows, windows[1:])])
    assert same < 0.5, "consecutive patches mostly from one window: the round is not shuffled"
    # patches are cut from the decoded window exactly
    full = xr.open_zarr(path, consolidated=False)
    for s in samples[:5]:
        np.testing.assert_array_equal(s.data["optical"], full["optical"].values[:, s.y : s.y + 32, s.x : s.x + 32])
        truth = np.where(full["valid"].values, full["label"].values, IGNORE)[s.y : s.y + 32, s.x : s.x + 32]
        np.testing.assert_array_equal(s.label, truth)


def test_rounds_are_deterministic_per_seed_and_stream_and_resume_mid_round():
    reader = ArrayReader(labelled_scene(120, 120))
    make = lambda seed: RandomPatchSampler([reader], ["optical"], 16, window=64, patches_per_window=4, windows_per_round=3, seed=seed)
    a, b = make(3), make(3)
    first = [(s.store, s.y, s.x, s.dihedral) for s in _take(a.iter_stream(0), 30)]
    assert first == [(s.store, s.y, s.x, s.dihedral) for s in _take(b.iter_stream(0), 30)]
    assert first != [(s.store, s.y, s.x, s.dihedral) for s in _take(b.iter_stream(1), 30)]
    assert first != [(s.store, s.y, s.x, s.dihedral) for s in _take(make(4).iter_stream(0), 30)]
    resumed = [(s.store, s.y, s.x, s.dihedral) for s in _take(a.iter_stream(0, start=17), 13)]
    assert resumed == first[17:]


def test_min_labelled_fraction_and_class_balance():
    ds = labelled_scene(160, 160, invalid_disk=False)
    label = ds["label"].values.copy()
    label[label == 2] = 0
    label[60:72, 60:72] = 2  # a rare class: 144 px
    label[:, :40] = IGNORE
    ds["label"].values[:] = label
    reader = ArrayReader(ds)
    sampler = RandomPatchSampler([reader], ["optical"], 16, window=64, min_labelled=0.5, patches_per_window=4, seed=1)
    for s in _take(sampler.iter_stream(0), 300):
        assert (s.label != IGNORE).mean() >= 0.5
    centre = lambda s: s.label[8, 8]
    plain = [centre(s) for s in _take(sampler.iter_stream(0), 1500)]
    balanced_sampler = RandomPatchSampler([reader], ["optical"], 16, window=64, class_balance=True, patches_per_window=4, seed=1)
    balanced = [centre(s) for s in _take(balanced_sampler.iter_stream(0), 1500)]
    assert np.mean(np.array(plain) == 2) < 0.03
    shares = [np.mean(np.array(balanced) == k) for k in range(3)]
    assert all(abs(share - 1 / 3) < 0.06 for share in shares), shares
    assert IGNORE not in balanced


def test_spatial_split_is_deterministic_and_keeps_neighbourhoods_apart():
    ds = labelled_scene(256, 256, invalid_disk=False)
    split = spatial_split([(256, 256)], block=64, val=0.25, test=0.25, seed=5)
    assert split.to_dict() == spatial_split([(256, 256)], block=64, val=0.25, test=0.25, seed=5).to_dict()
    assert split.to_dict() != spatial_split([(256, 256)], block=64, val=0.25, test=0.25, seed=6).to_dict()
    assert SpatialSplit.from_dict(split.to_dict()).to_dict() == split.to_dict()
    assert {split.fraction(s) for s in ("val", "test")} == {0.25}
    reader = ArrayReader(ds)
    codes = split.region(0, "train", 0, 256, 0, 256).astype(int) + 2 * split.region(0, "val", 0, 256, 0, 256) + 3 * split.region(0, "test", 0, 256, 0, 256)
    assert (codes > 0).all() and codes.max() == 3

    def inside(y0, x0, size, subset):
        y1, x1 = min(256, y0 + size), min(256, x0 + size)
        return split.region(0, subset, max(0, y0), y1, max(0, x0), x1).all()

    train = RandomPatchSampler([reader], ["optical"], 24, window=64, split=split, subset="train", seed=0)
    for s in _take(train.iter_stream(0), 400):
        assert inside(s.y, s.x, 24, "train")
    val = list(GridPatchSampler([reader], ["optical"], 32, split=split, subset="val", window=64).iter_stream())
    assert val and all(inside(s.y, s.x, 32, "val") for s in val)
    pixels = LabelledPixelSampler([reader], ["optical"], 11, 20, split=split, subset="test", window=64, seed=0)
    assert all(inside(y - 5, x - 5, 11, "test") for _, y, x, _ in pixels.pixels.tolist())


def test_store_split_and_bad_fractions():
    split = spatial_split([(50, 60), (70, 40), (30, 30)], by="stores", val=0.3, seed=0)
    assert [a.shape for a in split.assignment] == [(1, 1)] * 3
    assert sorted(int(a[0, 0]) for a in split.assignment).count(1) >= 1
    with pytest.raises(InputError, match="needs a store"):
        spatial_split([(50, 60)], by="stores", val=0.2)
    with pytest.raises(InputError, match="fractions"):
        spatial_split([(50, 60)], val=0.6, test=0.5)


def test_labelled_pixels_per_class_with_reflect_padded_neighbourhoods():
    ds = labelled_scene(90, 80)
    reader = ArrayReader(ds)
    sampler = LabelledPixelSampler([reader], ["optical", "sar"], 11, 25, class_names=CLASSES, window=64, seed=2)
    assert sampler.classes == {0: 25, 1: 25, 2: 25}
    valid, label = ds["valid"].values, ds["label"].values
    for _, y, x, k in sampler.pixels.tolist():
        assert valid[y, x] and label[y, x] == k
    padded = np.pad(ds["sar"].values, ((0, 0), (5, 5), (5, 5)), mode="reflect")
    samples = _take(sampler.iter_stream(0), 75)
    assert sorted((s.y + 5, s.x + 5) for s in samples) == sorted((y, x) for _, y, x, _ in sampler.pixels.tolist())
    for s in samples:
        np.testing.assert_array_equal(s.data["sar"], padded[:, s.y + 5 : s.y + 16, s.x + 5 : s.x + 16])
        assert s.label[5, 5] == label[s.y + 5, s.x + 5]
    assert any(min(s.y, s.x) < 0 or s.y + 11 > 90 or s.x + 11 > 80 for s in samples), "no edge pixel drawn: pick another seed"
    again = LabelledPixelSampler([reader], ["optical", "sar"], 11, 25, class_names=CLASSES, window=64, seed=2)
    np.testing.assert_array_equal(again.pixels, sampler.pixels)
    epoch2 = _take(sampler.iter_stream(0, start=75), 75)
    assert [(s.y, s.x) for s in epoch2] != [(s.y, s.x) for s in samples]
    assert sorted((s.y, s.x) for s in epoch2) == sorted((s.y, s.x) for s in samples)


def test_cut_reflect_matches_numpy_pad_at_every_edge():
    rng = np.random.default_rng(0)
    scene = rng.normal(size=(2, 20, 17))
    padded = np.pad(scene, ((0, 0), (4, 4), (4, 4)), mode="reflect")
    for y, x in [(-4, -4), (-2, 10), (12, 9), (3, 3), (12, -4)]:
        np.testing.assert_array_equal(cut_reflect(scene, (0, 20, 0, 17), y, x, 9), padded[:, y + 4 : y + 13, x + 4 : x + 13])
    np.testing.assert_array_equal(cut_reflect(scene[:, 5:15, :], (5, 15, 0, 17), 6, 2, 9), scene[:, 6:15, 2:11])


def test_too_few_pixels_of_a_class_is_an_input_error():
    ds = labelled_scene(60, 60, invalid_disk=False)
    label = ds["label"].values.copy()
    label[label == 2] = 0
    label[10:13, 10:13] = 2
    ds["label"].values[:] = label
    with pytest.raises(InputError, match="class 'field' \\(2\\) has only 9 labelled pixels"):
        LabelledPixelSampler([ArrayReader(ds)], ["optical"], 5, 20, class_names=CLASSES)
    fewer = LabelledPixelSampler([ArrayReader(ds)], ["optical"], 5, 20, class_names=CLASSES, allow_fewer=True)
    assert fewer.classes == {0: 20, 1: 20, 2: 9}


def test_no_labels_or_no_labelled_pixels_are_input_errors(tmp_path):
    ds = labelled_scene(64, 64)
    ds["label"].values[:] = IGNORE
    path = write(ds, tmp_path / "empty.zarr")
    with pytest.raises(InputError, match="no valid labelled patch"):
        RandomPatchSampler([path], ["optical"], 16, min_labelled=0.1)
    with pytest.raises(InputError, match="no valid labelled pixels"):
        LabelledPixelSampler([path], ["optical"], 5, 3)
    nolabel = write(labelled_scene(64, 64).drop_vars("label"), tmp_path / "nolabel.zarr")
    with pytest.raises(InputError, match="has no labels"):
        RandomPatchSampler([nolabel], ["optical"], 16)
    with pytest.raises(InputError, match="exceeds store"):
        RandomPatchSampler([path], ["optical"], 65)
