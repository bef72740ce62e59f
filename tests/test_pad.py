"""PAD: fusion block properties, masks in both shift modes, heads, loss, shapes, training, parameter count."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tilefuse.errors import InputError
from tilefuse.models.pad import (
    PRESETS,
    PADBlock,
    PADModel,
    PhaseSpectrumCorrection,
    amplitude_loss,
    decouple,
    high_pass_mask,
    pad_loss,
    recouple,
)
from tilefuse.tile_model import build_model

MODALITIES = {"optical": 3, "sar": 1}


def _inputs(batch=2, height=64, width=64, seed=0, modalities=MODALITIES):
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(batch, bands, height, width, generator=g) for name, bands in modalities.items()}


def _make_asf_psc_identity(block: PADBlock) -> None:
    """M' = M (mix conv zero) and P' = P (PSC gate saturated at 0)."""
    with torch.no_grad():
        block.asf.mix.weight.zero_()
        block.asf.mix.bias.zero_()
        block.psc.attention[-1].weight.zero_()
        block.psc.attention[-1].bias.fill_(-1e4)


# --- the fusion block -------------------------------------------------------------------------


@pytest.mark.parametrize("faithful", [True, False])
@pytest.mark.parametrize("size", [(16, 16), (15, 22), (9, 7)])
def test_decouple_then_recouple_reconstructs(faithful, size):
    x = torch.randn(2, 5, *size, dtype=torch.float32)
    amplitude, phase = decouple(x, faithful)
    assert amplitude.shape == (2, 5, size[0], size[1] // 2 + 1)
    assert torch.allclose(recouple(amplitude, phase, size, faithful), x, atol=1e-5)


@pytest.mark.parametrize("faithful", [True, False])
def test_block_with_identity_asf_psc_returns_scf_output_plus_residual(faithful):
    torch.manual_seed(0)
    block = PADBlock(8, faithful_shift=faithful)
    _make_asf_psc_identity(block)
    a, s = torch.randn(2, 8, 12, 10), torch.randn(2, 8, 12, 10)
    fused, residual = block.scf(a, s)
    out, (new_amplitude, amplitude) = block(a, s)
    assert torch.allclose(out, fused + residual, atol=1e-5)  # recoupled F, plus R (not F) again
    assert torch.equal(new_amplitude, amplitude)
    assert amplitude_loss([(new_amplitude, amplitude)]).item() == 0.0


def test_scf_gate_selects_modalities():
    block = PADBlock(4)
    with torch.no_grad():
        block.scf.gate.weight.zero_()
        block.scf.gate.bias.fill_(1e4)  # G = 1: only the optical input passes the gate
    a, s = torch.randn(1, 4, 6, 6), torch.randn(1, 4, 6, 6)
    fused, residual = block.scf(a, s)
    changed_sar, _ = block.scf(a, s + 5.0)
    # the SAR input then reaches F only through the residual R
    assert torch.allclose(fused - residual, changed_sar - block.scf.residual(torch.cat([a, s + 5.0], 1)), atol=1e-5)


def test_psc_scale_stays_between_one_and_two():
    torch.manual_seed(0)
    psc = PhaseSpectrumCorrection(16)
    phase = (torch.rand(3, 16, 9, 5) * 2 - 1) * torch.pi
    for weight_scale in (0.0, 1.0, 1e3):
        with torch.no_grad():
            for conv in (psc.attention[0], psc.attention[2]):
                conv.weight.normal_(std=weight_scale if weight_scale else 1e-8)
        scale = psc.scale(phase)
        assert scale.shape == (3, 1, 9, 5)
        assert scale.min() >= 1.0 and scale.max() <= 2.0
        assert torch.allclose(psc(phase), phase * scale)
    assert PhaseSpectrumCorrection(16).attention[0].out_channels == 2  # hidden = max(C // 8, 1)
    assert PhaseSpectrumCorrection(4).attention[0].out_channels == 1


def test_asf_radius_gets_gradient_and_starts_near_0_525():
    torch.manual_seed(0)
    block = PADBlock(8)
    assert abs(block.asf.radius.item() - torch.sigmoid(torch.tensor(0.1)).item()) < 1e-6
    out, _ = block(torch.randn(2, 8, 16, 16), torch.randn(2, 8, 16, 16))
    out.square().mean().backward()
    grad = block.asf.rho.grad
    assert grad is not None and torch.isfinite(grad) and grad.abs() > 0


def test_amplitude_loss_positive_by_default_zero_for_identity_asf():
    torch.manual_seed(0)
    model = PADModel(MODALITIES, 4).eval()
    x = _inputs(height=32, width=32)
    outputs = model.forward_train(x)
    assert len(outputs.amplitudes) == 4
    assert amplitude_loss(outputs.amplitudes) > 0
    for block in model.fusions:
        with torch.no_grad():
            block.asf.mix.weight.zero_()
            block.asf.mix.bias.zero_()
    assert amplitude_loss(model.forward_train(x).amplitudes).item() == 0.0


# --- masks: the reference quirk and the corrected radial mask ----------------------------------


def _native(mask: torch.Tensor, faithful: bool) -> torch.Tensor:
    """The mask in the unshifted rfft2 layout (row = vertical frequency, column = horizontal)."""
    return torch.fft.ifftshift(mask, dim=(-2, -1)) if faithful else mask


def test_faithful_and_corrected_masks_differ_where_expected():
    height, width = 32, 32
    radius = torch.tensor(0.5)
    faithful = _native(high_pass_mask(height, width, radius, faithful_shift=True), True)
    corrected = _native(high_pass_mask(height, width, radius, faithful_shift=False), False)
    assert faithful.shape == corrected.shape == (32, 17)
    # DC is "low" in both
    assert faithful[0, 0] < 0.01 and corrected[0, 0] < 0.01
    # vertical Nyquist (row H/2, no horizontal frequency) is "high" in both
    assert faithful[height // 2, 0] > 0.5 and corrected[height // 2, 0] > 0.5
    # horizontal Nyquist (column W/2, no vertical frequency): the reference's shift of the
    # half-spectrum axis puts it next to the centre, so it is masked as low; the corrected mask says high
    assert faithful[0, width // 2] < 0.5
    assert corrected[0, width // 2] > 0.5
    # the corrected mask grows with the true radial frequency
    fy, fx = torch.fft.fftfreq(height), torch.fft.rfftfreq(width)
    radial = torch.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2).flatten()
    order = radial.argsort()
    assert (corrected.flatten()[order].diff() >= -1e-7).all()
    assert not (faithful.flatten()[order].diff() >= -1e-7).all()


def test_faithful_mask_is_centred_as_in_the_reference():
    mask = high_pass_mask(20, 30, torch.tensor(0.3), faithful_shift=True)
    assert mask.shape == (20, 16)
    assert torch.nonzero(mask == mask.min()).tolist() == [[10, 8]]  # (H//2, (W//2+1)//2)


def test_tiny_spectra_do_not_give_nan():
    for faithful in (True, False):
        assert torch.isfinite(high_pass_mask(1, 1, torch.tensor(0.5), faithful_shift=faithful)).all()


def test_faithful_flag_changes_outputs_but_not_the_weights():
    torch.manual_seed(0)
    faithful = PADModel(MODALITIES, 3, faithful_shift=True).eval()
    corrected = PADModel(MODALITIES, 3, faithful_shift=False).eval()
    corrected.load_state_dict(faithful.state_dict())  # same parameters in both modes
    x = _inputs(height=64, width=64)
    with torch.no_grad():
        assert not torch.allclose(faithful(x), corrected(x), atol=1e-6)


# --- the model ------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["atto", "femto", "micro", "zepto"])
@pytest.mark.parametrize("size", [(64, 64), (70, 45), (33, 97)])
def test_shapes_small_presets_any_size(preset, size):
    modalities = {"s2": 4, "s1": 2}
    model = build_model("pad", modalities, 6, preset=preset).eval()
    with torch.no_grad():
        logits = model(_inputs(1, *size, modalities=modalities))
    assert logits.shape == (1, 6, *size)
    assert torch.isfinite(logits).all()
    assert model.spec.margin == 0 and model.spec.blend


@pytest.mark.parametrize("preset", ["pico", "nano", "tiny", "paper"])
def test_shapes_large_presets_on_meta_device(preset):
    with torch.device("meta"):
        model = build_model("pad", {"optical": 3, "sar": 1}, 7, preset=preset)
        logits = model({"optical": torch.empty(2, 3, 70, 45), "sar": torch.empty(2, 1, 70, 45)})
    assert logits.shape == (2, 7, 70, 45)


def test_paper_preset_has_about_441m_parameters():
    with torch.device("meta"):
        model = build_model("pad", {"optical": 3, "sar": 1}, 7, preset="paper")
    total = model.num_parameters()
    assert abs(total - 441e6) / 441e6 < 0.05
    # the parts as published: two backbones ~2x196 M, PAD blocks ~35 M, UPerNet ~12 M, aux ~0.9 M
    def millions(module):
        return sum(p.numel() for p in module.parameters()) / 1e6

    assert abs(millions(model.fusions) - 35) < 1
    assert abs(millions(model.decode_head) - 12) < 0.5
    assert abs(millions(model.aux_head) - 0.9) < 0.1


def test_training_outputs_and_loss_terms():
    torch.manual_seed(0)
    model = PADModel(MODALITIES, 5).eval()
    x = _inputs(height=40, width=36)
    target = torch.randint(0, 5, (2, 40, 36))
    target[:, :5] = 255
    outputs = model.forward_train(x)
    assert outputs.logits.shape == outputs.aux_logits.shape == (2, 5, 40, 36)
    with torch.no_grad():
        assert torch.allclose(outputs.logits, model(x), atol=1e-5)
    valid = target != 255

    def ce(logits):  # hand-written: mean over labelled pixels only
        log_p = logits.log_softmax(1).permute(0, 2, 3, 1)[valid]
        return -log_p.gather(1, target[valid][:, None]).mean()

    mse = sum(((m1 - m0) ** 2).mean() for m1, m0 in outputs.amplitudes)
    expected = ce(outputs.logits) + 0.4 * ce(outputs.aux_logits) + 0.1 * mse
    assert torch.allclose(pad_loss(outputs, target), expected, atol=1e-5)
    assert torch.allclose(model.compute_loss(x, target), expected, atol=1e-5)
    # all pixels ignored: a zero loss that still backpropagates
    empty = pad_loss(outputs._replace(amplitudes=[(m0, m0) for _, m0 in outputs.amplitudes]), torch.full_like(target, 255))
    assert empty.item() == 0.0 and empty.requires_grad


def test_a_few_training_steps_reduce_the_loss():
    torch.manual_seed(0)
    model = build_model("pad", MODALITIES, 3, drop_path=0.0).train()
    g = torch.Generator().manual_seed(1)
    blocks = torch.randint(0, 3, (2, 4, 4), generator=g)
    target = blocks.repeat_interleave(8, 1).repeat_interleave(8, 2)  # 8x8-pixel fields, as land cover is
    x = {
        "optical": F.one_hot(target, 3).permute(0, 3, 1, 2).float() + 0.3 * torch.randn(2, 3, 32, 32, generator=g),
        "sar": (target[:, None] == 2).float() + 0.3 * torch.randn(2, 1, 32, 32, generator=g),
    }
    optimiser = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        loss = model.compute_loss(x, target)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.8 * losses[0]


def test_bf16_autocast_keeps_spectra_in_float32():
    model = PADModel(MODALITIES, 3).eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = model.forward_train(_inputs(height=32, width=32))
    assert torch.isfinite(outputs.logits.float()).all()
    assert all(m1.dtype == m0.dtype == torch.float32 for m1, m0 in outputs.amplitudes)


def test_bad_configurations_and_inputs_raise_input_error():
    with pytest.raises(InputError, match="exactly two"):
        build_model("pad", {"optical": 3, "sar": 1, "dem": 1}, 3)
    with pytest.raises(InputError, match="preset"):
        build_model("pad", MODALITIES, 3, preset="gigantic")
    with pytest.raises(InputError, match="hyperparameter"):
        build_model("pad", MODALITIES, 3, widths=[1, 2])
    model = build_model("pad", MODALITIES, 3)
    with pytest.raises(InputError, match="shape"):
        model({"optical": torch.randn(2, 4, 32, 32), "sar": torch.randn(2, 1, 32, 32)})
    with pytest.raises(InputError, match="missing"):
        model({"optical": torch.randn(2, 3, 32, 32)})
    with pytest.raises(InputError, match="differ"):
        model({"optical": torch.randn(2, 3, 32, 32), "sar": torch.randn(2, 1, 32, 16)})
    with pytest.raises(InputError, match="batches of 2"):
        model.train().compute_loss(_inputs(batch=1, height=32, width=32), torch.zeros(1, 32, 32, dtype=torch.long))


def test_presets_table_is_consistent():
    assert set(PRESETS) == {"atto", "femto", "pico", "nano", "tiny", "paper", "micro", "zepto"}
    # our CPU presets are strictly smaller than the paper's smallest ConvNeXt-V2 (atto), in that order
    with torch.device("meta"):
        sizes = [build_model("pad", {"optical": 12, "sar": 2}, 9, preset=p).num_parameters() for p in ("zepto", "micro", "atto")]
    assert sizes == sorted(sizes) and len(set(sizes)) == 3 and sizes[0] < 1.5e6
    assert PRESETS["paper"].encoder == "large" and PRESETS["paper"].decoder_channels == 256
    assert PRESETS["paper"].aux_channels == 128 and PRESETS["paper"].drop_path == 0.4


def test_pretrained_encoders_load_into_both_branches(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = PADModel({"optical": 3, "sar": 2}, 3)
    source = {f"backbone.{k}": torch.randn_like(v) for k, v in _mm_names(model.optical_encoder.state_dict()).items()}
    save_file(source, str(tmp_path / "mm.safetensors"))
    reports = model.load_pretrained_encoders(tmp_path / "mm.safetensors")
    assert set(reports) == {"optical", "sar"}
    key = "stages.2.1.pwconv1.weight"
    expected = source["backbone.stages.2.1.pointwise_conv1.weight"]
    assert torch.equal(model.optical_encoder.state_dict()[key], expected)
    assert torch.equal(model.sar_encoder.state_dict()[key], expected)
    assert model.sar_encoder.downsample[0][0].weight.shape[1] == 2 and reports["sar"].stem_adapted
    assert F.mse_loss(model.optical_encoder.norms[3].weight, source["backbone.norm3.weight"]) == 0


def _mm_names(state):
    """Our encoder keys renamed to mmpretrain's (written out by hand from its naming)."""
    renamed = {}
    for key, value in state.items():
        new = (
            key.replace("downsample.", "downsample_layers.")
            .replace(".dwconv.", ".depthwise_conv.")
            .replace(".pwconv1.", ".pointwise_conv1.")
            .replace(".pwconv2.", ".pointwise_conv2.")
            .replace(".grn.weight", ".grn.gamma")
            .replace(".grn.bias", ".grn.beta")
        )
        if new.startswith("norms."):
            _, i, leaf = new.split(".")
            new = f"norm{i}.{leaf}"
        renamed[new] = value
    return renamed


