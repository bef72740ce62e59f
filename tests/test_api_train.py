"""tilefuse.train from a notebook: values as Python gives them, resumed as they were given."""

from __future__ import annotations

import pytest

from test_training import FAST, stores  # noqa: F401  (the fixture and the test models)
from tilefuse.checkpoint import read_config
from tilefuse.errors import InputError
from tilefuse.pipelines.train import train


def test_a_resume_given_the_same_tuples_continues_and_a_changed_value_is_refused(stores, tmp_path):  # noqa: F811
    """A notebook passes modalities=("sar", "optical"), rescale=(0.5, 2) and hparams={"widths": (8, 16)} to the first call and the same to the
    resume: the run folder's JSON holds lists, and the resume was refused ("('sar', 'optical') differs from the run's
    ['sar', 'optical']"). Values equal as JSON are the same; another value is still refused, naming the option."""
    options = dict(steps=2, checkpoint_every=1, modalities=("sar", "optical"), rescale=(0.5, 2), hparams={"widths": (8, 16)}, **FAST)
    run = train("test-seg", stores, tmp_path / "run", **options)
    assert list(read_config(run).modalities) == ["sar", "optical"]
    train("test-seg", stores, run, resume=True, **options)  # the same call: continues (nothing left to do)
    train("test-seg", stores, run, resume=True, **{**options, "modalities": ["sar", "optical"], "rescale": [0.5, 2.0]})
    with pytest.raises(InputError, match=r"^modalities= \(--modality\) \['optical', 'sar'\] differs from the run's \['sar', 'optical'\]"):
        train("test-seg", stores, run, resume=True, **{**options, "modalities": ("optical", "sar")})
    with pytest.raises(InputError, match=r"^rescale= \(--rescale\) \[0.5, 1.5\] differs"):
        train("test-seg", stores, run, resume=True, **{**options, "rescale": (0.5, 1.5)})


def test_a_resume_on_stores_whose_classes_were_renamed_is_refused(stores, tmp_path):  # noqa: F811
    """A store re-ingested with other names for the same ids (a fixed --class-names or --label-map) kept the class
    count, so the resume went on training the run's weights for 'water' on what is now 'forest', and the checkpoint
    took the new names without a word. The run's class list and the stores' must agree on every id."""
    import xarray as xr

    from tilefuse.scene import write_scene

    options = dict(steps=1, checkpoint_every=1, **FAST)
    run = train("test-seg", stores, tmp_path / "run", **options)
    before = (run / "config.json").read_bytes()
    for store in stores:
        renamed = xr.open_zarr(store, decode_coords="all").load()
        renamed["label"].attrs["class_names"] = ["forest", "water", "field"]
        write_scene(renamed, store, overwrite=True, chunk=64, shard=None)
    with pytest.raises(InputError, match=r"^class lists conflict: class 0 is 'water' in the run but 'forest' in the stores .*: resume with the stores"):
        train("test-seg", stores, run, resume=True, **options)
    assert (run / "config.json").read_bytes() == before


@pytest.mark.parametrize("size", [(120, 120), (150, 100), (40, 40)])
def test_every_seeds_validation_holds_samples_or_the_split_is_refused(tmp_path, size):
    """A store not a multiple of the split block has edge blocks narrower than a patch; a validation drawn from
    edge blocks alone held no whole patch, so the run trained with an empty validation (metrics.json 'pixels': 0)
    without a word (120 x 120 px, 32 px patches: seeds 5 and 8). Edge blocks narrower than a sample stay in
    training; a store too small for both is refused, naming val_fraction=."""
    from test_sampling import labelled_scene, write

    from tilefuse.training_data import DataOptions, assemble

    store = write(labelled_scene(*size, invalid_disk=False), tmp_path / "s.zarr")
    for model, options in (("test-seg", dict(patch_size=32)), ("test-pixel", dict(pixels_per_class=5, allow_fewer=True))):
        for seed in range(12):
            try:
                data = assemble(model, [store], data=DataOptions(**options), seed=seed)
            except InputError as error:
                assert size == (40, 40) and model == "test-seg", error
                assert "the split leaves nothing to train on: lower val_fraction=" in str(error)
                continue
            assert data.val is not None
            assert next(iter(data.val.sampler.iter_stream()), None) is not None, (model, seed)


@pytest.mark.parametrize("model, options", [("test-seg", dict(patch_size=32, block=7)), ("test-pixel", dict(pixels_per_class=5, block=4))])
def test_a_split_block_smaller_than_a_sample_is_refused_naming_block(stores, model, options):  # noqa: F811
    """Held-out blocks smaller than a sample cut every training patch: the run was refused as 'no valid labelled
    patch ...: lower min_labelled= or patch_size=' (neither helps) or held out blocks that hold no sample."""
    from tilefuse.training_data import DataOptions, assemble

    with pytest.raises(InputError, match=r"^block= \(--block\) \d+ is smaller than a sample \(\d+ px\)"):
        assemble(model, stores, data=DataOptions(**options))


