"""What a checkpoint was trained with, and what a resume may change.

Every checkpoint holds `fingerprint.json` (written before its COMPLETE marker): the settings a resumed run
must share with it, flat under the config's own dotted names so that a refusal can name the field and the
override. `compare` sorts the differences into three kinds:

    layout    world size, data-parallel size, mode, pipeline stages, ZeRO stage, precision: how the engine
              state is sharded on disk. A plain DeepSpeed load cannot re-shard it; elastic resume (DeepSpeed's
              universal checkpoint) can, and train/elastic.py judges these.
    shape     model shapes, vocabulary layout, MoD task order and MoD layer set, MoE layers, experts and router
              kind: the saved tensors would not fit (or, for a task reorder, would fit and mean the wrong
              task). Never acceptable.
    other     optimizer, schedule, MoD capacities, MoE top-k, capacity and balance loss, seed, data: acceptable one by one with
              `--set checkpoint.accept_changes=[optim.lr,run.max_steps]`; accepted schedule changes take
              effect from the resumed step on (train/engine.py `apply_optim_config`).

Data-order settings (sequence length, shuffling, mixing weights, workers) are not repeated here: the loader
stores its own fingerprint in the trainer state and refuses a resume that would change the batch order
(data/loader.py `UnimodLoader.load_state_dict`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # annotations only: train/config.py reads checkpoints, which write fingerprints
    from train.config import RunConfig

FINGERPRINT = "fingerprint.json"
VERSION = 1

LAYOUT_FIELDS = ("parallel.world_size", "parallel.data_parallel_size", "parallel.mode", "parallel.pipeline_stages",
                 "parallel.zero_stage", "parallel.precision")
SHAPE_FIELDS = ("model.hidden_size", "model.intermediate_size", "model.num_hidden_layers",
                "model.num_attention_heads", "model.num_key_value_heads", "model.vocab", "model.mod.tasks",
                "model.mod.mod_layers", "model.mod.shared_router", "model.moe.layers", "model.moe.num_experts",
                "model.moe.router", "model.moe.shared_experts")
# Acceptable in principle, but the data loader's own check refuses them (its position counts micro-batches).
_LOADER_BOUND = {"data.micro_batch_size": "the loader's saved position counts micro-batches of the old size"}


def _sha256_file(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except FileNotFoundError:
        return None


def fingerprint(cfg: RunConfig, *, world_size: int, zero_stage: int, precision: str) -> dict[str, Any]:
    """The flat {dotted field: value} record of this run that a checkpoint keeps (JSON-safe values)."""
    m, mod = cfg.model, cfg.model.mod
    stages = cfg.parallel.pipeline_stages if cfg.parallel.mode == "pipeline" else 1
    manifest_sha = tokenizer_sha = None
    if cfg.data.dataset_dir is not None:
        manifest = Path(cfg.data.dataset_dir) / "manifest.json"
        manifest_sha = _sha256_file(manifest)
        if manifest_sha is not None:
            tokenizer_sha = (json.loads(manifest.read_text()).get("tokenizer") or {}).get("sha256")
    else:
        tokenizer_sha = cfg.data.tokenizer_sha256
    fp = {
        "model.hidden_size": m.hidden_size,
        "model.intermediate_size": m.intermediate_size,
        "model.num_hidden_layers": m.num_hidden_layers,
        "model.num_attention_heads": m.num_attention_heads,
        "model.num_key_value_heads": m.num_key_value_heads,
        "model.rms_norm_eps": m.rms_norm_eps,
        "model.rope_theta": m.rope_theta,
        "model.vocab": m.vocab.to_dict(),
        "model.mod.tasks": list(mod.tasks),
        "model.mod.mod_layers": mod.mod_layers(),
        "model.mod.shared_router": mod.shared_router,
        "model.mod.capacity": mod.to_dict()["capacity"],
        "model.mod.routable": dict(mod.routable),
        "model.mod.routing": mod.routing,
        "model.mod.aux_loss_weight": mod.aux_loss_weight,
        "model.moe.layers": list(m.moe.layers),
        "model.moe.num_experts": m.moe.num_experts,
        "model.moe.router": m.moe.router,
        "model.moe.top_k": m.moe.top_k,
        "model.moe.shared_experts": m.moe.shared_experts,
        "model.moe.capacity_factor": m.moe.capacity_factor,
        "model.moe.overflow": m.moe.overflow,
        "model.moe.balance_loss_weight": m.moe.balance_loss_weight,
        "data.tokenizer_sha256": tokenizer_sha,
        "data.manifest_sha256": manifest_sha,
        "data.micro_batch_size": cfg.data.micro_batch_size,
        "parallel.world_size": world_size,
        "parallel.data_parallel_size": world_size // stages,
        "parallel.mode": cfg.parallel.mode,
        "parallel.pipeline_stages": stages,
        "parallel.zero_stage": zero_stage,
        "parallel.precision": precision,
        "optim.lr": cfg.optim.lr,
        "optim.warmup_steps": cfg.optim.warmup_steps,
        "optim.min_lr_ratio": cfg.optim.min_lr_ratio,
        "optim.betas": list(cfg.optim.betas),
        "optim.eps": cfg.optim.eps,
        "optim.weight_decay": cfg.optim.weight_decay,
        "optim.grad_clip": cfg.optim.grad_clip,
        "optim.grad_accum": cfg.optim.grad_accum,
        "run.max_steps": cfg.run.max_steps,
        "run.seed": cfg.run.seed,
    }
    return json.loads(json.dumps(fp))  # what a JSON round trip gives, so comparing with a loaded one is exact


def write(tag_dir: Path, fp: dict[str, Any], write_text) -> None:
    """`write_text(path, text)`: the checkpoint manager's atomic writer."""
    write_text(tag_dir / FINGERPRINT, json.dumps({"version": VERSION, "fields": fp}, indent=1, sort_keys=True))


