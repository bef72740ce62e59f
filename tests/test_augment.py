"""PatchDataset's augmentations: random rescale + crop (PAD's paper), brightness jitter, modality dropout."""

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


class Positional(Fake):
    """Fake's patches, but sample ``i`` of the stream (its dihedral and values) depends on ``i`` alone, as the
    real samplers' do, so a stream started at ``start`` continues the whole one exactly."""

    def __init__(self, count: int = 40, modalities=("optical", "sar")):
        self.count, self.modalities = count, list(modalities)

    def iter_stream(self, stream=0, streams=1, start=0):
        label = _checkerboard()
        values = label.astype(np.float32)
        for i in range(start, self.count):
            data = {"optical": np.stack([values, values + i]), "sar": (values + 2 * i)[None]}
            yield Sample(0, 0, 0, {n: data[n] for n in self.modalities}, label, int(np.random.default_rng(i).integers(0, 8)))


def _dropped(inputs: dict) -> list[str]:
    return [n for n, v in inputs.items() if not v.any()]  # Positional's inputs are never all zero otherwise


@pytest.mark.parametrize("kwargs", [{}, {"rescale": (0.5, 2.0)}, {"jitter": 0.5}, {"margin": 5}])
def test_modality_dropout_zeros_one_modality_and_leaves_the_rest_of_the_sample_alone(kwargs):
    n, p = 1000, 0.3
    plain = _samples(PatchDataset(Positional(n), STATS, seed=4, **kwargs), n)
    off = _samples(PatchDataset(Positional(n), STATS, seed=4, modality_dropout=0.0, **kwargs), n)
    dropped = _samples(PatchDataset(Positional(n), STATS, seed=4, modality_dropout=p, **kwargs), n)
    again = _samples(PatchDataset(Positional(n), STATS, seed=4, modality_dropout=p, **kwargs), n)
    other = _samples(PatchDataset(Positional(n), STATS, seed=5, modality_dropout=p, **kwargs), n)
    which = []
    for (xa, ya), (xo, yo), (xb, yb), (xc, yc) in zip(plain, off, dropped, again):
        assert torch.equal(ya, yo) and all(torch.equal(xa[m], xo[m]) for m in xa)  # p = 0: bitwise as before
        assert torch.equal(ya, yb) and torch.equal(yb, yc)  # labels (flips, rescale) untouched
        gone = _dropped(xb)
        assert len(gone) <= 1 and not _dropped(xa)  # never every modality
        for m in xb:
            assert torch.equal(xb[m], xc[m])  # deterministic
            if m in gone:
                assert torch.equal(xb[m], torch.zeros_like(xa[m]))
            else:
                assert torch.equal(xb[m], xa[m])  # the others bitwise those of the run without dropout
        which += gone
    share = len(which) / n  # binomial: sd sqrt(0.3 * 0.7 / 1000) = 0.0145
    assert abs(share - p) < 0.05, share
    assert 0.35 < which.count("sar") / len(which) < 0.65  # the modality is chosen uniformly
    assert [_dropped(x) for x, _ in other] != [_dropped(x) for x, _ in dropped]  # another seed, other draws


def test_modality_dropout_resumes_exactly_and_is_carried_by_copies():
    dataset = PatchDataset(Positional(60), STATS, modality_dropout=0.5, rescale=(0.5, 2.0), jitter=0.2, seed=1)
    whole = _samples(dataset, 60)
    resumed = dataset.with_state(StreamState(1, (17,), 0))
    assert resumed.modality_dropout == 0.5 and dataset.for_rank(0, 1).modality_dropout == 0.5
    tail = _samples(resumed, 60)
    assert len(tail) == 43 and any(_dropped(x) for x, _ in tail)
    for (xa, ya), (xb, yb) in zip(whole[17:], tail):
        assert torch.equal(ya, yb) and all(torch.equal(xa[m], xb[m]) for m in xa)


