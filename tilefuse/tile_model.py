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
A name belongs to its first builder: built-ins and plug-ins load before any other
registration, and another builder under a taken name is refused (re-running a
notebook cell re-registers the same builder, which replaces the old one).
"""

from __future__ import annotations

import importlib
import inspect
import math
import numbers
import warnings
from dataclasses import asdict, dataclass, field
from importlib.metadata import entry_points
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch import nn

from tilefuse.classes import IGNORE
from tilefuse.errors import InputError, clipped


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
        """Refuse, as one :class:`InputError` naming the field, what the engine would trip over later.

        A float margin or class count broke tensor indexing deep in a run, and a non-bool ``blend`` was read as true.
        Whole numbers are stored as plain ``int`` (numpy integers are accepted), so the spec stays JSON-ready.
        """
        names = self.modalities
        if not isinstance(names, Mapping) or not names or not all(isinstance(name, str) and name for name in names):
            raise InputError(f"modalities must name at least one input modality, as {{name: band count}}, got {names!r}")
        for name, bands in names.items():
            _require_whole(f"modalities[{name!r}] (its band count)", bands, 1)
        _require_whole("num_classes", self.num_classes, 1)
        _require_whole("margin", self.margin, 0)
        for flag in ("blend", "batch_invariant"):
            if not isinstance(getattr(self, flag), bool):
                raise InputError(f"{flag} must be True or False, got {getattr(self, flag)!r}")
        if not isinstance(self.roles, Mapping) or any(name not in names for name in self.roles.values()):
            raise InputError(f"roles {self.roles!r} must map each role to a modality the model reads ({list(names)})")
        object.__setattr__(self, "modalities", {name: int(bands) for name, bands in names.items()})
        object.__setattr__(self, "num_classes", int(self.num_classes))
        object.__setattr__(self, "margin", int(self.margin))
        object.__setattr__(self, "roles", dict(self.roles))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _require_whole(name: str, value: Any, least: int) -> None:
    """InputError unless ``value`` is a whole number >= ``least`` (an int or numpy integer; a bool is not one)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
        raise InputError(f"{name} must be a whole number >= {least}, got {value!r}")


def check_logits(logits: Any, expected: tuple[int, ...], height: int, width: int) -> torch.Tensor:
    """``logits`` if it is a tensor of shape ``expected`` (B, K, h, w), else one InputError line; the inputs were
    ``height`` x ``width`` px. Training (:meth:`TileModel.compute_loss`) and prediction check a model's output
    here: a user's model returning a tuple, another class count or another size (ignoring its margin,
    downsampling) otherwise ends in a raw IndexError, ValueError or AttributeError far from the cause.
    """
    if not isinstance(logits, torch.Tensor):
        raise InputError(
            f"the model returned a {type(logits).__name__}, not logits, for inputs of {height} x {width} px, expected a Tensor of "
            f"shape {expected}: make its forward return the logits alone (override compute_loss to use more outputs)"
        )
    if tuple(logits.shape) != tuple(expected):
        raise InputError(
            f"the model returned logits of shape {tuple(logits.shape)} for inputs of {height} x {width} px, "
            f"expected {tuple(expected)}: check its margin and number of classes"
        )
    return logits


