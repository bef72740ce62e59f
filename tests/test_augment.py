"""PatchDataset's random rescale + crop (PAD's paper augmentation): alignment, range, determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tilefuse.dataset import PatchDataset, StreamState, rescale_and_crop
from tilefuse.sampling import Sample
from tilefuse.scene import IGNORE

P = 32
STATS = {"optical": {"mean": [0.0, 0.0], "std": [1.0, 1.0]}, "sar": {"mean": [0.0], "std": [1.0]}}


def _checkerboard(block: int = 8) -> np.ndarray:
    yy, xx = np.mgrid[:P, :P]
    return (((yy // block) + (xx // block)) % 2 + 1).astype(np.uint8)  # classes 1 and 2


class Fake:
    """A sampler whose inputs equal the labels (both optical bands and SAR), with random dihedrals."""

    modalities = ["optical", "sar"]

    def iter_stream(self, stream=0, streams=1, start=0):
        rng = np.random.default_rng(start)
        label = _checkerboard()
        for _ in range(40):
            data = {"optical": np.stack([label, label]).astype(np.float32), "sar": label[None].astype(np.float32)}
            yield Sample(0, 0, 0, data, label, int(rng.integers(0, 8)))


def _samples(dataset, n=40):
    return [s for _, s in zip(range(n), dataset)]


def test_rescale_keeps_inputs_and_labels_aligned_and_pads_with_ignore():
    padded = grown = 0
    for inputs, label in _samples(PatchDataset(Fake(), STATS, rescale=(0.5, 2.0), seed=3)):
        assert label.shape == (P, P) and inputs["optical"].shape == (2, P, P) and inputs["sar"].shape == (1, P, P)
        labelled = label != IGNORE
        padded += int((~labelled).any())
        grown += int(labelled.all())
        for v in inputs.values():
            assert torch.all(v[:, ~labelled] == 0)  # padding is the band mean
            agree = (v[:, labelled].round() == label[labelled]).float().mean()
            assert agree > 0.8  # bilinear blurs block edges only; a shifted crop would halve this
    assert padded and grown  # both shrinking and growing factors were drawn


def test_shrinking_by_half_fits_the_whole_patch_once():
    label = torch.from_numpy(_checkerboard().astype(np.int64))
    inputs = {"optical": label[None].float()}
    out, out_label = rescale_and_crop(inputs, label, 0.5, np.random.default_rng(0))
    assert (out_label != IGNORE).sum() == (P // 2) ** 2
    assert set(out_label[out_label != IGNORE].unique().tolist()) == {1, 2}


def test_same_seed_and_stream_position_give_the_same_samples_and_resume_keeps_rescale():
    a = _samples(PatchDataset(Fake(), STATS, rescale=(0.5, 2.0), seed=1))
    b = _samples(PatchDataset(Fake(), STATS, rescale=(0.5, 2.0), seed=1))
    c = _samples(PatchDataset(Fake(), STATS, rescale=(0.5, 2.0), seed=2))
    assert all(torch.equal(x[1], y[1]) for x, y in zip(a, b))
    assert not all(torch.equal(x[1], y[1]) for x, y in zip(a, c))
    resumed = PatchDataset(Fake(), STATS, rescale=(0.5, 2.0), seed=1).with_state(StreamState(1, (5,), 0))
    assert resumed.rescale == (0.5, 2.0) and resumed.seed == 1


def test_no_rescale_and_unit_rescale_change_nothing():
    plain = _samples(PatchDataset(Fake(), STATS))
    unit = _samples(PatchDataset(Fake(), STATS, rescale=(1.0, 1.0)))
    off = _samples(PatchDataset(Fake(), STATS, rescale=(0.5, 2.0), augment=False))
    for (xa, ya), (xb, yb), (xc, yc) in zip(plain, unit, off):
        assert torch.equal(ya, yb) and all(torch.equal(xa[n], xb[n]) for n in xa)
        assert torch.equal(yc, torch.from_numpy(_checkerboard().astype(np.int64)))


@pytest.mark.parametrize("kwargs", [{"rescale": (0.0, 2.0)}, {"rescale": (2.0, 1.0)}, {"rescale": (0.5, 2.0), "margin": 5}])
def test_bad_rescale_is_refused(kwargs):
    with pytest.raises(ValueError, match="rescale"):
        PatchDataset(Fake(), STATS, **kwargs)


@pytest.mark.parametrize("rescale", [None, (0.5, 2.0)])
def test_jitter_shifts_each_band_by_one_offset_and_leaves_labels_and_rescale_alone(rescale):
    plain = _samples(PatchDataset(Fake(), STATS, rescale=rescale, seed=4))
    shifted = _samples(PatchDataset(Fake(), STATS, rescale=rescale, jitter=0.5, seed=4))
    again = _samples(PatchDataset(Fake(), STATS, rescale=rescale, jitter=0.5, seed=4))
    offsets = []
    for (xa, ya), (xb, yb), (xc, _) in zip(plain, shifted, again):
        assert torch.equal(ya, yb)  # labels, flips and rescale draws are those of the run without jitter
        for name in xa:
            assert torch.equal(xb[name], xc[name])  # deterministic
            inside = ya != IGNORE  # rescale pads outside the patch with zeros after the shift
            diff = (xb[name] - xa[name])[:, inside]
            assert torch.allclose(diff, diff[:, :1].expand_as(diff), atol=1e-5)  # one offset per band
            offsets += diff[:, 0].tolist()
    offsets = np.array(offsets)
    assert 0.35 < offsets.std() < 0.65 and abs(offsets.mean()) < 0.15 and len(set(offsets.round(6))) == len(offsets)
    off = _samples(PatchDataset(Fake(), STATS, rescale=rescale, jitter=0.5, seed=4, augment=False))
    assert all(torch.equal(x[n], y[n]) for (x, _), (y, _) in zip(off, _samples(PatchDataset(Fake(), STATS, augment=False))) for n in x)


def test_jitter_must_be_a_non_negative_number():
    with pytest.raises(ValueError, match="jitter"):
        PatchDataset(Fake(), STATS, jitter=-0.1)


def test_negative_jitter_option_is_one_input_error():
    from tilefuse.errors import InputError
    from tilefuse.training_data import DataOptions

    with pytest.raises(InputError, match=r"jitter= \(--jitter\) must be a number >= 0"):
        DataOptions(jitter=-1.0).check()
