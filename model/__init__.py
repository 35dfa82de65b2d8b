"""Emu3-architecture decoder with task-aware Mixture-of-Depths (plain single-device PyTorch).

    from model import ModelConfig, UnifiedTransformer

`UnifiedTransformer` (and torch) load on first use, so `model.config` stays cheap to import for the data
tools that only need the vocabulary layout.
"""

from model.config import PRESETS, ModelConfig, MoDConfig, VocabLayout

__all__ = ["PRESETS", "ModelConfig", "MoDConfig", "VocabLayout", "ModelOutput", "UnifiedTransformer"]


def __getattr__(name: str):
    if name in ("UnifiedTransformer", "ModelOutput"):
        from model import transformer

        return getattr(transformer, name)
    raise AttributeError(f"module 'model' has no attribute {name!r}")
