"""Model roles by name (never by position or JSON key order), class lists that agree, malformed configs.

Properties, not examples: PAD and S²Fin give the same roles to a pair of modalities
whatever order they come in; a checkpoint reloads to identical outputs whatever
order its config.json lists its keys in; stores whose label ids are subsets of one
another train together and their predictions evaluate; only a real naming conflict
is refused; every malformed config.json is one line and exit 2 through the CLI.
"""

from __future__ import annotations

import itertools
import json
import random

import numpy as np
import pytest
import rioxarray  # noqa: F401
import torch
import xarray as xr

from tilefuse.checkpoint import CONFIG, ModelConfig, load_checkpoint, read_config, save_checkpoint
from tilefuse.classes import default_class_name, merge_class_names
from tilefuse.cli import main
from tilefuse.errors import InputError
from tilefuse.models.layers import ACTIVE, OPTICAL, ROLE_WORDS, assign_roles
from tilefuse.scene import write_scene
from tilefuse.tile_model import build_model

SMALL = {"pad": {"preset": "atto"}, "s2fin": {"patch_size": 5, "dim": 16, "spectral_tokens": 8, "heads": 2, "topk": 4}}
BANDS = {"opt": 3, "act": 2}


# ---------------------------------------------------------------- roles


def _pairs():
    """Every (optical-like name, active-like name) pair of the rule's words, plus decorated forms."""
    optical = sorted(ROLE_WORDS[OPTICAL]) + ["S2_L2A", "optical-2020"]
    active = sorted(ROLE_WORDS[ACTIVE]) + ["s1_grd", "LIDAR_dsm"]
    return [(o, a) for o, a in itertools.product(optical, active)]


@pytest.mark.parametrize("model", ["pad", "s2fin"])
def test_roles_follow_names_whatever_the_order(model):
    for optical, active in _pairs():
        for names in ((optical, active), (active, optical)):
            modalities = {names[0]: 3, names[1]: 2}
            assert assign_roles(modalities, None, model) == {OPTICAL: optical, ACTIVE: active}
    for known, role in (("sar", ACTIVE), ("hsi", OPTICAL)):  # one recognised name: the other takes the other role
        for modalities in ({known: 1, "x9": 4}, {"x9": 4, known: 1}):
            other = OPTICAL if role == ACTIVE else ACTIVE
            assert assign_roles(modalities, None, model) == {role: known, other: "x9"}


@pytest.mark.parametrize(
    "modalities, roles, match",
    [
        ({"a": 3, "b": 1}, None, "cannot tell"),
        ({"rgb": 3, "s2": 4}, None, "both look optical"),
        ({"sar": 1, "dem": 1}, None, "both look active"),
        ({"a": 3, "b": 1}, {"optical": "a"}, "exactly the roles"),
        ({"a": 3, "b": 1}, {"optical": "a", "active": "a"}, "one role"),
        ({"a": 3, "b": 1}, {"optical": "a", "active": "c"}, "one role"),
        ({"a": 3, "b": 1}, {"a": "optical", "b": "active"}, "exactly the roles"),
        ({"a": 3, "b": 1}, "a", "map each role"),
        ({"a": 3}, None, "exactly two"),
    ],
)
def test_undecidable_or_bad_roles_ask_for_the_mapping(modalities, roles, match):
    with pytest.raises(InputError, match=match) as error:
        assign_roles(modalities, roles, "pad")
    assert "\n" not in str(error.value)
    if roles is None and len(modalities) == 2:
        assert "roles=" in str(error.value)


@pytest.mark.parametrize("model", ["pad", "s2fin"])
def test_explicit_roles_win_in_any_order(model):
    roles = {"optical": "opt", "active": "act"}
    for order in (["opt", "act"], ["act", "opt"]):
        net = build_model(model, {n: BANDS[n] for n in order}, 3, roles=roles, **SMALL[model])
        assert net.spec.roles == roles and list(net.spec.modalities) == order


