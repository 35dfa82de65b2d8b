"""Emu3-architecture decoder with task-aware Mixture-of-Depths (plain single-device PyTorch)."""

from model.config import ModelConfig, MoDConfig, VocabLayout, PRESETS

__all__ = ["ModelConfig", "MoDConfig", "VocabLayout", "PRESETS"]