@pytest.mark.parametrize("names", [("optical", "sar"), ("s2", "s1"), ("hsi", "lidar"), ("rgb", "x"), ("x", "dsm")])
def test_branches_follow_the_names_not_the_order(names):
    """Either dict order builds the same branches; the same weights give the same outputs."""
    optical, active = names
    forward_order = build_model("pad", {optical: 3, active: 1}, 3).eval()
    reverse_order = build_model("pad", {active: 1, optical: 3}, 3).eval()
    assert (forward_order.optical, forward_order.sar) == (reverse_order.optical, reverse_order.sar) == (optical, active)
    reverse_order.load_state_dict(forward_order.state_dict())
    g = torch.Generator().manual_seed(0)
    x = {optical: torch.randn(2, 3, 32, 32, generator=g), active: torch.randn(2, 1, 32, 32, generator=g)}
    with torch.no_grad():
        assert torch.equal(forward_order(x), reverse_order(x))
    with pytest.raises(InputError, match="roles="):
        build_model("pad", {"first": 3, "second": 1}, 3)


# --- the full-resolution head (ours, ``pixel_head``) -------------------------------------------


def _with_and_without_head(**hparams):
    torch.manual_seed(0)
    off = build_model("pad", MODALITIES, 4, preset="zepto", **hparams)
    torch.manual_seed(0)
    on = build_model("pad", MODALITIES, 4, preset="zepto", pixel_head=True, **hparams)
    return off, on