def read(tag_dir: Path) -> dict[str, Any] | None:
    """The fields of `<tag_dir>/fingerprint.json`; None for a checkpoint written before fingerprints."""
    path = tag_dir / FINGERPRINT
    if not path.exists():
        return None
    try:
        doc = json.loads(path.read_text())
        return dict(doc["fields"])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a checkpoint fingerprint ({e}); the checkpoint is damaged") from None


@dataclasses.dataclass(frozen=True)
class Change:
    field: str
    old: Any
    new: Any

    def __str__(self) -> str:
        return f"{self.field}: {json.dumps(self.old)} -> {json.dumps(self.new)}"


@dataclasses.dataclass
class Comparison:
    """A checkpoint's fingerprint against this run's, sorted by what may be done about each change."""

    layout: list[Change]
    """Sharding of the engine state changed: needs elastic (universal-checkpoint) resume."""
    shape: list[Change]
    """The saved model does not fit this model: never acceptable."""
    accepted: list[Change]
    """Listed in checkpoint.accept_changes: resume, and let them take effect."""
    refused: list[Change]
    """Acceptable, but not accepted."""
    unused_accepts: list[str]
    """checkpoint.accept_changes entries that name no change (typos show up here)."""

    @property
    def ok(self) -> bool:
        return not (self.layout or self.shape or self.refused)

    def error(self, where: str) -> str:
        """The refusal, naming each field, its old and new value and what to do (empty when ok)."""
        lines = []
        if self.shape:
            lines.append(f"the model in {where} does not fit this run's model (these cannot be accepted; start a new "
                         f"output_dir, or use checkpoint.init_from_hf with an export of that run):")
            lines += [f"  {c}" for c in self.shape]
        if self.refused:
            fields = ",".join(c.field for c in self.refused)
            lines.append(f"this run changes settings of {where}; to resume with them anyway, add "
                         f"--set checkpoint.accept_changes=[{fields}] (or restore the old values):")
            for c in self.refused:
                note = f"  ({_LOADER_BOUND[c.field]})" if c.field in _LOADER_BOUND else ""
                lines.append(f"  {c}{note}")
        if self.layout:
            lines.append(f"the parallel layout differs from {where} (elastic resume converts the checkpoint when "
                         f"--set checkpoint.accept_changes=[parallel.layout] accepts it; see docs/elastic.md):")
            lines += [f"  {c}" for c in self.layout]
        return "\n".join(lines)


def compare(saved: dict[str, Any], current: dict[str, Any], accept: list[str]) -> Comparison:
    """Sort the fields that differ. A field missing on one side (an older fingerprint) counts as unchanged."""
    layout, shape, accepted, refused = [], [], [], []
    for field, new in current.items():
        if field not in saved or saved[field] == new:
            continue
        change = Change(field, saved[field], new)
        if field in LAYOUT_FIELDS:
            layout.append(change)
        elif field in SHAPE_FIELDS:
            shape.append(change)
        elif field in accept or (field == "optim.grad_accum" and _same_global_batch(saved, current)):
            # More or fewer micro-batches per rank that keep the global batch is how a job moves to another
            # data-parallel size (elastic resume): the optimization does not change, so it needs no acceptance.
            accepted.append(change)
        else:
            refused.append(change)
    named = {c.field for c in accepted}
    if layout:  # elastic resume (train/elastic.py) judges these; "parallel.layout" accepts them all
        named |= {"parallel.layout", *(c.field for c in layout)}
    return Comparison(layout, shape, accepted, refused, [a for a in accept if a not in named])


def _same_global_batch(saved: dict[str, Any], current: dict[str, Any]) -> bool:
    keys = ("data.micro_batch_size", "optim.grad_accum", "parallel.data_parallel_size")
    if not all(k in saved for k in keys):
        return False
    product = lambda fp: fp[keys[0]] * fp[keys[1]] * fp[keys[2]]  # noqa: E731
    return product(saved) == product(current)