def test_resume_and_overwrite_together_name_the_parameters(stores, tmp_path):  # noqa: F811
    """The Python API names its parameters (the message named only the CLI flags)."""
    with pytest.raises(InputError, match=r"^resume=True \(--resume\) and overwrite=True \(--overwrite\) contradict each other"):
        train("test-seg", stores, tmp_path / "run", resume=True, overwrite=True, steps=1, **FAST)
    assert not (tmp_path / "run").exists()


def test_run_folder_refusals_name_the_parameters_to_pass(stores, tmp_path):  # noqa: F811
    """From Python the fix is a parameter: these named only CLI flags (--resume, --overwrite, --out, --model, --hparam)."""
    options = dict(steps=1, **FAST)
    run = train("test-seg", stores, tmp_path / "run", **options)
    cases = [
        (dict(), r"already exists: pass resume=True \(--resume\) to continue it, overwrite=True \(--overwrite\) to replace it, or choose another out= \(--out\)$"),
        (dict(resume=True, model="test-pixel"), r"not 'test-pixel': resume with model='test-seg' \(--model test-seg\) or use another out= \(--out\)$"),
        (dict(resume=True, hparams={"x": 1}), r": resume with the same hparams= \(--hparam\)$"),
        (dict(resume=True, stores=stores[:1]), r": resume with the same stores= \(the same --store list\)$"),
        (dict(resume=True, val_stores=stores[1:], stores=stores[:1]), r": resume with the same stores= \(the same --store list\)$"),
    ]
    for change, message in cases:
        args = {"model": "test-seg", "stores": stores, **options, **change}
        with pytest.raises(InputError, match=message):
            train(args.pop("model"), args.pop("stores"), run, **args)
    with pytest.raises(InputError, match=r"has no training state to resume: start it without resume=True \(--resume\)$"):
        train("test-seg", stores, tmp_path / "none", resume=True, **options)
    with pytest.raises(InputError, match=r"start it again with overwrite=True \(--overwrite\), or choose another out= \(--out\)$"):
        from tilefuse.training import RunDir

        RunDir(tmp_path / "killed").start(resume=False, overwrite=False)  # a run killed before its first checkpoint
        train("test-seg", stores, tmp_path / "killed", resume=True, **options)
    # without resume the same folder says so at once, instead of sending the user to --resume first
    with pytest.raises(InputError, match=r"a run stopped before its first checkpoint \(nothing to resume\): start it again with overwrite=True"):
        train("test-seg", stores, tmp_path / "killed", **options)
    (tmp_path / "plain").mkdir()  # a folder tilefuse did not make is no stopped run: the general message
    with pytest.raises(InputError, match=r"plain already exists: pass resume=True"):
        train("test-seg", stores, tmp_path / "plain", **options)
    run2 = train("test-seg", stores, tmp_path / "killed", overwrite=True, **options)
    assert RunDir(run2).has_state()


@pytest.mark.parametrize("modalities", [["optical", "optical"], ["optical", "sar", "optical"], ["optical", 3], [None]])
def test_a_modality_list_naming_one_twice_or_not_a_name_is_refused(stores, tmp_path, modalities):  # noqa: F811
    """['optical', 'optical'] trained on optical alone without a word (the list became a dict); a number was a
    KeyError-like 'has no modality 3' at best."""
    with pytest.raises(InputError, match=r"^modalities= \(--modality\) must name each store modality once"):
        train("test-seg", stores, tmp_path / "run", steps=1, modalities=modalities, **FAST)
    assert not (tmp_path / "run").exists()


def test_a_resume_on_a_store_of_another_size_is_refused_not_split_afresh(stores, tmp_path):  # noqa: F811
    """A store re-ingested at another size between a kill and the resume no longer fits the run's split: the
    resume split the stores afresh without a word, so blocks the run had validated on could be trained on."""
    from test_sampling import labelled_scene, write

    options = dict(steps=1, checkpoint_every=1, **FAST)
    run = train("test-seg", stores, tmp_path / "run", **options)
    split = (run / "split.json").read_bytes()
    write(labelled_scene(160, 128, seed=0), tmp_path / "bigger.zarr")
    (tmp_path / "bigger.zarr").rename(tmp_path / "swap.zarr")
    stores[0].rename(tmp_path / "old.zarr")
    (tmp_path / "swap.zarr").rename(stores[0])
    with pytest.raises(InputError, match=r"a\.zarr is 160 x 128 px, no longer the size the run split into \d+ x \d+ blocks of \d+ px: .*start a new run$"):
        train("test-seg", stores, run, resume=True, **options)
    assert (run / "split.json").read_bytes() == split


def test_stores_smaller_than_a_sample_still_split_and_validate(tmp_path):
    """Pixel models take stores smaller than their neighbourhood (reflect-padded): no block fits a sample, so the
    split weighs the blocks as they come rather than refusing every store as 'nothing to train on'."""
    from test_sampling import labelled_scene, write

    from tilefuse.training_data import DataOptions, assemble

    stores = [write(labelled_scene(4, 4, seed=s, invalid_disk=False), tmp_path / f"t{s}.zarr", chunk=4) for s in range(2)]
    data = assemble("test-pixel", stores, data=DataOptions(pixels_per_class=1, allow_fewer=True), seed=0)
    assert next(iter(data.val.sampler.iter_stream()), None) is not None


