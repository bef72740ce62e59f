"""S²Fin (our interpretation): sanity properties of its modules, size, dense adapter, training."""

from __future__ import annotations

import pytest
import torch

from tilefuse.errors import InputError
from tilefuse.models.s2fin import AFCM, HFRM, HFSET, S2FinModel, spectral_high_pass, topk_attention
from tilefuse.tile_model import build_model

MODALITIES = {"optical": 12, "sar": 2}


def _tile(batch, size, modalities=MODALITIES, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(batch, bands, *size, generator=g) for name, bands in modalities.items()}


def test_tau_at_nyquist_gives_no_enhancement():
    torch.manual_seed(0)
    layer = HFSET(16, heads=4)
    tokens = torch.randn(3, 32, 16)
    gain = torch.rand(3, 16) + 0.5
    assert torch.equal(spectral_high_pass(tokens, torch.full((3,), 0.5)), torch.zeros_like(tokens))
    assert torch.equal(layer.enhance(tokens, torch.full((3,), 0.5), gain), tokens)
    # and a lower threshold does enhance, mostly the fast spectral oscillations
    enhanced = layer.enhance(tokens, torch.full((3,), 0.1), gain) - tokens
    assert enhanced.abs().max() > 0.1
    slow = torch.cos(2 * torch.pi * torch.arange(32) / 32)[None, :, None].expand(3, 32, 16)  # 1/32 cycles/token
    assert spectral_high_pass(slow, torch.full((3,), 0.25)).abs().max() < 0.05 * slow.abs().max()


def test_hfset_threshold_gets_gradient():
    torch.manual_seed(0)
    layer = HFSET(16, heads=2)
    out = layer(torch.randn(4, 32, 16), torch.randn(4, 18, 16))
    out.square().mean().backward()
    assert layer.controls.weight.grad is not None and layer.controls.weight.grad[0].abs().sum() > 0


def test_topk_attention_with_k1_picks_the_best_key():
    q = torch.randn(2, 1, 5, 4)
    k = torch.randn(2, 1, 7, 4)
    v = torch.randn(2, 1, 7, 3)
    best = (q @ k.transpose(-2, -1)).argmax(-1)
    expected = torch.gather(v, 2, best[..., None].expand(-1, -1, -1, 3))
    assert torch.allclose(topk_attention(q, k, v, topk=1), expected, atol=1e-6)


def test_hfrm_beta_zero_is_identity_and_identical_inputs_resonate_fully():
    torch.manual_seed(0)
    o, a = torch.randn(2, 8, 11, 11), torch.randn(2, 8, 11, 11)
    layer = HFRM(beta_init=0.0)
    o2, a2 = layer(o, a)
    assert torch.allclose(o2, o, atol=1e-5) and torch.allclose(a2, a, atol=1e-5)
    zo = torch.fft.rfft2(o)
    assert torch.allclose(HFRM.resonance(zo, zo), torch.ones(zo.shape), atol=1e-6)
    assert torch.allclose(HFRM.resonance(zo, -zo), torch.zeros(zo.shape), atol=1e-6)
    boosted, _ = HFRM(beta_init=0.5)(o, o)  # agreeing phases: high frequencies amplified, phases kept
    assert boosted.square().sum() > o.square().sum()
    ratio = torch.fft.rfft2(boosted) / torch.fft.rfft2(o)
    assert torch.allclose(ratio.imag, torch.zeros_like(ratio.imag), atol=1e-4)
    assert (ratio.real >= 1 - 1e-4).all()


def test_afcm_low_pass_keeps_flat_maps_and_removes_the_checkerboard():
    layer = AFCM(4)
    with torch.no_grad():
        layer.rho.fill_(-2.0)  # small radius
    flat = torch.full((1, 4, 11, 11), 3.0)
    assert torch.allclose(layer.low_pass(flat), flat, atol=1e-4)
    rows, cols = torch.meshgrid(torch.arange(12), torch.arange(12), indexing="ij")
    checker = ((rows + cols) % 2 * 2 - 1).float().expand(1, 4, 12, 12)
    assert layer.low_pass(checker).abs().max() < 1e-3


@pytest.mark.parametrize(
    "modalities", [{"optical": 12, "sar": 2}, {"hsi": 48, "lidar": 1}, {"hsi": 144, "lidar": 1}, {"msi": 4, "sar": 1}]
)
def test_parameter_count_about_0_6m(modalities):
    model = build_model("s2fin", modalities, 15)
    assert 0.5e6 <= model.num_parameters() <= 0.8e6


