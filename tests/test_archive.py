"""Archives of many stores: training over 100 stores, saved sampler indexes reused on restart, stale ones rebuilt."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr

from test_sampling import labelled_scene, write
from test_training import FAST  # noqa: F401  (registers the test models)
from tilefuse.sampling import INDEX_DIR, IndexCache, LabelledPixelSampler, RandomPatchSampler, SceneReader
from tilefuse.storage import record_digests

PATCH = 16


class CountingReader(SceneReader):
    """A SceneReader that counts the reads of each array."""

    def __init__(self, path) -> None:
        super().__init__(path)
        self.reads: dict[str, int] = {}

    def __getstate__(self) -> dict:
        return {**super().__getstate__(), "reads": {}}

    def read(self, y0, y1, x0, x1, names):
        for name in names:
            self.reads[name] = self.reads.get(name, 0) + 1
        return super().read(y0, y1, x0, x1, names)


def index_reads(readers) -> int:
    return sum(r.reads.get("label", 0) + r.reads.get("valid", 0) for r in readers)


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> list[Path]:
    """100 small stores (4 distinct scenes, each copied 25 times: only their paths differ)."""
    root = tmp_path_factory.mktemp("archive")
    sources = [write(labelled_scene(48, 64, seed=s, invalid_disk=s % 2 == 0), root / f"source{s}.zarr", chunk=32) for s in range(4)]
    stores = []
    for i in range(100):
        store = root / f"s{i:03d}.zarr"
        shutil.copytree(sources[i % 4], store)
        stores.append(store)
    return stores


@pytest.fixture
def few(tmp_path) -> list[Path]:
    return [write(labelled_scene(96, 80, seed=s), tmp_path / f"f{s}.zarr", chunk=32) for s in range(3)]


def test_an_archive_of_100_stores_trains_and_a_restart_reads_no_index(archive, tmp_path, monkeypatch):
    from tilefuse.pipelines.train import train
    from tilefuse.training_data import DataOptions, assemble

    run = train("test-seg", archive, tmp_path / "run", steps=3, batch_size=4, patch_size=PATCH, workers=0, log_every=1, progress=False, split="stores")
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3]
    assert len(list((run / INDEX_DIR).glob("*.npz"))) == 100, "one saved index per store"
    saved = json.loads((run / "split.json").read_text())
    assert len(saved["stores"]) == 100 and len(saved["assignment"]) == 100

    reads = {"n": 0}
    original = SceneReader.read

    def counting(self, y0, y1, x0, x1, names):
        reads["n"] += sum(name in ("valid", "label") for name in names)
        return original(self, y0, y1, x0, x1, names)

    monkeypatch.setattr(SceneReader, "read", counting)
    data = DataOptions(patch_size=PATCH, split="stores")
    again = assemble("test-seg", archive, data=data, seed=42, run=run)
    assert reads["n"] == 0, "a restart read valid/label again"
    assert again.index.hits == 100 and again.index.misses == 0
    fresh = assemble("test-seg", archive, data=data, seed=42)
    assert reads["n"] > 0
    np.testing.assert_array_equal(again.train.sampler.table.windows, fresh.train.sampler.table.windows)
    np.testing.assert_array_equal(again.train.sampler.table.weights, fresh.train.sampler.table.weights)
    np.testing.assert_array_equal(again.train.sampler.table.classes, fresh.train.sampler.table.classes)


def test_a_saved_index_is_reused_without_reading_and_samples_the_same(few, tmp_path):
    folder = tmp_path / "index"
    first_readers = [CountingReader(p) for p in few]
    cache = IndexCache(folder)
    first = RandomPatchSampler(first_readers, ["optical", "sar"], PATCH, min_labelled=0.2, window=64, seed=5, index=cache)
    assert index_reads(first_readers) > 0 and cache.misses == 3
    cache.save()
    readers = [CountingReader(p) for p in few]
    cache = IndexCache(folder)
    second = RandomPatchSampler(readers, ["optical", "sar"], PATCH, min_labelled=0.2, window=64, seed=5, index=cache)
    assert index_reads(readers) == 0 and cache.hits == 3 and cache.misses == 0
    a, b = first.iter_stream(0, 2, 3), second.iter_stream(0, 2, 3)
    for _ in range(40):
        x, y = next(a), next(b)
        assert (x.store, x.y, x.x, x.dihedral) == (y.store, y.y, y.x, y.dihedral)
    # other settings never take the saved index
    cache = IndexCache(folder)
    RandomPatchSampler([CountingReader(p) for p in few], ["optical"], PATCH, min_labelled=0.3, window=64, index=cache)
    assert cache.hits == 0 and cache.misses == 3

    pixel_readers = [CountingReader(p) for p in few]
    cache = IndexCache(folder)
    pixels = LabelledPixelSampler(pixel_readers, ["optical"], 5, 6, window=64, seed=1, index=cache)
    cache.save()
    counted = [CountingReader(p) for p in few]
    cache = IndexCache(folder)
    again = LabelledPixelSampler(counted, ["optical"], 5, 6, window=64, seed=1, index=cache)
    assert cache.hits == 3 and index_reads(counted) < index_reads(pixel_readers)
    np.testing.assert_array_equal(again.pixels, pixels.pixels)


def test_a_changed_store_rebuilds_its_index_and_the_law_follows_the_new_labels(few, tmp_path):
    folder = tmp_path / "index"
    options = dict(min_labelled=0.2, class_balance=True, window=64, seed=2)
    cache = IndexCache(folder)
    before = RandomPatchSampler(few, ["optical"], PATCH, index=cache, **options)
    cache.save()

    group = zarr.open_group(str(few[1]), mode="r+")
    label = group["label"][0:32, 0:32]
    group["label"][0:32, 0:32] = np.where(label == 255, 255, 7).astype(np.uint8)  # one chunk: a new class 7
    record_digests(few[1])  # an edit made on purpose (unrecorded, the store refuses the changed chunk)

    cache = IndexCache(folder)
    after = RandomPatchSampler(few, ["optical"], PATCH, index=cache, **options)
    assert cache.hits == 2 and cache.misses == 1, "only the changed store is indexed again"
    truth = RandomPatchSampler(few, ["optical"], PATCH, **options)
    np.testing.assert_array_equal(after.table.windows, truth.table.windows)
    np.testing.assert_array_equal(after.table.weights, truth.table.weights)
    np.testing.assert_array_equal(after.table.classes, truth.table.classes)
    assert 7 not in before.table.classes and after.table.dense()[:, 7].sum() > 0
    centres = [s.label[PATCH // 2, PATCH // 2] for s, _ in zip(after.iter_stream(0), range(20 * after.round_size))]
    counts = np.bincount(centres, minlength=8)
    assert counts[7] > 0 and counts[7] == pytest.approx(len(centres) / 4, rel=0.3), counts  # 4 balanced classes
    cache.save()
    assert len(list(folder.glob("*.npz"))) == 3, "the stale index is dropped"


@pytest.mark.parametrize("tile", [1024, 16, 40])
def test_the_cell_index_equals_weighing_every_window_on_its_own(tmp_path, monkeypatch, tile):
    """The index (one read per tile of cells, a band of tiles at a time) equals the definition: per read window,
    the eligible origins it holds weighted 1 / cover count, per centre class; with a split, class balance and
    a margin; in one tile, or in many bands and tiles."""
    monkeypatch.setattr(RandomPatchSampler, "INDEX_TILE", tile)
    from tilefuse.sampling import SpatialSplit, centre_classes, window_starts

    paths = [write(labelled_scene(h, w, seed=s), tmp_path / f"c{s}.zarr", chunk=16) for s, (h, w) in enumerate([(150, 130), (97, 211)])]
    rng = np.random.default_rng(0)
    split = SpatialSplit(24, tuple(rng.integers(0, 2, size=(-(-h // 24), -(-w // 24))).astype(np.int8) for h, w in [(150, 130), (97, 211)]))
    for patch, window, options in [(16, 48, {}), (12, 64, dict(margin=2, min_labelled=0.3, class_balance=True, split=split)), (17, 16, {})]:
        sampler = RandomPatchSampler(paths, ["optical"], patch, window=window, **options)
        expected_windows, expected = [], []
        for store, reader in enumerate(sampler.readers):
            (h, w), (edge, stride) = reader.shape, sampler.geometry[store]
            for y0 in window_starts(h, patch, stride):
                for x0 in window_starts(w, patch, stride):
                    extent = (store, y0, min(y0 + edge, h), x0, min(x0 + edge, w))
                    arrays = reader.read(*extent[1:], ["valid", "label"])
                    ok = sampler._eligible(extent, arrays)
                    classes = centre_classes(arrays["valid"], arrays["label"], patch)[ok]
                    weights = np.bincount(classes, weights=sampler._inverse_cover(*extent)[ok], minlength=256)
                    if weights.sum() > 0:
                        expected_windows.append(extent)
                        expected.append(weights)
        assert sampler.table.windows.tolist() == [list(e) for e in expected_windows], (patch, window)
        np.testing.assert_allclose(sampler.table.dense(), np.array(expected), rtol=1e-12, atol=1e-12)
        assert sampler.table.classes.tolist() == np.flatnonzero(np.array(expected).sum(axis=0)).tolist()
