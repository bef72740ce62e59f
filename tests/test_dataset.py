"""PatchDataset: consistent augmentation, pooled statistics, per-worker streams and exact resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import xarray as xr

from test_sampling import ArrayReader, labelled_scene, write
from tilefuse.dataset import PatchDataset, StreamState, apply_dihedral, pooled_band_stats
from tilefuse.sampling import LabelledPixelSampler, RandomPatchSampler
from tilefuse.scene import open_scene
from tilefuse.training import make_loader

IDENTITY = {"optical": {"mean": [0.0] * 3, "std": [1.0] * 3}, "sar": {"mean": [0.0, 0.0], "std": [1.0, 1.0]}}


def coded_scene(h=96, w=96) -> xr.Dataset:
    """Optical band 0 equals the label and SAR band 0 twice the label: any misaligned transform shows."""
    ds = labelled_scene(h, w, invalid_disk=False)
    yy, xx = np.mgrid[:h, :w]
    label = ((yy * 7 + xx * 3 + (yy * xx) % 11) % 5).astype(np.uint8)  # no symmetry
    ds["label"].values[:] = label
    ds["optical"].values[0] = label
    ds["sar"].values[0] = 2.0 * label
    return ds


@pytest.mark.parametrize("margin", [0, 3])
def test_flips_and_rotations_move_every_modality_and_the_label_together(margin):
    ds = coded_scene()
    sampler = RandomPatchSampler([ArrayReader(ds)], ["optical", "sar"], 20, margin=margin, window=64, patches_per_window=8, seed=0)
    dataset = PatchDataset(sampler, IDENTITY, margin=margin, augment=True)
    raw = sampler.round(0, 0)
    seen = set()
    for sample, (inputs, target) in zip(raw, dataset):
        assert target.dtype == torch.int64 and target.shape == (20 - 2 * margin, 20 - 2 * margin)
        assert inputs["optical"].shape == (3, 20, 20) and inputs["sar"].shape == (2, 20, 20)
        crop = slice(margin, 20 - margin)
        np.testing.assert_array_equal(inputs["optical"][0, crop, crop].numpy(), target.numpy())
        np.testing.assert_array_equal(inputs["sar"][0, crop, crop].numpy(), 2 * target.numpy())
        expected = apply_dihedral(sample.data["optical"], sample.dihedral)
        np.testing.assert_array_equal(inputs["optical"].numpy(), expected)
        seen.add(sample.dihedral)
    assert len(seen) >= 6, "augmentations were not drawn"
    plain = PatchDataset(sampler, IDENTITY, margin=margin, augment=False)
    for sample, (inputs, _) in zip(raw, plain):
        np.testing.assert_array_equal(inputs["sar"].numpy(), sample.data["sar"])


def test_dihedral_group_has_eight_distinct_elements():
    a = np.arange(9).reshape(3, 3)
    images = {apply_dihedral(a, k).tobytes() for k in range(8)}
    assert len(images) == 8


def test_normalisation_uses_the_given_statistics():
    ds = coded_scene()
    stats = {"optical": {"mean": [1.0, 2.0, 3.0], "std": [2.0, 4.0, 8.0]}, "sar": {"mean": [0.5, 0.0], "std": [1.0, 3.0]}}
    sampler = RandomPatchSampler([ArrayReader(ds)], ["optical", "sar"], 16, window=64, seed=0)
    sample = sampler.round(0, 0)[0]
    inputs, _ = next(iter(PatchDataset(sampler, stats, augment=False)))
    want = (sample.data["optical"] - np.array([1.0, 2.0, 3.0])[:, None, None]) / np.array([2.0, 4.0, 8.0])[:, None, None]
    np.testing.assert_allclose(inputs["optical"].numpy(), want, rtol=1e-6)


def test_pooled_statistics_equal_those_of_the_stores_together(tmp_path):
    a = write(labelled_scene(80, 70, seed=0), tmp_path / "a.zarr")
    ds_b = labelled_scene(60, 90, seed=1)
    ds_b["optical"].values[:] = ds_b["optical"].values * 3 + 10
    b = write(ds_b, tmp_path / "b.zarr")
    scenes = [open_scene(a), open_scene(b)]
    pooled = pooled_band_stats(scenes, ["optical", "sar"])
    for name in ("optical", "sar"):
        values = np.concatenate([ds[name].values[:, ds["valid"].values] for ds in scenes], axis=1).astype(np.float64)
        np.testing.assert_allclose(pooled[name]["mean"], values.mean(axis=1), rtol=1e-6)
        np.testing.assert_allclose(pooled[name]["std"], values.std(axis=1), rtol=1e-5)


def test_stream_state_continues_a_round_robin_exactly():
    """Simulate the DataLoader's order (batch i from worker i % W) and check resumes at every point."""

    def batches(state: StreamState, n: int, size: int) -> list[tuple[int, ...]]:
        position = list(state.start)
        out = []
        for i in range(n):
            stream = (i % state.streams + state.offset) % state.streams
            out.append(tuple((stream, position[stream] + j) for j in range(size)))
            position[stream] += size
        return out

    for workers in (1, 2, 3):
        fresh = StreamState.fresh(workers)
        whole = batches(fresh, 20, 4)
        for k in range(0, 20):
            once = fresh.after(k, 4)
            assert batches(once, 20 - k, 4) == whole[k:]
            twice = fresh.after(k // 2, 4).after(k - k // 2, 4)
            assert twice == once
        assert StreamState.from_dict(fresh.after(7, 4).to_dict()) == fresh.after(7, 4)


def _collect(dataset, n, workers):
    loader = make_loader(dataset, batch_size=3, workers=workers, seed=0)
    out = []
    for i, (inputs, target) in enumerate(loader):
        out.append((inputs["optical"].clone(), target.clone()))
        if i + 1 == n:
            break
    return out


@pytest.mark.slow
def test_workers_in_forkserver_are_seeded_per_stream_and_resume_exactly(tmp_path):
    path = write(labelled_scene(128, 128), tmp_path / "s.zarr")
    patches = RandomPatchSampler([path], ["optical", "sar"], 24, window=64, patches_per_window=4, windows_per_round=2, seed=3)
    dataset = PatchDataset(patches, IDENTITY, margin=0, augment=True)
    whole = _collect(dataset, 7, workers=2)
    assert not torch.equal(whole[0][0], whole[1][0]), "both workers produced the same batch"
    resumed = _collect(dataset.with_state(StreamState.fresh(2).after(3, 3)), 4, workers=2)
    for (a, ta), (b, tb) in zip(whole[3:], resumed):
        assert torch.equal(a, b) and torch.equal(ta, tb)
    pixels = LabelledPixelSampler([path], ["optical", "sar"], 7, 12, window=64, seed=3)
    in_process = _collect(PatchDataset(pixels, IDENTITY, margin=3), 2, workers=0)
    assert in_process[0][0].shape == (3, 3, 7, 7) and in_process[0][1].shape == (3, 1, 1)