def test_spec_margin_and_no_blending():
    model = build_model("s2fin", MODALITIES, 4, patch_size=7)
    assert model.spec.margin == 3 and not model.spec.blend
    assert model.spec.modalities == MODALITIES


@pytest.mark.parametrize("spectrum", ["projected", "raw"])
def test_dense_tile_equals_patch_classifier_pixel_by_pixel(spectrum):
    torch.manual_seed(0)
    p = 11
    model = S2FinModel(MODALITIES, 5, patch_size=p, dim=32, spectral_tokens=16, max_patches_per_batch=5, spectrum=spectrum).eval()
    tile = _tile(2, (4 + p - 1, 3 + p - 1))  # 2 x 12 pixels in sub-batches of at most 5 patches
    with torch.no_grad():
        dense = model(tile)
        assert dense.shape == (2, 5, 4, 3)
        for y in range(4):
            for x in range(3):
                patch = {k: v[:, :, y : y + p, x : x + p] for k, v in tile.items()}
                single = model.classifier(patch["optical"], patch["sar"])
                assert torch.allclose(dense[:, :, y, x], single, atol=1e-5), (y, x)
                assert torch.allclose(model(patch)[:, :, 0, 0], single, atol=1e-5)  # P x P input -> 1x1 logits


def test_dense_sub_batches_stay_within_budget():
    model = S2FinModel(MODALITIES, 3, max_patches_per_batch=16).eval()
    sizes = []
    channels = []

    def seen(module, args, out):
        sizes.append(args[0].shape[0])
        channels.append(args[0].shape[1])

    model.classifier.optical_stem.register_forward_hook(seen)
    with torch.no_grad():
        out = model(_tile(2, (9 + 10, 13 + 10)))
    assert out.shape == (2, 3, 9, 13)
    assert max(sizes) <= 16 and sum(sizes) == 2 * 9 * 13
    with torch.no_grad():
        model(_tile(40, (11, 11)))  # P x P patches: the whole batch in one call (BatchNorm sees it in training)
    assert sizes[-1] == 40
    # the band projection runs on the tile before unfold: patches carry spectral_tokens channels
    assert set(channels) == {model.classifier.band_projection.out_channels}


def test_a_tiles_logits_do_not_depend_on_the_tiles_sharing_its_call():
    """Sub-batches never mix tiles bigger than the budget: each tile's logits are bitwise those of the tile alone,
    whatever the engine's batch size (its bitwise contract)."""
    torch.manual_seed(0)
    model = S2FinModel(MODALITIES, 4, dim=16, spectral_tokens=8, max_patches_per_batch=7).eval()
    assert model.spec.batch_invariant
    for size in [(6, 5), (2, 3)]:  # 30 patches per tile (sub-batches of 5), 6 (fewer than the budget)
        tile = _tile(3, (size[0] + 10, size[1] + 10), seed=3)
        with torch.inference_mode():
            together = model(tile)
            for i in range(3):
                assert torch.equal(model({k: v[i : i + 1] for k, v in tile.items()}), together[i : i + 1]), (size, i)