def test_test_fraction_with_validation_stores_holds_out_test_blocks_of_the_training_stores(stores, tmp_path):  # noqa: F811
    """val_stores= replaced the split, and test_fraction=0.3 was dropped without a word: the blocks the user meant to
    hold out for testing were trained on (evaluate --split then found no test block)."""
    import numpy as np

    from tilefuse.training_data import DataOptions, assemble

    data = assemble("test-seg", stores[:1], val_stores=stores[1:], data=DataOptions(patch_size=32, test_fraction=0.3), seed=1)
    train_store, val_store = data.split.assignment
    assert (train_store == 2).any() and (train_store == 0).any() and not (train_store == 1).any()
    assert (val_store == 1).all()
    assert next(iter(data.val.sampler.iter_stream()), None) is not None
    plain = assemble("test-seg", stores[:1], val_stores=stores[1:], data=DataOptions(patch_size=32), seed=1)
    assert not any((a == 2).any() for a in plain.split.assignment) and np.all(plain.split.assignment[1] == 1)


def test_stores_with_different_modalities_name_the_ones_they_share(stores, tmp_path):  # noqa: F811
    """The first store's modalities were the default: a second store without one of them was refused with 'ingest it
    with --modality NAME=PATH or use a model for these modalities', not the modalities= that trains on both."""
    import numpy as np
    from test_sampling import labelled_scene, write

    ds = labelled_scene(96, 96, seed=4)
    ds["dem"] = (("dem_band", "y", "x"), np.ones((1, 96, 96), np.float32))
    extra = write(ds, tmp_path / "extra.zarr")
    with pytest.raises(InputError, match=r"b\.zarr has no modality 'dem' .*: pass modalities= \(--modality\) .* every store has \(optical, sar\)"):
        train("test-seg", [extra, stores[1]], tmp_path / "run", steps=1, **FAST)
    run = train("test-seg", [extra, stores[1]], tmp_path / "run", steps=1, modalities=["optical", "sar"], **FAST)
    assert list(read_config(run).modalities) == ["optical", "sar"]


def test_a_resume_naming_the_default_modality_order_is_the_run_it_continues(tmp_path):
    """A run given no modalities, resumed with them spelled out in the order it took by default, was refused:
    "modalities= (--modality) ['optical', 'sar'] differs from the run's None". Another order still is."""
    import tilefuse
    from tilefuse.errors import InputError
    from tilefuse.scene import modalities, open_scene

    store = tilefuse.synth(tmp_path / "s.zarr", 64)
    options = dict(steps=2, batch_size=2, patch_size=32, hparams={"preset": "micro"}, workers=0, val_fraction=0.0, checkpoint_every=1, progress=False)
    run = tilefuse.train("pad", store, tmp_path / "run", **options)
    names = modalities(open_scene(store))
    with pytest.raises(InputError, match="differs from the run's"):
        tilefuse.train("pad", store, run, modalities=names[::-1], resume=True, **options)
    tilefuse.train("pad", store, run, modalities=names, resume=True, **options)


def test_a_split_by_whole_stores_says_what_share_each_subset_got(tmp_path, capsys):
    """`--split stores` over stores of unequal size held 88 % of the labelled pixels out (one draw trained on a
    store of 12 %) without a word. The shares it drew are said, against those asked."""
    import re

    import tilefuse

    stores = [tilefuse.synth(tmp_path / f"s{k}.zarr", size, seed=k) for k, size in enumerate((96, 48, 48, 32))]
    capsys.readouterr()
    tilefuse.train("pad", stores, tmp_path / "run", steps=1, batch_size=2, patch_size=32, hparams={"preset": "micro"}, workers=0,
                   split="stores", val_fraction=0.1, test_fraction=0.1, progress=True)  # fmt: skip
    notes = [line for line in capsys.readouterr().err.splitlines() if "split by whole stores" in line]
    assert len(notes) == 1, notes
    shares = [int(v) for v in re.findall(r"(?:train|val|test) (\d+)%", notes[0])]
    assert len(shares) == 3 and 98 <= sum(shares) <= 102 and "asked 80%" in notes[0], notes


def test_a_validation_share_given_with_validation_stores_is_refused(stores, tmp_path, capsys):  # noqa: F811
    """val_fraction=0.3 with val_stores= was ignored without a word: the stores validated and nothing of the
    training stores was held out, though the user asked for 30 % of them."""
    from tilefuse.cli import main

    with pytest.raises(InputError, match=r"^val_fraction= \(--val-fraction\) 0.3 has no effect with val_stores= \(--val-store\)"):
        train("test-seg", stores[:1], tmp_path / "run", val_stores=stores[1:], val_fraction=0.3, steps=1, **FAST)
    assert not (tmp_path / "run").exists()
    args = ["train", "--model", "test-seg", "--store", str(stores[0]), "--val-store", str(stores[1]), "--out", str(tmp_path / "cli")]
    assert main([*args, "--val-fraction", "0.2", "--steps", "1", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has no effect with val_stores=" in err, err
    assert not (tmp_path / "cli").exists()