def test_pixel_head_off_is_the_paper_model_and_a_fresh_head_changes_nothing():
    off, on = _with_and_without_head()
    torch.manual_seed(0)
    default = build_model("pad", MODALITIES, 4, preset="zepto")
    assert off.pixel_head is None and set(off.state_dict()) == set(default.state_dict())
    extra = set(on.state_dict()) - set(off.state_dict())
    assert extra and all(k.startswith("pixel_head.") for k in extra)
    assert all(torch.equal(v, on.state_dict()[k]) for k, v in off.state_dict().items())  # the head is built last
    x = _inputs(height=45, width=70)
    with torch.no_grad():
        off.eval(), on.eval()
        # off: the UPerNet logits of the padded (64, 96) input, upsampled bilinearly and cropped
        expected = F.interpolate(off.decode_head(off._fused_features(x)[0]), size=(64, 96), mode="bilinear")[..., :45, :70]
        assert torch.equal(off(x), expected)
        assert torch.equal(on(x), off(x))  # the head's classifier starts at zero
        on.pixel_head.classifier.weight.normal_()
        assert not torch.allclose(on(x), off(x))


@pytest.mark.parametrize("size", [(64, 64), (70, 45), (33, 97)])
def test_pixel_head_output_at_input_size(size):
    modalities = {"s2": 4, "s1": 2}
    model = build_model("pad", modalities, 6, preset="zepto", pixel_head=True, pixel_head_channels=8).train()
    with torch.no_grad():
        model.pixel_head.classifier.weight.normal_()
        outputs = model.forward_train(_inputs(2, *size, modalities=modalities))
        logits = model.eval()(_inputs(1, *size, modalities=modalities))
    assert outputs.logits.shape == outputs.aux_logits.shape == (2, 6, *size)
    assert logits.shape == (1, 6, *size) and torch.isfinite(logits).all()
    assert model.spec.margin == 0 and model.spec.blend