@pytest.mark.parametrize("kwargs", [{}, {"rescale": (0.5, 2.0)}, {"jitter": 0.3, "modality_dropout": 0.3}])
def test_modality_jitter_shifts_every_band_of_a_modality_by_one_offset(kwargs):
    n = 200
    plain = _samples(PatchDataset(Positional(n), STATS, seed=4, **kwargs), n)
    shifted = _samples(PatchDataset(Positional(n), STATS, seed=4, modality_jitter={"optical": 0.5}, **kwargs), n)
    again = _samples(PatchDataset(Positional(n), STATS, seed=4, modality_jitter={"optical": 0.5}, **kwargs), n)
    other = _samples(PatchDataset(Positional(n), STATS, seed=5, modality_jitter={"optical": 0.5}, **kwargs), n)
    offsets = []
    for (xa, ya), (xb, yb), (xc, yc) in zip(plain, shifted, again):
        assert torch.equal(ya, yb) and torch.equal(yb, yc)  # labels, flips, rescale and dropout draws untouched
        assert torch.equal(xa["sar"], xb["sar"])  # a modality it does not name is bitwise as before
        assert torch.equal(xb["optical"], xc["optical"])  # deterministic
        inside = ya != IGNORE  # rescale pads outside the patch with zeros after the shift
        diff = (xb["optical"] - xa["optical"])[:, inside]
        if not xa["optical"].any():  # dropped: zeros whatever the shift
            continue
        assert torch.allclose(diff, diff.flatten()[0].expand_as(diff), atol=1e-4)  # one offset for every band and pixel
        offsets.append(float(diff.flatten()[0]))
    offsets = np.array(offsets)
    assert 0.4 < offsets.std() < 0.6 and abs(offsets.mean()) < 0.1, (offsets.std(), offsets.mean())
    assert [float(x["optical"][0, 0, 0]) for x, _ in other] != [float(x["optical"][0, 0, 0]) for x, _ in shifted]
    off = _samples(PatchDataset(Positional(n), STATS, seed=4, modality_jitter={"optical": 0.5}, augment=False), n)
    base = _samples(PatchDataset(Positional(n), STATS, seed=4, augment=False), n)
    assert all(torch.equal(x[m], y[m]) for (x, _), (y, _) in zip(off, base) for m in x)  # no augmentation, no shift


def test_modality_jitter_resumes_exactly_and_is_carried_by_copies():
    dataset = PatchDataset(Positional(60), STATS, modality_jitter={"sar": 0.5}, rescale=(0.5, 2.0), seed=1)
    whole = _samples(dataset, 60)
    resumed = dataset.with_state(StreamState(1, (17,), 0))
    assert resumed.modality_jitter == {"sar": 0.5} and dataset.for_rank(0, 1).modality_jitter == {"sar": 0.5}
    tail = _samples(resumed, 60)
    assert len(tail) == 43
    for (xa, ya), (xb, yb) in zip(whole[17:], tail):
        assert torch.equal(ya, yb) and all(torch.equal(xa[m], xb[m]) for m in xa)


@pytest.mark.parametrize("value", [{"lidar": 0.5}, {"sar": -0.1}, {"sar": float("nan")}])
def test_modality_jitter_must_name_a_modality_and_a_sigma(value):
    with pytest.raises(ValueError, match="modality_jitter"):
        PatchDataset(Fake(), STATS, modality_jitter=value)


@pytest.mark.parametrize("value", [0.5, {"sar": -1}, {"sar": float("inf")}, {"sar": "high"}, {"sar": True}, ["sar", 0.5]])
def test_bad_modality_jitter_option_is_one_input_error(value):
    from tilefuse.errors import InputError
    from tilefuse.training_data import DataOptions

    with pytest.raises(InputError, match=r"modality_jitter= \(--modality-jitter\) must be a dict of modality name -> sigma >= 0"):
        DataOptions(modality_jitter=value).check()


