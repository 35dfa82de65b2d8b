"""Load the model to analyse, dense: from an HF directory, a run directory or a DeepSpeed checkpoint.

Accepted `--checkpoint` forms:
  - an HF Emu3 directory (`config.json` + safetensors, e.g. a run's `hf/`): `UnifiedTransformer.from_hf`;
  - a run directory (`config.yaml` + `checkpoints/`), a `checkpoints/` root (its newest complete
    checkpoint) or one `step_NNNNNNNN` directory: weights via `train.export.checkpoint_state_dict`,
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
import yaml

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
    from train.checkpoint import CheckpointManager
    from train.export import checkpoint_state_dict

    spec = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    found = CheckpointManager.resolve(str(spec), spec)
    if found is None:
        raise ValueError(f"--checkpoint {path}: no complete checkpoint found")
    root, tag = found
    config = root.parent / "config.yaml"
    if not config.exists():
        raise ValueError(f"--checkpoint {path}: {config} (the run's resolved config) is needed for the model shape; "
                         "pass the run's hf/ directory instead")
    doc = yaml.safe_load(config.read_text()) or {}
    run_cfg = ModelConfig.from_dict(doc.get("model", doc))
    state = checkpoint_state_dict(root / tag, run_cfg)
    state = {k: v for k, v in state.items() if ".mod_router." not in k}
    dense_cfg = run_cfg.replace(mod={"capacity": {}})
    with torch.device("meta"):
        net = UnifiedTransformer(dense_cfg)
    expected = {k for k, _ in net.named_parameters()}
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise ValueError(f"{root / tag}: weights do not match {config}: missing {missing[:4]}, unexpected {extra[:4]}")
    net.load_state_dict({k: (v.to(dtype) if dtype else v) for k, v in state.items()}, strict=True, assign=True)
    return net, run_cfg.mod.to_dict(), f"checkpoint {root / tag} (shape from {config})"
