"""ConvNeXt-V2 encoder: shapes, GRN, drop path, and loading timm / mmpretrain / official weights by key mapping."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from tilefuse.errors import InputError
from tilefuse.models.convnext import GRN, PRESETS, ConvNeXt, load_convnext_weights
from tilefuse.models.layers import DropPath


@pytest.mark.parametrize("preset", list(PRESETS))
def test_stage_shapes_every_preset_odd_size(preset):
    depths, widths = PRESETS[preset]
    with torch.device("meta"):  # shape propagation only: cheap even for "large"
        encoder = ConvNeXt.from_preset(preset, in_channels=5)
        features = encoder(torch.empty(2, 5, 70, 45))
    expected = [(70 // s, 45 // s) for s in (4, 8, 16, 32)]
    assert [f.shape[1] for f in features] == list(widths)
    assert [tuple(f.shape[2:]) for f in features] == expected
    assert [len(stage) for stage in encoder.stages] == list(depths)


def test_real_forward_any_band_count():
    encoder = ConvNeXt.from_preset("atto", in_channels=7).eval()
    features = encoder(torch.randn(1, 7, 64, 96))
    assert [tuple(f.shape) for f in features] == [(1, 40, 16, 24), (1, 80, 8, 12), (1, 160, 4, 6), (1, 320, 2, 3)]
    assert all(torch.isfinite(f).all() for f in features)


def test_paper_large_encoder_has_196m_parameters():
    with torch.device("meta"):
        encoder = ConvNeXt.from_preset("large", in_channels=3)
    # ConvNeXt-V2-Large without classifier head: ~196 M (docs/models.md: "two backbones 2x196 M").
    assert abs(sum(p.numel() for p in encoder.parameters()) / 1e6 - 196) < 1.5


def test_grn_on_constant_channels_matches_hand_formula():
    grn = GRN(3)
    with torch.no_grad():
        grn.weight.copy_(torch.tensor([0.5, -1.0, 2.0]))
        grn.bias.copy_(torch.tensor([0.1, 0.2, 0.3]))
    values = torch.tensor([1.0, -2.0, 4.0])
    x = values.expand(1, 5, 6, 3).clone()  # channels-last, channel k constant v_k
    # spatial L2 norm of channel k = |v_k| * sqrt(30); divided by its channel mean -> |v_k| / mean|v|
    relative = values.abs() / values.abs().mean()
    expected = values + grn.weight.detach() * values * relative + grn.bias.detach()
    assert torch.allclose(grn(x)[0, 2, 3], expected, atol=1e-5)
    assert torch.equal(GRN(3)(x), x)  # zero-initialised GRN is the identity


def test_drop_path_drops_whole_samples_and_is_identity_in_eval():
    torch.manual_seed(0)
    layer = DropPath(0.5)
    x = torch.ones(64, 3, 4, 4)
    y = layer(x)
    per_sample = y.flatten(1)
    assert set(per_sample.unique().tolist()) <= {0.0, 2.0}
    assert (per_sample.min(dim=1).values == per_sample.max(dim=1).values).all()
    assert 0 < (per_sample[:, 0] == 0).sum() < 64
    layer.eval()
    assert torch.equal(layer(x), x)


# --- weight loading ---------------------------------------------------------------------------


def _timm_state(encoder: ConvNeXt) -> dict[str, torch.Tensor]:
    """A synthetic checkpoint in timm's ConvNeXt-V2 naming, random values of the right shapes."""
    g = torch.Generator().manual_seed(1)
    state = {}
    w = encoder.widths
    state["stem.0.weight"] = torch.randn(w[0], 3, 4, 4, generator=g)
    state["stem.0.bias"] = torch.randn(w[0], generator=g)
    state["stem.1.weight"] = torch.randn(w[0], generator=g)
    state["stem.1.bias"] = torch.randn(w[0], generator=g)
    for i, (depth, width) in enumerate(zip(encoder.depths, w)):
        if i:
            state[f"stages.{i}.downsample.0.weight"] = torch.randn(w[i - 1], generator=g)
            state[f"stages.{i}.downsample.0.bias"] = torch.randn(w[i - 1], generator=g)
            state[f"stages.{i}.downsample.1.weight"] = torch.randn(width, w[i - 1], 2, 2, generator=g)
            state[f"stages.{i}.downsample.1.bias"] = torch.randn(width, generator=g)
        for j in range(depth):
            p = f"stages.{i}.blocks.{j}"
            state[f"{p}.conv_dw.weight"] = torch.randn(width, 1, 7, 7, generator=g)
            state[f"{p}.conv_dw.bias"] = torch.randn(width, generator=g)
            state[f"{p}.norm.weight"] = torch.randn(width, generator=g)
            state[f"{p}.norm.bias"] = torch.randn(width, generator=g)
            state[f"{p}.mlp.fc1.weight"] = torch.randn(4 * width, width, generator=g)
            state[f"{p}.mlp.fc1.bias"] = torch.randn(4 * width, generator=g)
            state[f"{p}.mlp.grn.weight"] = torch.randn(4 * width, generator=g)
            state[f"{p}.mlp.grn.bias"] = torch.randn(4 * width, generator=g)
            state[f"{p}.mlp.fc2.weight"] = torch.randn(width, 4 * width, generator=g)
            state[f"{p}.mlp.fc2.bias"] = torch.randn(width, generator=g)
    state["head.norm.weight"] = torch.randn(w[-1], generator=g)
    state["head.norm.bias"] = torch.randn(w[-1], generator=g)
    state["head.fc.weight"] = torch.randn(10, w[-1], generator=g)
    state["head.fc.bias"] = torch.randn(10, generator=g)
    return state