def test_pixel_head_is_a_1x1_conv_over_the_upsampled_decoder_map_and_the_bands():
    """Its first conv runs on the decoder map before upsampling: the same function as on the concatenation."""
    torch.manual_seed(0)
    model = build_model("pad", MODALITIES, 4, preset="zepto", pixel_head=True).eval()
    head = model.pixel_head
    with torch.no_grad():
        head.classifier.weight.normal_()
        for norm in (head.norm, head.hidden[1]):
            norm.running_mean.normal_(), norm.running_var.uniform_(0.5, 2)
        features, bands = torch.randn(2, 32, 9, 11), [torch.randn(2, 3, 36, 44), torch.randn(2, 1, 36, 44)]
        both = torch.cat([F.interpolate(features, size=(36, 44), mode="bilinear"), *bands], dim=1)
        expected = head.classifier(head.hidden(F.relu(head.norm(F.conv2d(both, head.project.weight)))))
        torch.testing.assert_close(head(features, bands), expected, atol=1e-5, rtol=1e-5)


def test_pixel_head_learns_a_pixel_level_pattern_the_stride_4_decoder_cannot():
    """Labels that flip pixel by pixel with the optical band's sign: the head gets gradients and fits them."""
    g = torch.Generator().manual_seed(1)
    x = _inputs(height=32, width=32, seed=2)
    target = (x["optical"][:, 0] > 0).long()
    losses = {}
    for name, model in zip(("off", "on"), _with_and_without_head(drop_path=0.0)):
        model.train()
        optimiser = torch.optim.AdamW(model.parameters(), lr=3e-3)
        for step in range(30):
            loss = model.compute_loss(x, target)
            optimiser.zero_grad()
            loss.backward()
            if name == "on" and step == 1:  # past the zero-initialised classifier, every head weight learns
                assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.pixel_head.parameters())
            optimiser.step()
        with torch.no_grad():  # in training mode: batch statistics, as the loss saw them
            losses[name] = F.cross_entropy(model.forward_train(x).logits, target).item()
    assert losses["on"] < 0.7 * losses["off"], losses


