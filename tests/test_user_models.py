"""Users' own models: a wrapped ``nn.Module`` registered by name, plug-ins, and what a wrong one is told in one line."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from tilefuse import tile_model
from tilefuse.checkpoint import ModelConfig, load_checkpoint, save_checkpoint
from tilefuse.errors import InputError
from tilefuse.models import PADModel
from tilefuse.tile_model import TileModelSpec, available_models, build_model, register_model, wrap_module

MODALITIES = {"optical": 3, "sar": 2}
CLASSES = 6


@pytest.fixture(autouse=True)
def registry(monkeypatch):
    """The registry as it was before the test (built-ins loaded), whatever the test registers or breaks."""
    available_models()
    saved, broken = dict(tile_model._REGISTRY), dict(tile_model._BROKEN)
    monkeypatch.setattr(tile_model, "_loaded", True)
    yield
    tile_model._REGISTRY.clear()
    tile_model._REGISTRY.update(saved)
    tile_model._BROKEN.clear()
    tile_model._BROKEN.update(broken)


class Net(nn.Module):
    """A 1x1 conv over the stacked inputs, cropped by ``margin``; ``shape`` bends its output the ways users' nets do."""

    def __init__(self, num_classes=CLASSES, margin=0, returns="logits"):
        super().__init__()
        self.body = nn.Conv2d(sum(MODALITIES.values()), num_classes, 1)
        self.margin, self.returns = margin, returns

    def forward(self, inputs):
        logits = self.body(torch.cat([inputs[name] for name in MODALITIES], dim=1))
        if self.returns == "tuple":
            return logits, logits
        if self.returns == "downsampled":
            return logits[..., ::2, ::2]
        m = self.margin
        return logits[..., m : logits.shape[-2] - m, m : logits.shape[-1] - m] if m else logits


def _inputs(size=8):
    g = torch.Generator().manual_seed(0)
    return {name: torch.randn(2, bands, size, size, generator=g) for name, bands in MODALITIES.items()}


def _one_line(error: pytest.ExceptionInfo) -> str:
    text = str(error.value)
    assert text and "\n" not in text
    return text


@pytest.mark.parametrize(
    "change, field, what",
    [
        ({"margin": 1.5}, "margin", "whole number >= 0"),
        ({"margin": -1}, "margin", "whole number >= 0"),
        ({"num_classes": 6.0}, "num_classes", "whole number >= 1"),
        ({"num_classes": 0}, "num_classes", "whole number >= 1"),
        ({"num_classes": "6"}, "num_classes", "whole number >= 1"),
        ({"num_classes": True}, "num_classes", "whole number >= 1"),
        ({"modalities": {"optical": "6"}}, "modalities['optical']", "whole number >= 1"),
        ({"modalities": {"optical": 0}}, "modalities['optical']", "whole number >= 1"),
        ({"modalities": {}}, "modalities", "at least one input modality"),
        ({"blend": "no"}, "blend", "True or False"),
        ({"batch_invariant": 1}, "batch_invariant", "True or False"),
    ],
)
def test_a_spec_of_the_wrong_types_is_one_input_error_naming_the_field(change, field, what):
    """margin=1.5, num_classes=6.0, band count "6" and blend="no" were accepted and broke later (or blended silently);
    num_classes=0 was a ValueError and "6" a TypeError."""
    settings = {"modalities": MODALITIES, "num_classes": CLASSES, **change}
    with pytest.raises(InputError) as error:
        wrap_module(Net(), **settings)
    text = _one_line(error)
    assert text.startswith(field) and what in text


def test_a_spec_takes_numpy_integers_as_ints_and_keeps_checking_roles():
    spec = TileModelSpec({"optical": np.int64(3)}, np.int32(CLASSES), margin=np.int64(2), roles={"optical": "optical"})
    assert spec.to_dict()["modalities"] == {"optical": 3} and type(spec.num_classes) is int and type(spec.margin) is int
    with pytest.raises(InputError, match="roles .* modality the model reads"):
        TileModelSpec({"optical": 3}, CLASSES, roles={"active": "sar"})


def test_a_builder_returning_a_plain_module_is_told_to_wrap_it():
    """It was a TypeError traceback."""
    register_model("mynet")(lambda modalities, num_classes: Net(num_classes))
    with pytest.raises(InputError) as error:
        build_model("mynet", MODALITIES, CLASSES)
    assert "tilefuse.wrap_module" in _one_line(error) and "'mynet'" in str(error.value)


