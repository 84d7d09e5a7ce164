"""dalle-mini: an open, fast, offline-capable DALL·E Mini in JAX.

The public names are imported lazily, so `import dalle_mini` stays cheap and a front end pays
only for the parts it uses.
"""

import importlib

__version__ = "0.2.0"

_EXPORTS = {
    "DalleBart": "dalle_mini.models.dallebart",
    "DalleBartConfig": "dalle_mini.models.bart",
    "DalleBartProcessor": "dalle_mini.processor",
    "TextNormalizer": "dalle_mini.text",
    "VQModel": "dalle_mini.models.vqgan",
    "VQGANConfig": "dalle_mini.models.vqgan",
    "CLIPScorer": "dalle_mini.scoring",
    "Pipeline": "dalle_mini.pipeline",
    "CheckpointError": "dalle_mini.hub",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'dalle_mini' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__():
    return __all__