@pytest.mark.slow
def test_default_sub_batches_keep_every_tensor_below_the_allocators_mmap_ceiling():
    """With the default budget no tensor of a dense forward reaches 32 MiB (glibc's largest mmap threshold), so
    freed activations are reused from the heap instead of being unmapped and page-faulted back every sub-batch."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):
        nbytes = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor):
                    Largest.nbytes = max(Largest.nbytes, t.nelement() * t.element_size())
            return out

    model = S2FinModel({"hsi": 48, "lidar": 1}, 6).eval()
    tile = _tile(1, (34 + 10, 34 + 10), {"hsi": 48, "lidar": 1})  # 1156 patches: one sub-batch would need 36 MB
    with torch.inference_mode(), Largest():
        out = model(tile)
    assert out.shape == (1, 6, 34, 34)
    assert 0 < Largest.nbytes < 32 << 20


def test_raw_spectrum_tokens_follow_the_band_count():
    model = S2FinModel({"hsi": 48, "lidar": 1}, 3, dim=16, spectral_tokens=8, spectrum="raw").eval()
    assert model.classifier.token_position.shape[1] == 48
    with torch.no_grad():
        assert model(_tile(1, (12, 12), {"hsi": 48, "lidar": 1})).shape == (1, 3, 2, 2)
    with pytest.raises(InputError, match="spectrum="):
        S2FinModel(MODALITIES, 3, spectrum="pca")


def test_a_few_training_steps_reduce_the_loss():
    torch.manual_seed(0)
    model = build_model("s2fin", {"hsi": 20, "lidar": 1}, 3).train()
    g = torch.Generator().manual_seed(2)
    labels = torch.randint(0, 3, (32,), generator=g)
    signature = torch.randn(3, 20, generator=g)  # one spectrum per class
    hsi = signature[labels][:, :, None, None] + 0.5 * torch.randn(32, 20, 11, 11, generator=g)
    lidar = labels[:, None, None, None].float() + 0.5 * torch.randn(32, 1, 11, 11, generator=g)
    batch, target = {"hsi": hsi, "lidar": lidar}, labels[:, None, None]  # centre-pixel labels (B, 1, 1)
    optimiser = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        loss = model.compute_loss(batch, target)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_ignored_centre_pixels_do_not_count():
    model = build_model("s2fin", MODALITIES, 3).eval()
    batch = _tile(4, (11, 11))
    target = torch.tensor([0, 1, 255, 255])[:, None, None]
    with torch.no_grad():
        logits = model(batch)[:, :, 0, 0]
        expected = torch.nn.functional.cross_entropy(logits[:2], target[:2, 0, 0])
        assert torch.allclose(model.compute_loss(batch, target), expected, atol=1e-6)


def test_label_smoothing_loss_is_cross_entropy_on_smoothed_targets_over_labelled_centres():
    torch.manual_seed(0)
    eps, k = 0.2, 3
    model = build_model("s2fin", MODALITIES, k, label_smoothing=eps).eval()
    batch = _tile(4, (11, 11))
    target = torch.tensor([0, 2, 255, 1])[:, None, None]
    with torch.no_grad():
        logp = model(batch)[:, :, 0, 0].log_softmax(1)[[0, 1, 3]]
        smoothed = torch.full((3, k), eps / k) + (1 - eps) * torch.nn.functional.one_hot(torch.tensor([0, 2, 1]), k)
        assert torch.allclose(model.compute_loss(batch, target), -(smoothed * logp).sum(1).mean(), atol=1e-6)
        assert model.compute_loss(batch, torch.full_like(target, 255)) == 0


def test_dropout_acts_in_training_only_and_adds_no_weights():
    torch.manual_seed(0)
    plain = build_model("s2fin", MODALITIES, 3)
    dropped = build_model("s2fin", MODALITIES, 3, dropout=0.5)
    assert plain.state_dict().keys() == dropped.state_dict().keys()  # old checkpoints load
    dropped.load_state_dict(plain.state_dict())
    batch = _tile(2, (13, 12))
    with torch.no_grad():
        assert torch.equal(plain.eval()(batch), dropped.eval()(batch))
        dropped.train()
        assert not torch.equal(dropped(batch), dropped(batch))
    with pytest.raises(InputError, match="dropout="):
        build_model("s2fin", MODALITIES, 3, dropout=1.0)
    with pytest.raises(InputError, match="label_smoothing="):
        build_model("s2fin", MODALITIES, 3, label_smoothing=-0.1)


def test_test_time_augmentation_is_equivariant_dense_and_off_in_training():
    """tta=True: logits of a flipped/rotated tile are the flipped/rotated logits; dense equals per-patch; training
    sees the plain forward."""
    from tilefuse.models.layers import dihedral

    torch.manual_seed(0)
    p = 5
    model = S2FinModel(MODALITIES, 4, patch_size=p, dim=16, spectral_tokens=8, tta=True).eval()
    tile = _tile(1, (3 + p - 1, 4 + p - 1), seed=5)
    with torch.no_grad():
        dense = model(tile)
        for k in range(8):
            turned = model({n: dihedral(x, k) for n, x in tile.items()})
            assert torch.allclose(turned, dihedral(dense, k), atol=1e-5), k
        patch = {n: x[:, :, 1 : 1 + p, 2 : 2 + p] for n, x in tile.items()}
        assert torch.allclose(model(patch)[:, :, 0, 0], dense[:, :, 1, 2], atol=1e-5)
        plain = S2FinModel(MODALITIES, 4, patch_size=p, dim=16, spectral_tokens=8).eval()
        plain.load_state_dict(model.state_dict())
        assert not torch.allclose(plain(tile), dense, atol=1e-4)  # it does change the logits
        model.train(), plain.train()
        torch.manual_seed(1)
        trained = model(tile)
        torch.manual_seed(1)
        assert torch.equal(trained, plain(tile))


def test_bf16_autocast_forward_is_finite():
    model = build_model("s2fin", MODALITIES, 3).eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(_tile(1, (14, 12)))
    assert out.shape == (1, 3, 4, 2) and torch.isfinite(out.float()).all()


def test_bad_configurations_and_inputs_raise_input_error():
    with pytest.raises(InputError, match="odd"):
        build_model("s2fin", MODALITIES, 3, patch_size=10)
    with pytest.raises(InputError, match="exactly two"):
        build_model("s2fin", {"hsi": 10}, 3)
    with pytest.raises(InputError, match="hyperparameter"):
        build_model("s2fin", MODALITIES, 3, depth=4)
    model = build_model("s2fin", MODALITIES, 3)
    with pytest.raises(InputError, match="at least 11x11"):
        model(_tile(1, (10, 30)))
    with pytest.raises(InputError, match="shape"):
        model({"optical": torch.randn(1, 11, 11, 11), "sar": torch.randn(1, 2, 11, 11)})


@pytest.mark.parametrize("names", [("optical", "sar"), ("msi", "chm"), ("hsi", "lidar")])
def test_streams_follow_the_names_not_the_order(names):
    """Either dict order builds the same streams; the same weights give the same outputs."""
    optical, active = names
    small = dict(patch_size=5, dim=16, spectral_tokens=8, heads=2, topk=4)
    forward_order = build_model("s2fin", {optical: 6, active: 2}, 3, **small).eval()
    reverse_order = build_model("s2fin", {active: 2, optical: 6}, 3, **small).eval()
    assert forward_order.spec.roles == reverse_order.spec.roles == {"optical": optical, "active": active}
    reverse_order.load_state_dict(forward_order.state_dict())
    g = torch.Generator().manual_seed(0)
    x = {optical: torch.randn(2, 6, 9, 9, generator=g), active: torch.randn(2, 2, 9, 9, generator=g)}
    with torch.no_grad():
        assert torch.equal(forward_order(x), reverse_order(x))
    explicit = build_model("s2fin", {"a": 2, "b": 6}, 3, roles={"optical": "b", "active": "a"}, **small)
    assert (explicit.optical, explicit.active) == ("b", "a")


def test_engine_output_is_bitwise_the_same_whatever_the_batch_size(tmp_path):
    """batch_invariant: partial batches run unpadded, and every batch size gives the same bytes."""
    import numpy as np
    from predict_fixtures import CLASSES, MODALITIES as SCENE_MODALITIES, write_test_scene

    import tilefuse
    from tilefuse.checkpoint import ModelConfig, save_checkpoint

    torch.manual_seed(0)
    hparams = {"patch_size": 5, "dim": 16, "spectral_tokens": 8, "max_patches_per_batch": 24}
    model = build_model("s2fin", SCENE_MODALITIES, len(CLASSES), **hparams).eval()
    checkpoint = save_checkpoint(model, ModelConfig("s2fin", dict(SCENE_MODALITIES), len(CLASSES), hparams, CLASSES), tmp_path / "run")
    scene = write_test_scene(tmp_path / "scene.zarr", 21, 19, seed=8)
    probs = [
        tilefuse.predict(checkpoint, scene, tmp_path / f"b{b}.zarr", tile=8, block_size=16, batch_size=b, probs="float32", progress=False)["probs"].values
        for b in (2, 3, 4)
    ]
    assert all(np.array_equal(probs[0], p) for p in probs[1:])


@pytest.mark.parametrize("value", ["false", "no", 0, None])
def test_tta_takes_only_true_or_false(value):
    """``bool("false")`` is true: a string or number for the flag is refused instead of turning 8x TTA on."""
    with pytest.raises(InputError, match="tta must be true or false"):
        S2FinModel(MODALITIES, 4, patch_size=5, dim=16, spectral_tokens=8, tta=value)