def _timm_to_mmpretrain(state: dict[str, torch.Tensor], official: bool = False) -> dict[str, torch.Tensor]:
    """The same tensors under mmpretrain's names (``backbone.`` prefix) or the official release's names."""
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "stem":
            new = f"downsample_layers.0.{parts[1]}.{parts[2]}"
        elif parts[0] == "head" and parts[1] == "norm":
            new = f"norm.{parts[2]}" if official else f"norm3.{parts[2]}"
        elif parts[0] == "head":
            new = key
        elif parts[2] == "downsample":
            new = f"downsample_layers.{parts[1]}.{parts[3]}.{parts[4]}"
        else:
            i, j, rest = parts[1], parts[3], parts[4:]
            names = {
                "conv_dw": "dwconv" if official else "depthwise_conv",
                "norm": "norm",
                "mlp.fc1": "pwconv1" if official else "pointwise_conv1",
                "mlp.fc2": "pwconv2" if official else "pointwise_conv2",
                "mlp.grn": "grn",
            }
            sub = ".".join(rest[:-1])
            leaf = rest[-1]
            if sub == "mlp.grn":
                leaf = {"weight": "gamma", "bias": "beta"}[leaf]
                if official:
                    value = value.view(1, 1, 1, -1)
            new = f"stages.{i}.{j}.{names[sub]}.{leaf}"
        out[new if official else f"backbone.{new}"] = value
    return out


def _assert_loaded(encoder: ConvNeXt, timm_state: dict[str, torch.Tensor]) -> None:
    own = encoder.state_dict()
    assert torch.equal(own["downsample.0.0.weight"], timm_state["stem.0.weight"])
    assert torch.equal(own["downsample.2.1.weight"], timm_state["stages.2.downsample.1.weight"])
    assert torch.equal(own["stages.2.5.dwconv.weight"], timm_state["stages.2.blocks.5.conv_dw.weight"])
    assert torch.equal(own["stages.1.1.pwconv1.weight"], timm_state["stages.1.blocks.1.mlp.fc1.weight"])
    assert torch.equal(own["stages.3.0.grn.weight"], timm_state["stages.3.blocks.0.mlp.grn.weight"])
    assert torch.equal(own["stages.3.1.pwconv2.bias"], timm_state["stages.3.blocks.1.mlp.fc2.bias"])
    assert torch.equal(own["norms.3.weight"], timm_state["head.norm.weight"])


def test_load_timm_safetensors(tmp_path):
    encoder = ConvNeXt.from_preset("atto", in_channels=3)
    state = _timm_state(encoder)
    save_file(state, str(tmp_path / "convnextv2_atto.safetensors"))
    report = load_convnext_weights(encoder, tmp_path / "convnextv2_atto.safetensors")
    assert report.source_format == "timm"
    _assert_loaded(encoder, state)
    assert "head.fc.weight" in report.ignored
    # only the stage-1..3 output norms are absent from a classification checkpoint
    assert report.missing == sorted(f"norms.{i}.{p}" for i in range(3) for p in ("bias", "weight"))
    assert not report.stem_adapted


