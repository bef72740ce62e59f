"""The fusion models: PAD and S²Fin, plus their building blocks (ConvNeXt-V2 encoders).

Importing this package registers every model with :func:`tilefuse.tile_model.register_model`.
"""

from tilefuse.models import convnext, pad, s2fin  # noqa: F401  (registers "pad" and "s2fin")
