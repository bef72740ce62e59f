"""Small scenes and a pointwise test model for the inference-engine tests.

Importing this module registers ``test-pointwise``: 1x1 convolutions only, so
each output pixel depends on its own input pixel alone and tiled inference
must reproduce whole-image inference. Worker processes import it too (the
model builder travels by reference), so keep it importable and light.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import dask.array as da
import numpy as np
import rioxarray  # noqa: F401
import torch
import xarray as xr
from torch import nn

from tilefuse.checkpoint import ModelConfig, save_checkpoint
from tilefuse.scene import write_scene
from tilefuse.tile_model import register_model, wrap_module

MODALITIES = {"optical": 3, "sar": 2}
CLASSES = ["water", "trees", "crops", "built"]
CALLS = {"forward": 0, "tiles": 0, "batches": []}
"""Model calls, tiles (all-zero padding tiles not counted) and the batch size of each call, in this process."""
BUILDS = {"count": 0}
"""Models of ``test-pointwise`` built in this process (a checkpoint loaded, a worker's plugin set up)."""
FAIL_AFTER: dict[str, int | None] = {"forward": None}
"""Raise inside forward once this many calls were made in this process (simulates a crash)."""


def make_scene(h: int, w: int, seed: int = 0, nodata: tuple[slice, slice] | None = None) -> xr.Dataset:
    """A two-modality scene (optical 3 bands, sar 2 bands) in EPSG:32632 with an optional nodata box."""
    rng = np.random.default_rng(seed)
    optical = (rng.normal(size=(3, h, w)) * 3 + 10).astype("float32")
    sar = rng.normal(size=(2, h, w)).astype("float32")
    valid = np.ones((h, w), bool)
    if nodata is not None:
        optical[(slice(None), *nodata)] = np.nan
        valid[nodata] = False
    ds = xr.Dataset(
        {
            "optical": (("optical_band", "y", "x"), da.from_array(optical, chunks=(3, 128, 128))),
            "sar": (("sar_band", "y", "x"), sar),
            "valid": (("y", "x"), valid),
        },
        coords={"x": 500_000 + 10.0 * np.arange(w) + 5, "y": 4_000_000 - 10.0 * np.arange(h) - 5},
    )
    return ds.rio.write_crs("EPSG:32632")


def write_test_scene(path: Path, h: int, w: int, seed: int = 0, nodata=None, chunk: int = 64) -> Path:
    return write_scene(make_scene(h, w, seed, nodata), path, chunk=chunk, shard=None)


class PointwiseNet(nn.Module):
    """1x1 convolutions over the concatenated modalities; crops ``margin`` px to mimic a context model."""

    def __init__(
        self, modalities: dict[str, int], num_classes: int, margin: int = 0, delay: float = 0.0, per_tile: bool = False, die: bool = False,
        batch_shift: float = 0.0,
    ) -> None:
        super().__init__()
        self.die = die
        self.batch_shift = batch_shift
        self.per_tile = per_tile
        self.names = list(modalities)
        self.margin = margin
        self.delay = delay
        self.body = nn.Sequential(
            nn.Conv2d(sum(modalities.values()), 16, 1), nn.Tanh(), nn.Conv2d(16, 16, 1), nn.Tanh(), nn.Conv2d(16, num_classes, 1)
        )

    def forward(self, inputs):
        if FAIL_AFTER["forward"] is not None and CALLS["forward"] >= FAIL_AFTER["forward"]:
            raise RuntimeError("simulated crash")
        if self.die:  # the process running the model ends at once, as one killed by the OOM killer
            os._exit(9)
        CALLS["forward"] += 1
        CALLS["batches"].append(len(next(iter(inputs.values()))))
        x = torch.cat([inputs[name] for name in self.names], dim=1)
        CALLS["tiles"] += int((x.flatten(1).abs().amax(1) > 0).sum())
        if self.delay:
            time.sleep(self.delay)
        # per_tile: one tile per call, so a tile's logits never depend on its batch (a 1x1 conv over a
        # batch is a GEMM whose rounding may follow the batch's shape)
        logits = torch.cat([self.body(t) for t in x.split(1)]) * 3 if self.per_tile else self.body(x) * 3
        if self.batch_shift:  # class 0's logit follows the batch size, as a kernel's rounding may (exaggerated)
            logits = torch.cat([logits[:, :1] + self.batch_shift * len(x), logits[:, 1:]], dim=1)
        m = self.margin
        return logits[..., m : x.shape[-2] - m, m : x.shape[-1] - m] if m else logits


@register_model("test-pointwise", "1x1-conv test model (tests only)")
def build_pointwise(
    modalities, num_classes, margin=0, blend=True, delay=0.0, seed=0, per_tile=False, batch_invariant=False, die=False, batch_shift=0.0
):
    BUILDS["count"] += 1
    torch.manual_seed(seed)
    net = PointwiseNet(dict(modalities), num_classes, margin, delay, per_tile=per_tile, die=die, batch_shift=batch_shift)
    return wrap_module(net, modalities, num_classes, margin=margin, blend=blend, batch_invariant=batch_invariant)


def save_pointwise(path: Path, seed: int = 0, band_stats: dict | None = None, **hparams) -> Path:
    """A checkpoint of ``test-pointwise`` (hparams: margin, blend, delay, per_tile, batch_invariant, batch_shift; die: every
    forward call ends its process at once, as the OOM killer would)."""
    hparams = {"seed": seed, **hparams}
    model = build_pointwise(MODALITIES, len(CLASSES), **hparams)
    config = ModelConfig("test-pointwise", dict(MODALITIES), len(CLASSES), hparams, list(CLASSES), band_stats or {})
    return save_checkpoint(model, config, path)


def reset_calls() -> None:
    CALLS.update(forward=0, tiles=0, batches=[])
    FAIL_AFTER["forward"] = None


def worker_pids(client) -> dict[str, int]:
    return client.run(os.getpid)


def wait_for_blocks(out: Path, at_least: int, timeout: float) -> np.ndarray | None:
    """The completion manifest of the prediction store ``out`` once ``at_least`` of its blocks are done, or None
    after ``timeout`` seconds: what a test's watcher thread polls while predict runs, to act mid-run."""
    from tilefuse.prediction import done_blocks

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            done = done_blocks(out)
        except Exception:  # the store is not created yet
            done = None
        if done is not None and done.sum() >= at_least:
            return done
        time.sleep(0.05)
    return None
