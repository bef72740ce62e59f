"""The fusion models: PAD and S²Fin, plus their building blocks (ConvNeXt-V2 encoders).

Importing this package registers every model with :func:`tilefuse.tile_model.register_model`
(``"pad"`` and ``"s2fin"``); build them by name with :func:`tilefuse.tile_model.build_model`.
"""

from tilefuse.models import convnext, pad, s2fin
from tilefuse.models.convnext import ConvNeXt, load_convnext_weights
from tilefuse.models.pad import PADModel, PADOutputs, pad_loss
from tilefuse.models.s2fin import S2FinClassifier, S2FinModel

__all__ = [
    "convnext",
    "pad",
    "s2fin",
    "ConvNeXt",
    "load_convnext_weights",
    "PADModel",
    "PADOutputs",
    "pad_loss",
    "S2FinModel",
    "S2FinClassifier",
]