class TileModel(nn.Module):
    """Base class of every model the engine runs. Subclasses set ``self.spec``."""

    spec: TileModelSpec

    def forward(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def compute_loss(self, inputs: Mapping[str, torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        """Scalar training loss; ``target`` (B, h, w) matches the logits' size (input minus 2*margin), 255 = ignore.

        Default: :func:`masked_cross_entropy` on ``forward``, whose output must be logits of the target's size
        (InputError otherwise). Models with auxiliary losses override it.
        """
        height, width = next(iter(inputs.values())).shape[-2:]
        expected = (target.shape[0], self.spec.num_classes, *target.shape[1:])
        return masked_cross_entropy(check_logits(self(inputs), expected, height, width), target)


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
    return WrappedModule(module, TileModelSpec(modalities, num_classes, margin, blend, batch_invariant=batch_invariant))


ModelBuilder = Callable[..., TileModel]


@dataclass
class _Entry:
    builder: ModelBuilder
    description: str = ""
    defaults: dict[str, Any] = field(default_factory=dict)


_REGISTRY: dict[str, _Entry] = {}
_BROKEN: dict[str, str] = {}
"""Entry-point name -> why that plug-in failed to load: what building a model of that name says."""
_loaded = False


def _origin(builder: ModelBuilder) -> str:
    """Where ``builder`` is defined, ``module.qualname``: the same for a notebook cell run again."""
    return f"{getattr(builder, '__module__', None)}.{getattr(builder, '__qualname__', type(builder).__qualname__)}"


def register_model(name: str, description: str = "", **defaults: Any) -> Callable[[ModelBuilder], ModelBuilder]:
    """Register ``builder(modalities, num_classes, **hparams) -> TileModel`` under ``name``.

    The built-in models and plug-ins are loaded first, so import order never decides which model a name
    means: a name taken by another builder is an :class:`InputError` naming where that one comes from. The
    same builder again (same module and qualified name, as from a re-run notebook cell) replaces itself.
    ``defaults`` are example hyperparameters/modalities used by ``tilefuse models``
    to report a parameter count; they are not applied when building.
    """

    def decorator(builder: ModelBuilder) -> ModelBuilder:
        # built-ins register while tilefuse.models imports: loading from there would recurse, or show plug-ins a half-made package
        if not (getattr(builder, "__module__", None) or "").startswith("tilefuse.models."):
            _load_registry()
        taken = _REGISTRY.get(name)
        if taken is not None and _origin(taken.builder) != _origin(builder):
            raise InputError(
                f"model name {name!r} is registered already, by {_origin(taken.builder)}: register {_origin(builder)} under another name"
            )
        _REGISTRY[name] = _Entry(builder, description or (builder.__doc__ or "").strip().split("\n")[0], defaults)
        return builder

    return decorator


def _load_registry() -> None:
    """Import the built-in models, then each ``tilefuse.models`` entry-point plug-in on its own; once per process.

    ``_loaded`` is set first, so the registrations these imports make do not load again. A plug-in whose
    import fails is one warning and an entry in ``_BROKEN``, not a traceback: one broken package must not
    break every command nor hide the plug-ins after it. Building its model says why it is missing.
    """
    global _loaded
    if _loaded:
        return
    _loaded = True
    importlib.import_module("tilefuse.models")
    _BROKEN.clear()
    for entry_point in entry_points(group="tilefuse.models"):
        try:
            entry_point.load()
        except Exception as error:
            reason = ": ".join([type(error).__name__, *str(error).strip().splitlines()[:1]])
            module = entry_point.value.partition(":")[0]
            _BROKEN[entry_point.name] = f"plug-in {entry_point.name!r} (module {module}) failed to load: {reason}"
            warnings.warn(f"{_BROKEN[entry_point.name]}; its models are unavailable", stacklevel=2)


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


def _hyperparameter_problem(builder: ModelBuilder, key: str, value: Any) -> str | None:
    """What ``value`` lacks as hyperparameter ``key`` of ``builder``, judged by the type of its default (a bool,
    whole number, number or text; other defaults, None included, say nothing; a whole-number default annotated
    ``float`` takes any number), or None."""
    parameter = inspect.signature(builder).parameters.get(key)
    default = parameter.default if parameter is not None else inspect.Parameter.empty
    annotation = parameter.annotation if parameter is not None else inspect.Parameter.empty
    hint = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    whole = isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))
    if isinstance(default, bool):
        return None if isinstance(value, (bool, np.bool_)) else "must be true or false"
    if isinstance(default, int) and "float" not in hint:  # `scale: float = 1` takes 0.5
        return None if whole else "must be a whole number"
    if isinstance(default, (int, float)):
        number = whole or (isinstance(value, (float, np.floating)) and math.isfinite(value))
        return None if number else "must be a finite number"
    if isinstance(default, str):
        return None if isinstance(value, str) else "must be text"
    return None


def accepts_hyperparameter(name: str, key: str) -> bool:
    """Whether registered model ``name`` takes hyperparameter ``key`` (False for unknown models)."""
    models = available_models()
    if name not in models:
        return False
    accepted = _hyperparameters(models[name].builder)
    return accepted is None or key in accepted


def build_model(name: str, modalities: Mapping[str, int], num_classes: int, **hparams: Any) -> TileModel:
    """Build a registered model; an unknown name, hyperparameter or a builder's non-model is an :class:`InputError`.

    An unknown name is also how a checkpoint of a user's model loads where that model is not registered,
    so the message says how to register it besides listing the known ones.
    """
    models = available_models()
    if name not in models and name in _BROKEN:
        raise InputError(f"model {name!r} is unavailable: {_BROKEN[name]}; fix or reinstall that package")
    if name not in models:
        raise InputError(
            f"unknown model {name!r}: choose one of {', '.join(models)} (see `tilefuse models`), or, for your own model, import "
            f"the module that calls tilefuse.register_model({name!r}) first, or install the package that provides it through "
            "the `tilefuse.models` entry point"
        )
    builder = models[name].builder
    accepted = _hyperparameters(builder)
    unknown = sorted(set(hparams) - accepted) if accepted is not None else []
    if unknown:
        raise InputError(f"unknown {name} hyperparameter(s) {unknown}: choose from {sorted(accepted)}")
    for key, value in hparams.items():
        problem = _hyperparameter_problem(builder, key, value)
        if problem:
            raise InputError(f"{name} hyperparameter {key}= {problem}, got {type(value).__name__} {clipped(repr(value))} (see `tilefuse models {name}`)")
    try:
        model = builder(dict(modalities), num_classes, **hparams)
    except (TypeError, ValueError, ArithmeticError, AssertionError) as error:
        if not hparams:  # the defaults fail: the model's own bug, its traceback is the report
            raise
        given = ", ".join(f"{k}={v!r}" for k, v in hparams.items())
        raise InputError(
            f"model {name!r} cannot be built with hparams {clipped(given)} ({type(error).__name__}: {clipped(str(error))}): "
            f"check those values (see `tilefuse models {name}`)"
        ) from None
    if not isinstance(model, TileModel):
        raise InputError(
            f"the builder of model {name!r} ({_origin(builder)}) returned a {type(model).__name__}, not a TileModel: "
            "return tilefuse.wrap_module(module, modalities, num_classes, margin=...) from it"
        )
    return model