def test_a_checkpoint_of_an_unregistered_user_model_says_how_to_register_it(tmp_path):
    """'unknown model 'mynet': choose one of pad, s2fin' pointed a checkpoint's user to the wrong fix."""

    def mynet(modalities, num_classes):
        return wrap_module(Net(num_classes), modalities, num_classes)

    register_model("mynet")(mynet)
    config = ModelConfig("mynet", MODALITIES, CLASSES, class_names=[f"c{i}" for i in range(CLASSES)])
    path = save_checkpoint(build_model("mynet", MODALITIES, CLASSES), config, tmp_path / "ckpt")
    del tile_model._REGISTRY["mynet"]  # a new session that did not import the user's module
    with pytest.raises(InputError) as error:
        load_checkpoint(path)
    text = _one_line(error)
    assert "unknown model 'mynet'" in text and "pad" in text and "s2fin" in text
    assert "tilefuse.register_model('mynet')" in text and "`tilefuse.models` entry point" in text


def test_a_taken_name_is_refused_whatever_the_import_order(monkeypatch):
    """Registering 'pad' replaced the built-in silently; registered before the registry loaded, the built-in (here: a
    plug-in) silently won later."""

    def pad(modalities, num_classes):
        return wrap_module(Net(num_classes), modalities, num_classes)

    with pytest.raises(InputError) as error:
        register_model("pad")(pad)
    assert "'pad'" in _one_line(error) and "tilefuse.models.pad" in str(error.value)
    assert available_models()["pad"].builder is PADModel

    def plugin_builder(modalities, num_classes):
        return wrap_module(Net(num_classes), modalities, num_classes)

    plugin = SimpleNamespace(name="plugnet", value="plugpkg.models", load=lambda: register_model("plugnet")(plugin_builder))
    monkeypatch.setattr(tile_model, "entry_points", lambda group: [plugin] if group == "tilefuse.models" else [])
    monkeypatch.setattr(tile_model, "_loaded", False)
    with pytest.raises(InputError) as error:
        register_model("plugnet")(pad)  # before anything loaded the registry
    assert "'plugnet'" in _one_line(error) and "plugin_builder" in str(error.value)
    assert available_models()["plugnet"].builder is plugin_builder


def test_a_notebook_cell_run_again_re_registers_its_model():
    def cell(margin):
        @register_model("mynet")
        def mynet(modalities, num_classes):
            return wrap_module(Net(num_classes, margin), modalities, num_classes, margin=margin)

        return mynet

    cell(0)
    second = cell(1)
    assert available_models()["mynet"].builder is second
    assert build_model("mynet", MODALITIES, CLASSES).spec.margin == 1


def test_a_broken_plug_in_breaks_only_its_own_model(monkeypatch):
    """One plug-in whose import raised broke every command, and the plug-ins after it vanished for good."""

    def good(modalities, num_classes):
        return wrap_module(Net(num_classes), modalities, num_classes)

    def boom():
        raise ImportError("No module named 'torchvisionx'")

    plugins = [
        SimpleNamespace(name="brokennet", value="brokenpkg.models:register", load=boom),
        SimpleNamespace(name="goodnet", value="goodpkg.models", load=lambda: register_model("goodnet")(good)),
    ]
    monkeypatch.setattr(tile_model, "entry_points", lambda group: plugins if group == "tilefuse.models" else [])
    monkeypatch.setattr(tile_model, "_loaded", False)
    with pytest.warns(UserWarning, match="brokennet"):
        models = available_models()
    assert {"pad", "s2fin", "goodnet"} <= set(models) and "brokennet" not in models
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once, not on every call
        assert build_model("goodnet", MODALITIES, CLASSES).spec.num_classes == CLASSES
        with pytest.raises(InputError) as error:
            build_model("brokennet", MODALITIES, CLASSES)
    text = _one_line(error)
    assert "'brokennet'" in text and "brokenpkg.models" in text and "ImportError" in text and "torchvisionx" in text


@pytest.mark.parametrize(
    "net, margin, found",
    [
        (Net(returns="tuple"), 0, "a tuple, not logits"),
        (Net(num_classes=4), 0, "(2, 4, 8, 8)"),
        (Net(num_classes=9), 0, "(2, 9, 8, 8)"),
        (Net(), 1, "(2, 6, 8, 8)"),  # declares a margin it does not crop
        (Net(returns="downsampled"), 0, "(2, 6, 4, 4)"),
    ],
)
def test_training_a_model_with_wrong_logits_is_one_line_naming_the_shapes(net, margin, found):
    """Each ended in a raw IndexError, ValueError or AttributeError inside the loss; predict said one line."""
    model = wrap_module(net, MODALITIES, CLASSES, margin=margin)
    target = torch.zeros(2, 8 - 2 * margin, 8 - 2 * margin, dtype=torch.long)
    with pytest.raises(InputError) as error:
        model.compute_loss(_inputs(), target)
    text = _one_line(error)
    assert text.startswith("the model returned") and found in text
    assert str((2, CLASSES, 8 - 2 * margin, 8 - 2 * margin)) in text and "8 x 8 px" in text


def test_a_right_model_trains():
    model = wrap_module(Net(margin=1), MODALITIES, CLASSES, margin=1)
    loss = model.compute_loss(_inputs(), torch.ones(2, 6, 6, dtype=torch.long))
    loss.backward()
    assert loss.item() > 0 and model.module.body.weight.grad is not None
