"""Model architectures, one readable module each, chosen by the vindex's model type.

    model = larql.models.load(vindex, experts=None, dispatch="exact")

`load` picks the class from `vindex.config.model_type` (the checkpoint's `model_type`, as
recorded in index.json). Adding an architecture is one module and one line in MODEL_CLASSES.
"""

from __future__ import annotations

import importlib
from typing import Any

from ..errors import LarqlError

# model_type -> (module under larql.models, class). Gemma 4's text checkpoints say
# "gemma4_text"; the multimodal wrapper's top-level config says "gemma4".
MODEL_CLASSES: dict[str, tuple[str, str]] = {
    "gemma4_text": ("gemma4", "Gemma4Model"),
    "gemma4": ("gemma4", "Gemma4Model"),
}


class UnsupportedModelError(LarqlError, ValueError):
    """The vindex holds a model type no class here implements."""


def model_class(model_type: str) -> type:
    """The class implementing `model_type`; UnsupportedModelError names the supported ones."""
    try:
        module, name = MODEL_CLASSES[model_type]
    except KeyError:
        raise UnsupportedModelError(
            f"model type {model_type!r} is not supported (supported: {', '.join(sorted(MODEL_CLASSES))})"
        ) from None
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


def load(vindex, **kwargs: Any):
    """The model for an open vindex; keyword arguments go to the class (experts=, dispatch=)."""
    return model_class(vindex.config.model_type)(vindex, **kwargs)
