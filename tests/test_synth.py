"""Synthetic scenes: deterministic, chunking-independent, structured, learnable, and writable."""

from __future__ import annotations

import json

import numpy as np
import pytest
import rasterio

from tilefuse.errors import InputError
from tilefuse.scene import band_stats, modalities, open_scene, write_scene
from tilefuse.synthetic import CLASS_NAMES, FOREST, GRASSLAND, URBAN, WATER, land_cover, synth_scene, write_geotiffs


def computed(ds):
    return {name: ds[name].values for name in ds.data_vars}


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_same_seed_same_scene_whatever_the_chunking():
    reference = computed(synth_scene((300, 260), seed=3, chunk=1024))
    assert_same(reference, computed(synth_scene((300, 260), seed=3, chunk=1024)))
    assert_same(reference, computed(synth_scene((300, 260), seed=3, chunk=128)))
    assert_same(reference, computed(synth_scene((300, 260), seed=3, chunk=77)))
    other = computed(synth_scene((300, 260), seed=4, chunk=128))
    assert not np.array_equal(reference["label"], other["label"])
    assert np.nanmean(np.abs(reference["sar"] - other["sar"])) > 1.0


def test_a_window_of_a_large_scene_is_computed_alone():
    """Only the chunks read are generated: a corner of a 100,000^2 scene is cheap and equals a small scene's."""
    huge = synth_scene(100_000, seed=5)
    assert huge["optical"].shape == (6, 100_000, 100_000)
    corner = huge["label"][:200, :300].values
    small = synth_scene((200, 300), seed=5)["label"].values
    np.testing.assert_array_equal(corner, small)


def test_land_cover_has_every_class_and_thin_features():
    rows, cols = np.arange(0, 1024)[:, None], np.arange(0, 1024)[None, :]
    classes, _ = land_cover(11, rows, cols)
    fractions = np.bincount(classes.ravel(), minlength=len(CLASS_NAMES)) / classes.size
    assert (fractions > 0.01).all(), fractions
    # roads: long straight runs of urban pixels only 3 px wide
    urban_rows = (classes == URBAN).mean(axis=1)
    urban_cols = (classes == URBAN).mean(axis=0)
    assert (urban_rows > 0.6).sum() >= 3 or (urban_cols > 0.6).sum() >= 3


def test_modalities_carry_the_classes_and_nodata():
    ds = synth_scene(512, seed=2)
    values = computed(ds)
    label, valid = values["label"], values["valid"]
    optical, sar = values["optical"], values["sar"]
    assert ds.rio.crs.to_epsg() == 32632 and ds.rio.resolution() == (10.0, -10.0)
    assert ds["label"].attrs["class_names"] == list(CLASS_NAMES)
    assert list(ds["sar"].sar_band.values) == ["VV", "VH"]
    # nodata: clouds in optical, a swath edge in SAR; valid is where both have data
    np.testing.assert_array_equal(valid, np.isfinite(optical).all(0) & np.isfinite(sar).all(0))
    assert 0.8 < valid.mean() < 0.995
    assert np.isnan(sar[:, :, -5:]).all() and np.isfinite(sar[:, :, :400]).all()
    # class signatures: water is dark in SAR and NIR, forest greener than grassland is bright in VH
    ok = valid
    vv = sar[0][ok]
    nir = optical[3][ok]
    lab = label[ok]
    assert vv[lab == WATER].mean() < vv[lab == FOREST].mean() - 8
    assert nir[lab == WATER].mean() < 0.1 < nir[lab == FOREST].mean()
    assert sar[1][ok][lab == URBAN].mean() > sar[1][ok][lab == GRASSLAND].mean()


def nearest_mean_accuracy(features: np.ndarray, labels: np.ndarray) -> float:
    """Held-out accuracy of a nearest-class-mean classifier on standardised per-pixel features."""
    features = (features - features.mean(0)) / features.std(0)
    train = np.random.default_rng(0).random(labels.size) < 0.5
    present = np.unique(labels[train])
    means = np.stack([features[train & (labels == k)].mean(0) for k in present])
    distance = ((features[~train, None, :] - means[None]) ** 2).sum(-1)
    return float((present[distance.argmin(1)] == labels[~train]).mean())