def test_pixel_head_checkpoint_round_trip_and_bad_settings(tmp_path):
    from tilefuse.checkpoint import ModelConfig, load_checkpoint, save_checkpoint

    hparams = {"preset": "zepto", "pixel_head": True, "pixel_head_channels": 8}
    torch.manual_seed(0)
    model = build_model("pad", MODALITIES, 4, **hparams).train()
    x = _inputs(3, 40, 36)
    with torch.no_grad():
        model.pixel_head.classifier.weight.normal_()
        model(x)  # moves the BatchNorm statistics, so buffers must round-trip too
    path = save_checkpoint(model.eval(), ModelConfig("pad", dict(MODALITIES), 4, hparams), tmp_path / "ckpt")
    loaded, config = load_checkpoint(path)
    assert config.hparams == hparams and loaded.pixel_head.classifier.weight.shape == (4, 8, 1, 1)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    for bad in (0, 2.5, True):
        with pytest.raises(InputError, match="pixel_head_channels"):
            build_model("pad", MODALITIES, 4, preset="zepto", pixel_head=True, pixel_head_channels=bad)


def test_pixel_head_runs_in_the_engine_blended(tmp_path):
    import numpy as np
    from predict_fixtures import CLASSES, MODALITIES as SCENE_MODALITIES, write_test_scene

    import tilefuse
    from tilefuse.checkpoint import ModelConfig, save_checkpoint
    from tilefuse.scene import open_scene

    hparams = {"preset": "zepto", "pixel_head": True}
    torch.manual_seed(0)
    model = build_model("pad", SCENE_MODALITIES, len(CLASSES), **hparams)
    with torch.no_grad():
        model.pixel_head.classifier.weight.normal_()
    config = ModelConfig("pad", dict(SCENE_MODALITIES), len(CLASSES), hparams, CLASSES)
    checkpoint = save_checkpoint(model.eval(), config, tmp_path / "pad")
    scene = write_test_scene(tmp_path / "small.zarr", 40, 50, seed=2, nodata=(slice(0, 8), slice(0, 50)))
    settings = dict(tile=32, overlap=8, block_size=32, batch_size=2, progress=False)
    pred = tilefuse.predict(checkpoint, scene, tmp_path / "a.zarr", **settings)
    again = tilefuse.predict(checkpoint, scene, tmp_path / "b.zarr", **settings)
    valid = open_scene(scene)["valid"].values
    labels = pred["labels"].values
    assert pred.attrs["blend"] == "gaussian" and pred.attrs["margin"] == 0
    assert np.all(labels[~valid] == 255) and np.all(labels[valid] < len(CLASSES))
    assert np.array_equal(labels, again["labels"].values)  # the engine's bitwise determinism holds


