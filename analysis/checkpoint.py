"""Load the model to analyse, dense: from an HF directory, a run directory or a DeepSpeed checkpoint.

Accepted `--checkpoint` forms:
  - an HF Emu3 directory (`config.json` + safetensors, e.g. a run's `hf/`): `UnifiedTransformer.from_hf`;
  - a run directory (`config.yaml` + `checkpoints/`), a `checkpoints/` root (its newest complete
    checkpoint) or one `step_NNNNNNNN` directory: weights via `tools.export.checkpoint_state_dict`,
    shape from the run's `config.yaml`.

The analysis measures the dense network (UniMoD plans MoD layers for a dense checkpoint), so any MoD
plan the checkpoint carries is dropped: every layer runs on every token and routers are not loaded.
The returned `ModDefaults` keeps the checkpoint's task list and routing settings for the new plan.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from model.config import ModelConfig
from model.transformer import UnifiedTransformer


@dataclass
class LoadedModel:
    net: UnifiedTransformer
    """The dense model, in eval mode."""
    source_mod: dict[str, Any]
    """The checkpoint's own `mod:` section (tasks, routable, aux weight, routing; its capacities too)."""
    description: str
    """What was loaded, for the report."""


def load_dense(checkpoint: str | Path, device: torch.device | str = "cpu",
               dtype: torch.dtype | None = torch.float32) -> LoadedModel:
    path = Path(checkpoint)
    if not path.exists():
        raise ValueError(f"--checkpoint {path}: does not exist")
    if (path / "config.json").exists():
        from model.hf import config_from_hf

        kwargs, _ = config_from_hf(path)
        source_mod = ModelConfig(**{k: v for k, v in kwargs.items() if k != "_vocab_size"}).mod.to_dict()
        net = UnifiedTransformer.from_hf(path, mod={**source_mod, "capacity": {}}, dtype=dtype)
        description = f"HF directory {path}"
    else:
        net, source_mod, description = _from_run_checkpoint(path, dtype)
    return LoadedModel(net=net.to(device).eval(), source_mod=source_mod, description=description)


def _from_run_checkpoint(path: Path, dtype: torch.dtype | None):
    from tools.export import load_checkpoint_model

    trained, tag_dir, config = load_checkpoint_model(path, dtype=dtype)
    run_cfg = trained.config
    state = {k: v for k, v in trained.state_dict().items() if ".mod_router." not in k}
    with torch.device("meta"):
        net = UnifiedTransformer(run_cfg.replace(mod={"capacity": {}}))
    net.load_state_dict(state, strict=True, assign=True)
    return net, run_cfg.mod.to_dict(), f"checkpoint {tag_dir} (shape from {config})"
