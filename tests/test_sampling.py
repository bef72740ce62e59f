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


def test_random_patches_are_uniform_over_eligible_origins_of_all_stores():
    """Chi-square tests of the patch-origin law, exact under window sampling.

    Patches come in groups of k from one window draw, so counts per window are
    k times a multinomial: chi2(windows) / k is chi-square. Given how often
    each window was drawn, origins inside it are i.i.d. uniform over its
    eligible origins: a chi-square over cells within windows.
    """
    patch, window, k = 16, 64, 8
    scenes = [labelled_scene(150, 130, seed=0), labelled_scene(100, 170, seed=1, invalid_disk=False)]
    readers = [ArrayReader(ds, name=f"mem{i}") for i, ds in enumerate(scenes)]
    sampler = RandomPatchSampler(
        readers, ["optical", "sar"], patch, window=window, patches_per_window=k, windows_per_round=6, min_labelled=0.2, seed=7
    )
    expected = [_expected_origins(ds, patch, 0.2) for ds in scenes]
    assert sampler.num_origins == sum(int(e.sum()) for e in expected)

    counts = [np.zeros_like(e, dtype=np.int64) for e in expected]
    for sample in _take(sampler.iter_stream(0), 6000):
        counts[sample.store][sample.y, sample.x] += 1
    assert all((c[~e] == 0).all() for c, e in zip(counts, expected)), "a patch at an ineligible origin"
    total = sum(int(c.sum()) for c in counts)
    n_origins = sum(int(e.sum()) for e in expected)

    def window_sums(a):
        return [a[y : y + window, x : x + window].sum() for y in range(0, a.shape[0], window) for x in range(0, a.shape[1], window)]

    observed_w = np.array([s for c in counts for s in window_sums(c)], float)
    eligible_w = np.array([s for e in expected for s in window_sums(e)], float)
    keep = eligible_w > 0
    expect_w = total * eligible_w[keep] / n_origins
    stat = ((observed_w[keep] - expect_w) ** 2 / expect_w).sum() / k
    assert chi2_pvalue(stat, keep.sum() - 1) > 1e-3

    # the test has power: windows drawn uniformly (ignoring valid area) would be rejected
    flat = np.full(keep.sum(), total / keep.sum())
    assert chi2_pvalue(((observed_w[keep] - flat) ** 2 / flat).sum() / k, keep.sum() - 1) < 1e-6

    cell, stat, dof = 16, 0.0, 0
    for c, e in zip(counts, expected):
        for y in range(0, e.shape[0], window):
            for x in range(0, e.shape[1], window):
                cw, ew = c[y : y + window, x : x + window], e[y : y + window, x : x + window]
                if ew.sum() == 0 or cw.sum() == 0:
                    continue
                o = np.array([cw[i : i + cell, j : j + cell].sum() for i in range(0, cw.shape[0], cell) for j in range(0, cw.shape[1], cell)], float)
                p = np.array([ew[i : i + cell, j : j + cell].sum() for i in range(0, ew.shape[0], cell) for j in range(0, ew.shape[1], cell)], float)
                o, p = o[p > 0], p[p > 0] / ew.sum()
                stat += ((o - cw.sum() * p) ** 2 / (cw.sum() * p)).sum()
                dof += len(p) - 1
    assert chi2_pvalue(stat, dof) > 1e-3


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
    windows = [(s.y // 64, s.x // 64) for s in samples]
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