def test_test_time_augmentation_is_the_mean_over_the_8_flips_and_off_in_training():
    """tta=True: eval logits are the mean of the plain model's logits over the 8 flips/rotations, each turned back
    (so a flipped tile gives the flipped logits); training and the default see the plain forward."""
    from tilefuse.models.layers import dihedral, undo_dihedral

    torch.manual_seed(0)
    model = build_model("pad", MODALITIES, 4, preset="zepto", pixel_head=True, tta=True).eval()
    plain = build_model("pad", MODALITIES, 4, preset="zepto", pixel_head=True).eval()
    plain.load_state_dict(model.state_dict())
    tile = _inputs(1, 40, 56, seed=3)  # not square, not a multiple of the stride
    with torch.no_grad():
        mean = model(tile)
        by_hand = sum(undo_dihedral(plain({n: dihedral(x, k) for n, x in tile.items()}), k) for k in range(8)) / 8
        assert mean.shape == (1, 4, 40, 56) and torch.allclose(mean, by_hand, atol=1e-5)
        assert not torch.allclose(mean, plain(tile), atol=1e-4)  # it does change the logits
        turned = model({n: dihedral(x, 5) for n, x in tile.items()})
        assert torch.allclose(turned, dihedral(mean, 5), atol=1e-4)
    model.train(), plain.train()
    batch, target = _inputs(2, 40, 56, seed=4), torch.zeros(2, 40, 56, dtype=torch.long)
    torch.manual_seed(1)
    trained = model.compute_loss(batch, target)
    torch.manual_seed(1)
    assert torch.equal(trained, plain.compute_loss(batch, target))