def _inputs(model: str, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    size = 36 if model == "pad" else 12
    return {n: torch.randn(2, b, size, size, generator=g) for n, b in BANDS.items()}


def _shuffled(data, rng: random.Random):
    """The same JSON value with the keys of every object in a random order."""
    if isinstance(data, dict):
        keys = list(data)
        rng.shuffle(keys)
        return {k: _shuffled(data[k], rng) for k in keys}
    if isinstance(data, list):
        return [_shuffled(v, rng) for v in data]
    return data


@pytest.mark.parametrize("model", ["pad", "s2fin"])
@pytest.mark.parametrize("order", [["opt", "act"], ["act", "opt"]], ids=["optical-first", "active-first"])
def test_config_key_order_never_changes_the_loaded_model(tmp_path, model, order):
    torch.manual_seed(0)
    roles = {"optical": "opt", "active": "act"}
    net = build_model(model, {n: BANDS[n] for n in order}, 3, roles=roles, **SMALL[model]).eval()
    config = ModelConfig(model, dict(net.spec.modalities), 3, dict(SMALL[model]), ["a", "b", "c"])  # roles left to save
    path = save_checkpoint(net, config, tmp_path / "ckpt")
    x = _inputs(model)
    with torch.no_grad():
        expected = net(x)
    stored = json.loads((path / CONFIG).read_text())
    assert stored["roles"] == roles and stored["modality_order"] == order
    rng = random.Random(1)
    for _ in range(4):
        (path / CONFIG).write_text(json.dumps(_shuffled(stored, rng)))
        loaded, loaded_config = load_checkpoint(path)
        assert list(loaded_config.modalities) == order and loaded.spec.roles == roles
        with torch.no_grad():
            assert torch.equal(loaded(x), expected)


@pytest.mark.parametrize("model", ["pad", "s2fin"])
def test_checkpoints_without_roles_load_by_the_old_positional_rule(tmp_path, model):
    """Before roles were recorded, configs were written with sorted keys and roles taken by position."""
    torch.manual_seed(0)
    names = {"b_second": 2, "a_first": 3}  # no name the rule knows: only the old rule can load it
    net = build_model(model, names, 3, roles=sorted(names), **SMALL[model]).eval()
    path = save_checkpoint(net, ModelConfig(model, names, 3, dict(SMALL[model])), tmp_path / "old")
    stored = json.loads((path / CONFIG).read_text())
    stored.pop("config_sha256", None)  # edited below by hand: as a config saved before its checksum was recorded
    del stored["roles"], stored["modality_order"]
    (path / CONFIG).write_text(json.dumps(stored, sort_keys=True))
    loaded, _ = load_checkpoint(path)
    assert loaded.spec.roles == {OPTICAL: "a_first", ACTIVE: "b_second"}
    g = torch.Generator().manual_seed(2)
    size = 32 if model == "pad" else 9
    x = {n: torch.randn(2, b, size, size, generator=g) for n, b in names.items()}
    with torch.no_grad():
        assert torch.equal(loaded(x), net(x))


# ---------------------------------------------------------------- class lists


def test_default_names_agree_with_anything_and_the_merge_covers_every_id():
    rng = random.Random(0)
    real = ["water", "trees", "crops", "built", "bare", "snow"]
    for _ in range(200):
        lists = []
        for store in range(rng.randint(1, 4)):
            n = rng.randint(0, len(real))
            lists.append((f"s{store}", [real[k] if rng.random() < 0.5 else default_class_name(k) for k in range(n)]))
        merged = merge_class_names(lists)
        assert len(merged) == max(len(names) for _, names in lists)
        for k, name in enumerate(merged):
            given = {names[k] for _, names in lists if k < len(names)} - {default_class_name(k)}
            assert name == (real[k] if given else default_class_name(k))


def test_a_real_conflict_is_refused_naming_the_id_and_the_stores():
    with pytest.raises(InputError) as error:
        merge_class_names([("A.zarr", ["water", "class_1", "crops"]), ("B.zarr", ["class_0", "trees"]), ("C.zarr", ["water", "forest"])])
    message = str(error.value)
    assert "class 1" in message and "'trees'" in message and "'forest'" in message and "B.zarr" in message and "C.zarr" in message
    assert "\n" not in message
    assert merge_class_names([("A", ["water"]), ("B", ["class_0", "trees"])]) == ["water", "trees"]


def _write_store(path, ids, *, order=("optical", "sar"), names=None, size=64, seed=0):
    """A tiny two-modality scene whose labels use exactly the label ids ``ids`` (in stripes), optionally named."""
    rng = np.random.default_rng(seed)
    label = np.asarray(ids, np.uint8)[(np.arange(size)[:, None] * len(ids)) // size].repeat(size, axis=1)
    data = {
        "optical": (3, (rng.normal(size=(3, size, size)) + label[None] * 0.5).astype("float32")),
        "sar": (2, rng.normal(size=(2, size, size)).astype("float32")),
    }
    variables = {name: ((f"{name}_band", "y", "x"), data[name][1]) for name in order}
    ds = xr.Dataset(
        {**variables, "valid": (("y", "x"), np.ones((size, size), bool)), "label": (("y", "x"), label, {"class_names": list(names)} if names else {})},
        coords={"x": 500_000 + 10.0 * np.arange(size) + 5, "y": 4_000_000 - 10.0 * np.arange(size) - 5},
    ).rio.write_crs("EPSG:32632")
    return write_scene(ds, path, chunk=32, shard=None)


def _train(model, stores, out, **extra):
    from tilefuse.pipelines.train import train

    options = dict(steps=2, batch_size=2 if model == "pad" else 4, workers=0, progress=False, val_fraction=0.0)
    options.update(patch_size=32) if model == "pad" else options.update(pixels_per_class=2, allow_fewer=True)
    return train(model, [str(s) for s in stores], out, hparams=dict(SMALL[model]), **options, **extra)


def _predict(run, store, out):
    from tilefuse.pipelines.predict import predict

    return predict(run, store, out, tile=32, cluster="sync", progress=False)


ID_SETS = [[0, 1, 2], [0, 3], [1, 2, 3, 4]]


def test_stores_with_id_subsets_train_predict_and_evaluate_together(tmp_path):
    from tilefuse.pipelines.evaluate import evaluate

    stores = [_write_store(tmp_path / f"s{i}.zarr", ids, seed=i) for i, ids in enumerate(ID_SETS)]
    run = _train("s2fin", stores, tmp_path / "run")
    config = read_config(run)
    assert config.num_classes == 5 and config.class_names == [default_class_name(k) for k in range(5)]
    for i, store in enumerate(stores):
        _predict(run, store, tmp_path / f"p{i}.zarr")
        metrics = evaluate(tmp_path / f"p{i}.zarr", store)
        assert metrics["overall_accuracy"] is not None


def test_real_names_that_agree_on_shared_ids_train_together_and_conflicts_are_refused(tmp_path):
    real = ["water", "trees", "crops", "built", "bare"]
    named = [
        _write_store(tmp_path / "a.zarr", ID_SETS[0], names=real[:3]),
        _write_store(tmp_path / "b.zarr", ID_SETS[1]),  # defaults only
        _write_store(tmp_path / "c.zarr", ID_SETS[2], names=["class_0", "trees", "crops", "built", "bare"]),
    ]
    run = _train("s2fin", named, tmp_path / "run")
    assert read_config(run).class_names == real
    clash = _write_store(tmp_path / "d.zarr", [0, 1], names=["water", "forest"])
    with pytest.raises(InputError, match=r"class 1 is 'trees' in .*a\.zarr but 'forest' in .*d\.zarr"):
        _train("s2fin", [named[0], clash], tmp_path / "run2")
    from tilefuse.pipelines.evaluate import evaluate

    _predict(run, named[1], tmp_path / "p.zarr")
    assert evaluate(tmp_path / "p.zarr", named[1])["overall_accuracy"] is not None  # defaults agree with the model's names
    with pytest.raises(InputError, match="class 1 is 'trees' in .*p\\.zarr but 'forest' in .*d\\.zarr"):
        evaluate(tmp_path / "p.zarr", clash)


# ---------------------------------------------------------------- ingest order -> train -> predict -> evaluate


@pytest.mark.parametrize("model", ["pad", "s2fin"])
@pytest.mark.parametrize("order", [("optical", "sar"), ("sar", "optical")], ids=["optical-first", "sar-first"])
def test_any_store_order_trains_predicts_evaluates_and_reloads(tmp_path, model, order):
    from tilefuse.pipelines.evaluate import evaluate

    store = _write_store(tmp_path / "s.zarr", [0, 1, 2], order=order)
    run = _train(model, [store], tmp_path / "run")
    config = read_config(run)
    assert config.roles == {"optical": "optical", "active": "sar"} and list(config.modalities) == list(order)
    first = _predict(run, store, tmp_path / "p1.zarr")["labels"].values
    assert evaluate(tmp_path / "p1.zarr", store)["overall_accuracy"] is not None
    stored = json.loads((run / CONFIG).read_text())
    (run / CONFIG).write_text(json.dumps(_shuffled(stored, random.Random(5))))
    again = _predict(run, store, tmp_path / "p2.zarr")["labels"].values
    assert np.array_equal(first, again)
    # and a store listing the modalities the other way round predicts the same
    other = _write_store(tmp_path / "o.zarr", [0, 1, 2], order=order[::-1])
    assert np.array_equal(_predict(run, other, tmp_path / "p3.zarr")["labels"].values, first)


# ---------------------------------------------------------------- malformed config.json


MALFORMED = {
    "modalities-string": ({"modalities": "x"}, "modalities"),
    "modalities-list": ({"modalities": [["optical", 3], ["sar", 2]]}, "modalities"),
    "bands-string": ({"modalities": {"optical": "3", "sar": 2}}, "modalities"),
    "classes-string": ({"num_classes": "7"}, "num_classes"),
    "classes-bool": ({"num_classes": True}, "num_classes"),
    "model-number": ({"model": 3}, "model"),
    "hparams-list": ({"hparams": ["preset", "atto"]}, "hparams"),
    "class-names-dict": ({"class_names": {"0": "water"}}, "class_names"),
    "band-stats-short": ({"band_stats": {"optical": {"mean": [0.0], "std": [1.0]}}}, "band_stats"),
    "roles-list-of-numbers": ({"roles": {"optical": 1}}, "roles"),
    "order-unknown": ({"modality_order": ["optical", "lidar"]}, "modality_order"),
    "missing-model": ({"model": None}, "model"),
    "missing-modalities": ({"modalities": None}, "modalities"),
    "not-an-object": (None, "JSON object"),
    "hparams-wrong-type": ({"hparams": {"preset": "atto", "decoder_channels": "wide"}}, "hparams"),
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    net = build_model("pad", {"optical": 3, "sar": 2}, 3, **SMALL["pad"])
    config = ModelConfig("pad", {"optical": 3, "sar": 2}, 3, dict(SMALL["pad"]), ["a", "b", "c"],
                         {"optical": {"mean": [0.0] * 3, "std": [1.0] * 3}})
    return save_checkpoint(net, config, tmp_path_factory.mktemp("ckpt") / "run")


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_config_is_one_line_and_exit_2(tmp_path, checkpoint, case, capsys):
    change, key = MALFORMED[case]
    stored = json.loads((checkpoint / CONFIG).read_text())
    stored.pop("config_sha256", None)  # edited below by hand: as a config saved before its checksum was recorded
    if change is None:
        stored = list(stored)
    else:
        for name, value in change.items():
            if value is None:
                del stored[name]
            else:
                stored[name] = value
    broken = tmp_path / "broken"
    broken.mkdir()
    for item in checkpoint.iterdir():
        (broken / item.name).write_bytes(item.read_bytes())
    (broken / CONFIG).write_text(json.dumps(stored))
    store = _write_store(tmp_path / "s.zarr", [0, 1])
    code = main(["predict", "--checkpoint", str(broken), "--store", str(store), "--out", str(tmp_path / "p.zarr"), "--cluster", "sync"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err
    assert key in err
    assert not (tmp_path / "p.zarr").exists()


def test_unknown_names_ask_for_roles_and_train_with_them_from_the_cli(tmp_path, capsys):
    rng = np.random.default_rng(0)
    size = 64
    label = (np.arange(size)[:, None] * 2 // size).astype(np.uint8).repeat(size, axis=1)
    ds = xr.Dataset(
        {
            "vv": (("vv_band", "y", "x"), rng.normal(size=(2, size, size)).astype("float32")),
            "bands": (("bands_band", "y", "x"), rng.normal(size=(3, size, size)).astype("float32")),
            "valid": (("y", "x"), np.ones((size, size), bool)),
            "label": (("y", "x"), label),
        },
        coords={"x": 10.0 * np.arange(size) + 5, "y": 1000.0 - 10.0 * np.arange(size)},
    ).rio.write_crs("EPSG:32632")
    store = write_scene(ds, tmp_path / "s.zarr", chunk=32, shard=None)
    base = ["train", "--model", "s2fin", "--store", str(store), "--steps", "2", "--batch-size", "4", "--pixels-per-class", "2",
            "--allow-fewer", "--workers", "0", "--val-fraction", "0", "--quiet", "--hparam", "patch_size=5", "--hparam", "dim=16"]
    assert main(base + ["--out", str(tmp_path / "r1")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "roles=" in err and "'vv'" in err and "'bands'" in err
    assert main(base + ["--out", str(tmp_path / "r2"), "--hparam", 'roles={"optical": "bands", "active": "vv"}']) == 0
    assert read_config(tmp_path / "r2").roles == {"optical": "bands", "active": "vv"}


def test_a_model_that_ignores_the_recorded_roles_is_refused(tmp_path):
    from tilefuse.tile_model import TileModel, TileModelSpec, register_model

    class FixedRoles(TileModel):
        def __init__(self, modalities, num_classes):
            super().__init__()
            names = list(modalities)
            self.spec = TileModelSpec(dict(modalities), num_classes, roles={OPTICAL: names[0], ACTIVE: names[1]})
            self.head = torch.nn.Conv2d(sum(modalities.values()), num_classes, 1)

    register_model("test-fixed-roles")(FixedRoles)
    net = build_model("test-fixed-roles", {"a": 1, "b": 1}, 2)
    path = save_checkpoint(net, ModelConfig("test-fixed-roles", {"a": 1, "b": 1}, 2), tmp_path / "ckpt")
    assert load_checkpoint(path)[0].spec.roles == {OPTICAL: "a", ACTIVE: "b"}
    stored = json.loads((path / CONFIG).read_text())
    stored.pop("config_sha256", None)  # edited below by hand: as a config saved before its checksum was recorded
    (path / CONFIG).write_text(json.dumps({**stored, "roles": {OPTICAL: "b", ACTIVE: "a"}}))
    with pytest.raises(InputError, match="weights were built with"):
        load_checkpoint(path)
