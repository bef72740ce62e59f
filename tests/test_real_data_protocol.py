"""The protocol of ``benchmarks/real_data.py`` (README, "Results on small real data"), run small on the shared
terramind chips: what its figures rest on, not the figures themselves.

- same-region: each chip's test part lies below its training part with ``--gap`` rows between them, so no test
  pixel (or any pixel of its neighbourhood) is ever read in training;
- the few-pixel baselines learn from exactly the labelled pixels ``tilefuse.train`` drew for S²Fin, draw by draw;
- ``--draws``: the first draw is the main table's run, and the margin is S²Fin's score minus the baseline's.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

import tilefuse
from tilefuse.sampling import LabelledPixelSampler

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "real_data.py"


@pytest.fixture(scope="module")
def real_data():
    spec = importlib.util.spec_from_file_location("benchmarks_real_data", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    if not (module.DATA / "terramind" / "LULC").is_dir():
        pytest.skip(f"the shared terramind chips are not at {module.DATA}")
    return module


def test_same_region_test_parts_lie_below_the_training_parts_with_the_gap(real_data, tmp_path):
    ds = real_data.datasets(real_data.DATA)["terramind"]
    test_rows, gap = 20, 12
    (fold,) = real_data.folds(ds, "same-region", tmp_path, test_rows, gap)
    assert len(fold.train) == len(fold.test) == len(ds.chips) >= 2
    for chip, test in fold.test.items():
        (train,) = [s for s in fold.train if Path(s).name.startswith(f"{chip}-")]
        a, b = tilefuse.open_scene(train), tilefuse.open_scene(test)
        assert np.array_equal(a.x.values, b.x.values), chip
        step = float(a.y.values[0] - a.y.values[1])  # rows run north to south
        assert b.sizes["y"] == test_rows
        rows_between = (a.y.values[-1] - b.y.values[0]) / step - 1
        assert rows_between == pytest.approx(gap), chip
        assert a.sizes["y"] + gap + test_rows == int(round((a.y.values[0] - b.y.values[-1]) / step)) + 1


def test_few_pixel_baselines_learn_from_s2fins_own_draw_and_draws_add_up(real_data, tmp_path, monkeypatch):
    made: list[LabelledPixelSampler] = []
    init = LabelledPixelSampler.__init__

    def spy(self, *args, **kwargs):
        init(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(LabelledPixelSampler, "__init__", spy)
    report = real_data.main([
        "--work", str(tmp_path), "--datasets", "terramind", "--methods", "logreg-few,s2fin", "--threads", "1",
        "--s2fin-option", "steps=2", "--s2fin-option", "seed=5", "--score-pixels", "40", "--draws", "2",
    ])
    drawn = {}  # seed -> the labelled pixels of every training draw (the baseline's and tilefuse.train's)
    for sampler in made:
        if sampler.per_class and sampler.repeat:
            drawn.setdefault(sampler.seed, []).append(sampler.pixels)
    assert sorted(drawn) == [5, 6]
    for seed, draws in drawn.items():
        assert len(draws) == 2, f"seed {seed}: one draw for the baseline, one for tilefuse.train"
        assert len(draws[0]) > 0 and np.array_equal(draws[0], draws[1]), f"seed {seed}: the baseline saw other pixels"
    assert not np.array_equal(drawn[5][0], drawn[6][0]), "two draws drew the same pixels"

    table = report["draws"]["terramind"]
    assert table["seeds"] == [5, 6]
    main = report["datasets"]["terramind"]
    for method in ("s2fin", "logreg-few"):
        pooled = main[method]["metrics"]["pooled"]
        assert table[method]["miou"][0] == pooled["mean_iou"] and table[method]["oa"][0] == pooled["overall_accuracy"]
    for key in ("miou", "oa"):
        margin = np.subtract(table["s2fin"][key], table["logreg-few"][key])
        np.testing.assert_allclose(table[f"margin_{key}"], margin)
    assert (tmp_path / "results-same-region.json").is_file()
