"""The tile-model interface the engine runs, and the registry of models by name.

A tile model takes ``{modality: Tensor(B, C, H, W)}`` and returns logits
``(B, K, H - 2*margin, W - 2*margin)``: it needs ``margin`` pixels of input
context beyond its output on every side. The engine applies softmax and, when
``spec.blend`` is true, blends overlapping tiles; otherwise each output pixel is
computed once. Any ``torch.nn.Module`` with that forward can be wrapped with
:func:`wrap_module`, so users bring their own networks.

Concrete models live in ``tilefuse.models`` and register themselves with
:func:`register_model`; the engine only ever looks them up by name. Third-party
packages can register theirs through the ``tilefuse.models`` entry-point group.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import asdict, dataclass, field
from importlib.metadata import entry_points
from typing import Any, Callable, Mapping

import torch
from torch import nn

from tilefuse.classes import IGNORE
from tilefuse.errors import InputError


def masked_cross_entropy(logits: torch.Tensor, target: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy over the pixels whose label is not 255; 0 (with a graph) when all are ignored.

    ``logits`` (B, K, h, w), ``target`` (B, h, w) integer labels. Computed in float32 (AMP-safe).
    ``label_smoothing`` as in :func:`torch.nn.functional.cross_entropy`.
    """
    if target.shape != logits.shape[:1] + logits.shape[2:]:
        raise ValueError(f"target shape {tuple(target.shape)} does not match logits {tuple(logits.shape)} (B, h, w)")
    target = target.long()
    if not bool((target != IGNORE).any()):
        return logits.sum() * 0.0
    return torch.nn.functional.cross_entropy(logits.float(), target, ignore_index=IGNORE, label_smoothing=label_smoothing)


@dataclass(frozen=True)
class TileModelSpec:
    """What the engine needs to know to run a model over a scene."""

    modalities: dict[str, int]
    """Input modality name -> band count, in the order the model expects them."""
    num_classes: int
    margin: int = 0
    """Input pixels needed beyond the output on each side (0 for PAD, P//2 for S²Fin)."""
    blend: bool = True
    """Blend overlapping tiles (True) or compute each output pixel once (False)."""
    batch_invariant: bool = False
    """A tile's logits never depend on the other tiles of its batch, bitwise (S²Fin: its patch sub-batches never mix
    tiles). The engine then runs a block's last, partial batch as it is; otherwise it zero-pads every batch to one
    shape, because kernels such as convolutions may round a tile differently in batches of other sizes."""
    roles: dict[str, str] = field(default_factory=dict)
    """Role -> modality name, for models whose inputs play distinct roles (PAD, S²Fin: ``optical``, ``active``).

    Such a model takes the hyperparameter ``roles`` (this mapping, or None to decide
    by name); a checkpoint records the mapping so its weights reload into the same roles.
    """

    def __post_init__(self) -> None:
        if not self.modalities:
            raise ValueError("a tile model needs at least one input modality")
        if any(name not in self.modalities for name in self.roles.values()):
            raise ValueError(f"roles {self.roles} name modalities the model does not read ({list(self.modalities)})")
        if any(int(c) < 1 for c in self.modalities.values()):
            raise ValueError(f"band counts must be >= 1, got {self.modalities}")
        if self.num_classes < 1 or self.margin < 0:
            raise ValueError("num_classes must be >= 1 and margin >= 0")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class TileModel(nn.Module):
    """Base class of every model the engine runs. Subclasses set ``self.spec``."""

    spec: TileModelSpec

    def forward(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def compute_loss(self, inputs: Mapping[str, torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        """Scalar training loss; ``target`` (B, h, w) matches the logits' size (input minus 2*margin), 255 = ignore.

        Default: :func:`masked_cross_entropy` on ``forward``. Models with auxiliary losses override it.
        """
        return masked_cross_entropy(self(inputs), target)


class WrappedModule(TileModel):
    """Makes a plain ``nn.Module`` with the tile-model forward into a :class:`TileModel`."""

    def __init__(self, module: nn.Module, spec: TileModelSpec) -> None:
        super().__init__()
        self.module = module
        self.spec = spec

    def forward(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.module(inputs)


def wrap_module(
    module: nn.Module,
    modalities: Mapping[str, int],
    num_classes: int,
    margin: int = 0,
    blend: bool = True,
    batch_invariant: bool = False,
) -> TileModel:
    """Wrap a user's ``nn.Module`` (``forward(dict) -> logits``) as a tile model (see :class:`TileModelSpec`)."""
    if isinstance(module, TileModel):
        return module
    return WrappedModule(module, TileModelSpec(dict(modalities), num_classes, margin, blend, batch_invariant=batch_invariant))


ModelBuilder = Callable[..., TileModel]


@dataclass
class _Entry:
    builder: ModelBuilder
    description: str = ""
    defaults: dict[str, Any] = field(default_factory=dict)


_REGISTRY: dict[str, _Entry] = {}
_loaded = False


def register_model(name: str, description: str = "", **defaults: Any) -> Callable[[ModelBuilder], ModelBuilder]:
    """Register ``builder(modalities, num_classes, **hparams) -> TileModel`` under ``name``.

    ``defaults`` are example hyperparameters/modalities used by ``tilefuse models``
    to report a parameter count; they are not applied when building.
    """

    def decorator(builder: ModelBuilder) -> ModelBuilder:
        _REGISTRY[name] = _Entry(builder, description or (builder.__doc__ or "").strip().split("\n")[0], defaults)
        return builder

    return decorator


def _load_registry() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    importlib.import_module("tilefuse.models")
    for entry_point in entry_points(group="tilefuse.models"):
        entry_point.load()


def available_models() -> dict[str, _Entry]:
    """Registered models by name (built-in ones and entry-point plug-ins)."""
    _load_registry()
    return dict(sorted(_REGISTRY.items()))


def _hyperparameters(builder: ModelBuilder) -> set[str] | None:
    """Keyword hyperparameters a builder (function or model class) accepts; None if it takes ``**kwargs``."""
    parameters = list(inspect.signature(builder).parameters.values())[2:]  # after modalities, num_classes
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return None
    return {p.name for p in parameters if p.kind is not inspect.Parameter.VAR_POSITIONAL}


def accepts_hyperparameter(name: str, key: str) -> bool:
    """Whether registered model ``name`` takes hyperparameter ``key`` (False for unknown models)."""
    models = available_models()
    if name not in models:
        return False
    accepted = _hyperparameters(models[name].builder)
    return accepted is None or key in accepted


def build_model(name: str, modalities: Mapping[str, int], num_classes: int, **hparams: Any) -> TileModel:
    """Build a registered model; unknown names raise :class:`InputError` listing the known ones."""
    models = available_models()
    if name not in models:
        raise InputError(f"unknown model {name!r}: choose one of {', '.join(models)} (see `tilefuse models`)")
    builder = models[name].builder
    accepted = _hyperparameters(builder)
    unknown = sorted(set(hparams) - accepted) if accepted is not None else []
    if unknown:
        raise InputError(f"unknown {name} hyperparameter(s) {unknown}: choose from {sorted(accepted)}")
    model = builder(dict(modalities), num_classes, **hparams)
    if not isinstance(model, TileModel):
        raise TypeError(f"builder of {name!r} returned {type(model).__name__}, not a TileModel")
    return model
