"""The model to analyse: any checkpoint `tools.checkpoints.open_checkpoint` reads, as a dense network.

`--checkpoint` is an HF Emu3 directory (e.g. a run's `hf/`), a run directory, a `checkpoints/` root (its
newest complete checkpoint) or one `step_NNNNNNNN` directory.

The analysis measures the dense network (UniMoD plans MoD layers for a dense checkpoint), so any MoD
plan the checkpoint carries is dropped: every layer runs on every token and routers are not loaded.
The returned `source_mod` keeps the checkpoint's task list and routing settings for the new plan.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from model.transformer import UnifiedTransformer
from tools.checkpoints import open_checkpoint


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
    opened = open_checkpoint(checkpoint, dtype=dtype)
    return LoadedModel(net=dense_view(opened.model).to(device).eval(), source_mod=opened.model.config.mod.to_dict(),
                       description=opened.description)


def dense_view(model: UnifiedTransformer) -> UnifiedTransformer:
    """The same weights without the MoD plan: no capacities, no routers."""
    state = {k: v for k, v in model.state_dict().items() if ".mod_router." not in k}
    with torch.device("meta"):
        net = UnifiedTransformer(model.config.replace(mod={"capacity": {}}))
    net.load_state_dict(state, strict=True, assign=True)
    return net
