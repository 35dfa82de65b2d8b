"""Emu3-architecture decoder with task-aware Mixture-of-Depths (plain single-device PyTorch)."""

from model.config import PRESETS, ModelConfig, MoDConfig, VocabLayout
from model.transformer import ModelOutput, UnifiedTransformer

__all__ = ["PRESETS", "ModelConfig", "MoDConfig", "VocabLayout", "ModelOutput", "UnifiedTransformer"]