@pytest.mark.parametrize("official", [False, True], ids=["mmpretrain", "official"])
def test_load_mmpretrain_and_official_torch_files(tmp_path, official):
    encoder = ConvNeXt.from_preset("atto", in_channels=3)
    state = _timm_state(encoder)
    path = tmp_path / "convnext-v2.pth"
    wrapper = "model" if official else "state_dict"
    torch.save({wrapper: _timm_to_mmpretrain(state, official), "meta": {"epoch": 3}}, path)
    report = load_convnext_weights(encoder, path)
    assert report.source_format == ("official" if official else "mmpretrain")
    _assert_loaded(encoder, state)


@pytest.mark.parametrize("bands", [1, 2, 4])
def test_stem_adapts_to_other_band_counts(tmp_path, bands):
    rgb = ConvNeXt.from_preset("atto", in_channels=3)
    state = _timm_state(rgb)
    save_file(state, str(tmp_path / "w.safetensors"))
    encoder = ConvNeXt.from_preset("atto", in_channels=bands)
    report = load_convnext_weights(encoder, tmp_path / "w.safetensors")
    assert report.stem_adapted
    # A band-replicated image gives the response the RGB stem gives to a grey RGB image.
    image = torch.randn(1, 1, 16, 16)
    stem = encoder.downsample[0][0]
    ours = stem(image.expand(1, bands, 16, 16))
    reference = F.conv2d(image.expand(1, 3, 16, 16), state["stem.0.weight"], state["stem.0.bias"], stride=4)
    assert torch.allclose(ours, reference, atol=1e-4)


def test_loading_rejects_wrong_size_pickles_and_foreign_files(tmp_path):
    atto = ConvNeXt.from_preset("atto", in_channels=3)
    femto_state = _timm_state(ConvNeXt.from_preset("femto", in_channels=3))
    save_file(femto_state, str(tmp_path / "femto.safetensors"))
    before = {k: v.clone() for k, v in atto.state_dict().items()}
    with pytest.raises(InputError, match="preset"):
        load_convnext_weights(atto, tmp_path / "femto.safetensors")
    assert all(torch.equal(before[k], v) for k, v in atto.state_dict().items())  # untouched on failure

    torch.save({"state_dict": {"model": _NotATensor()}}, tmp_path / "pickle.pth")
    with pytest.raises(InputError, match="cannot read"):
        load_convnext_weights(atto, tmp_path / "pickle.pth")

    save_file({"decoder.weight": torch.zeros(3)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(InputError, match="no ConvNeXt-V2"):
        load_convnext_weights(atto, tmp_path / "other.safetensors")

    partial = {k: v for k, v in _timm_state(atto).items() if "grn" not in k}  # a ConvNeXt V1 has no GRN
    save_file(partial, str(tmp_path / "v1.safetensors"))
    with pytest.raises(InputError, match="lacks"):
        load_convnext_weights(atto, tmp_path / "v1.safetensors")

    with pytest.raises(InputError, match="does not exist"):
        load_convnext_weights(atto, tmp_path / "missing.pth")


class _NotATensor:
    """Pickled as a custom class: ``torch.load(weights_only=True)`` must refuse it."""


@pytest.mark.parametrize("preset", ["micro", "atto"])
def test_zero_input_regions_keep_the_gradient_of_a_fresh_encoder_normal(preset):
    """Nodata pixels and the padding of a patch shrunk by rescale are 0 in every band: a fresh encoder must not
    turn them into zero-variance LayerNorm inputs (the gradient norm reached 1e10 and clipping stalled training)."""
    from tilefuse.models.convnext import ConvNeXt

    torch.manual_seed(0)
    encoder = ConvNeXt.from_preset(preset, 4)
    x = torch.randn(2, 4, 64, 64)

    def gradient_norm(inputs):
        encoder.zero_grad()
        sum(f.square().mean() for f in encoder(inputs)).backward()
        return float(torch.nn.utils.clip_grad_norm_(encoder.parameters(), float("inf")))

    padded = x.clone()
    padded[:, :, :40, :40] = 0
    assert gradient_norm(padded) < 10 * gradient_norm(x)