def test_pixel_head_linear_adds_a_logistic_regression_on_the_bands():
    """``pixel_head_linear``: the head's output plus a 1x1 conv (with bias) from the concatenated bands."""
    torch.manual_seed(0)
    model = build_model("pad", MODALITIES, 4, preset="zepto", pixel_head=True, pixel_head_linear=True).eval()
    head = model.pixel_head
    assert isinstance(head.linear, torch.nn.Conv2d) and head.linear.weight.shape == (4, 4, 1, 1)
    assert {k for k in model.state_dict() if k.startswith("pixel_head.linear.")} == {"pixel_head.linear.weight", "pixel_head.linear.bias"}
    with torch.no_grad():
        head.classifier.weight.normal_()
        features, bands = torch.randn(2, 32, 9, 11), [torch.randn(2, 3, 36, 44), torch.randn(2, 1, 36, 44)]
        linear = head.linear
        head.linear = None
        without = head(features, bands)
        head.linear = linear
        expected = without + F.conv2d(torch.cat(bands, dim=1), linear.weight, linear.bias)
        torch.testing.assert_close(head(features, bands), expected)
        # a pixel far outside the training range moves the logits linearly along the bands
        x = _inputs(height=32, width=32)
        base = model(x)
        shifted = {k: v.clone() for k, v in x.items()}
        shifted["optical"][:, 0] += 100.0
        assert not torch.allclose(model(shifted), base)
    off = build_model("pad", MODALITIES, 4, preset="zepto", pixel_head=True)
    assert off.pixel_head.linear is None and not any(".linear." in k for k in off.state_dict())


@pytest.mark.parametrize(
    "hparams",
    [{"pixel_head_linear": True}, {"pixel_head": "false"}, {"pixel_head": True, "pixel_head_linear": "yes"}, {"tta": "no"}, {"faithful_shift": 0}],
)
def test_yes_no_hyperparameters_take_only_true_or_false(hparams):
    """``bool("false")`` is true: a string or number for a flag is refused, and the linear term needs the head."""
    with pytest.raises(InputError, match="pixel_head|true or false"):
        build_model("pad", MODALITIES, 4, preset="zepto", **hparams)