def test_modality_dropout_needs_augment_and_two_modalities():
    off = _samples(PatchDataset(Positional(200), STATS, modality_dropout=0.9, augment=False), 200)
    single = _samples(PatchDataset(Positional(200, ["optical"]), STATS, modality_dropout=0.9), 200)
    assert not any(_dropped(x) for x, _ in off + single)


@pytest.mark.parametrize("value", [-0.1, 1.0, float("nan")])
def test_modality_dropout_must_be_a_probability_below_one(value):
    with pytest.raises(ValueError, match="modality_dropout"):
        PatchDataset(Fake(), STATS, modality_dropout=value)


@pytest.mark.parametrize("value", [-0.1, 1, 1.0, 1.5, float("nan"), "0.3", True])
def test_bad_modality_dropout_option_is_one_input_error(value):
    from tilefuse.errors import InputError
    from tilefuse.training_data import DataOptions

    with pytest.raises(InputError, match=r"modality_dropout= \(--modality-dropout\) must be a share in 0\.\.1") as error:
        DataOptions(modality_dropout=value).check()
    assert len(str(error.value).splitlines()) == 1


def test_a_resume_refuses_another_modality_dropout():
    from tilefuse.errors import InputError
    from tilefuse.pipelines.train import _resolve_job

    saved = _resolve_job("pad", {}, ["a.zarr"], [], {"modality_dropout": 0.3}, None)
    assert saved["data"]["modality_dropout"] == 0.3
    assert _resolve_job("pad", None, ["a.zarr"], [], {"modality_dropout": 0.3}, saved)["data"]["modality_dropout"] == 0.3
    with pytest.raises(InputError, match=r"modality_dropout= \(--modality-dropout\) 0.5 differs from the run's 0.3"):
        _resolve_job("pad", None, ["a.zarr"], [], {"modality_dropout": 0.5}, saved)
    older = {**saved, "data": {k: v for k, v in saved["data"].items() if k != "modality_dropout"}}  # a run from before the option
    assert _resolve_job("pad", None, ["a.zarr"], [], {}, older)["data"]["modality_dropout"] == 0.0
    with pytest.raises(InputError, match="modality_dropout"):
        _resolve_job("pad", None, ["a.zarr"], [], {"modality_dropout": 0.3}, older)


def test_noise_fill_drops_the_same_modalities_with_unit_noise():
    n = 300
    zeros = _samples(PatchDataset(Positional(n), STATS, seed=6, modality_dropout=0.4), n)
    noise = _samples(PatchDataset(Positional(n), STATS, seed=6, modality_dropout=0.4, modality_dropout_fill="noise"), n)
    again = _samples(PatchDataset(Positional(n), STATS, seed=6, modality_dropout=0.4, modality_dropout_fill="noise"), n)
    filled = []
    for (xz, yz), (xn, yn), (xa, _) in zip(zeros, noise, again):
        assert torch.equal(yz, yn) and all(torch.equal(xn[m], xa[m]) for m in xn)
        for m in xz:
            if m in _dropped(xz):  # the same draws pick the same sample and modality
                filled.append(xn[m])
            else:
                assert torch.equal(xz[m], xn[m])
    assert filled
    values = torch.cat([v.reshape(-1) for v in filled])
    assert abs(values.mean()) < 0.01 and abs(values.std() - 1) < 0.01
    assert PatchDataset(Fake(), STATS, modality_dropout_fill="noise").with_state(StreamState(1, (3,), 0)).modality_dropout_fill == "noise"


def test_bad_modality_dropout_fill_is_refused():
    from tilefuse.errors import InputError
    from tilefuse.training_data import DataOptions

    with pytest.raises(ValueError, match="modality_dropout_fill"):
        PatchDataset(Fake(), STATS, modality_dropout_fill="mean")
    with pytest.raises(InputError, match=r"modality_dropout_fill= 'mean' \(--modality-dropout-fill\): use zeros or noise"):
        DataOptions(modality_dropout_fill="mean").check()
