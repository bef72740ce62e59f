"""Training on a mix of stores: what one store gives must not leak into, or be lost in, the others.

Statistics of held-out stores normalised the training inputs; two stores naming one class by two ids trained it as
two classes (and made predictions that predict itself then called corrupt); a class no training store holds was
trained without a word; and a store of other bands was refused as if its bands were merely reordered.
"""

from __future__ import annotations

import numpy as np
import pytest
from predict_fixtures import MODALITIES
from test_sampling import labelled_scene, write

from tilefuse.dataset import pooled_band_stats
from tilefuse.scene import open_scene
from tilefuse.training_data import DataOptions, assemble


# --- 1. band statistics come from the training stores alone ---------------------------------------------------


@pytest.fixture(scope="module")
def scaled_stores(tmp_path_factory):
    """Three stores whose optical bands differ by orders of magnitude (x1, x10, x100): pooling any held-out one shows."""
    root = tmp_path_factory.mktemp("scaled")
    stores = []
    for k, scale in enumerate((1.0, 10.0, 100.0)):
        ds = labelled_scene(64, 64, seed=k, invalid_disk=False)
        stores.append(write(ds.assign(optical=ds["optical"] * scale + scale), root / f"s{int(scale)}.zarr"))
    return stores


def test_a_split_by_stores_pools_the_statistics_of_its_training_stores_alone(scaled_stores):
    data = DataOptions(patch_size=32, split="stores", val_fraction=0.3, test_fraction=0.3)
    held_out = 0
    for seed in range(6):
        prepared = assemble("test-pointwise", scaled_stores, data=data, seed=seed)
        trained = [i for i, a in enumerate(prepared.split.assignment) if (a == 0).all()]
        assert trained and all(((a == 0).all() or (a != 0).all()) for a in prepared.split.assignment)
        held_out += len(trained) < len(scaled_stores)
        expected = pooled_band_stats([open_scene(scaled_stores[i]) for i in trained], list(MODALITIES))
        for name in MODALITIES:
            for key in ("mean", "std"):
                assert np.allclose(prepared.config.band_stats[name][key], expected[name][key], rtol=1e-6), (seed, name, key)
    assert held_out  # the seeds drew splits that hold stores out (else the test proves nothing)


def test_validation_stores_and_a_split_by_blocks_keep_the_training_stores_statistics(scaled_stores):
    a, s10, s100 = scaled_stores
    with_val = assemble("test-pointwise", [a], val_stores=[s100], data=DataOptions(patch_size=32, val_fraction=0.0))
    alone = pooled_band_stats([open_scene(a)], list(MODALITIES))
    assert with_val.config.band_stats == alone
    # blocks of every store may be held out: the statistics are the stores' own (computed at ingest), pooled
    blocks = assemble("test-pointwise", [a, s10], data=DataOptions(patch_size=32, val_fraction=0.3, block=32))
    assert blocks.config.band_stats == pooled_band_stats([open_scene(a), open_scene(s10)], list(MODALITIES))