def test_classes_are_learnable_and_fusion_helps():
    values = computed(synth_scene(512, seed=7))
    ok = values["valid"]
    labels = values["label"][ok]
    optical, sar = values["optical"][:, ok].T, values["sar"][:, ok].T
    fused = nearest_mean_accuracy(np.concatenate([optical, sar], axis=1), labels)
    alone = max(nearest_mean_accuracy(optical, labels), nearest_mean_accuracy(sar, labels))
    assert fused > 0.8 and fused > alone + 0.03, (fused, alone)


def test_hsi_lidar_kind():
    ds = synth_scene(256, kind="hsi-lidar", seed=1)
    assert ds.sizes["hsi_band"] == 48 and ds.sizes["lidar_band"] == 1
    assert ds.rio.resolution() == (1.0, -1.0)
    values = computed(ds)
    height, label = values["lidar"][0], values["label"]
    ok = np.isfinite(height)
    assert np.isnan(height[:, -3:]).all()
    assert height[ok & (label == FOREST)].mean() > 5 > height[ok & (label == GRASSLAND)].mean()
    hsi = values["hsi"]
    water = hsi[:, values["valid"] & (label == WATER)].mean(1)
    forest = hsi[:, values["valid"] & (label == FOREST)].mean(1)
    assert forest[20] > 3 * water[20]  # the vegetation plateau in the near infrared


def test_bad_kind_and_size():
    with pytest.raises(InputError, match="unknown scene kind"):
        synth_scene(64, kind="lidar-only")
    with pytest.raises(InputError, match="must be positive"):
        synth_scene(0)


def test_seeds_beyond_63_bits_or_negative_are_refused():
    """Pixels hash the seed modulo 2^64: seed 2^64 + 1 was seed 1's scene, -1 was 2^64 - 1's."""
    assert np.array_equal(synth_scene(32, seed=2**63 - 1)["optical"].values, synth_scene(32, seed=2**63 - 1)["optical"].values)
    for seed in (-1, 2**63, 2**64 + 1, 1.5, True, "1"):
        with pytest.raises(InputError, match=r"seed= \(--seed\) must be a whole number in 0\.\."):
            synth_scene(32, seed=seed)


def test_geotiffs_and_store_hold_the_same_scene(tmp_path):
    ds = synth_scene((300, 200), seed=9, chunk=128)
    paths = write_geotiffs(ds, tmp_path / "tif")
    assert sorted(paths) == ["label", "optical", "sar"]
    with rasterio.open(paths["optical"]) as src:
        assert src.crs.to_epsg() == 32632 and src.transform == ds.rio.transform()
        assert src.block_shapes[0] == (512, 512)  # tiled, not strips
        assert np.isnan(src.nodata) and src.descriptions[3] == "nir"
        np.testing.assert_array_equal(src.read(), ds["optical"].values)
    with rasterio.open(paths["label"]) as src:
        assert src.nodata == 255 and json.loads(src.tags()["class_names"]) == list(CLASS_NAMES)
        np.testing.assert_array_equal(src.read(1), ds["label"].values)
    with pytest.raises(InputError, match="already exists"):
        write_geotiffs(ds, tmp_path / "tif")
    assert not [p for p in (tmp_path / "tif").iterdir() if p.name.startswith(".") and p.name != ".tilefuse-output"]  # no temporary

    store = open_scene(write_scene(ds, tmp_path / "s.zarr"))
    assert modalities(store) == ["optical", "sar"]
    label = ds["label"].values
    assert store["label"].attrs["class_counts"] == np.bincount(label.ravel(), minlength=6).tolist()
    mean, _ = band_stats(store, "sar")
    np.testing.assert_allclose(mean, ds["sar"].values[:, ds["valid"].values].mean(1), rtol=1e-5)
