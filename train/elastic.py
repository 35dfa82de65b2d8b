"""Elastic resume: continue a run on another data-parallel world size, or across ZeRO and the pipeline.

A DeepSpeed checkpoint is written for one layout (mode, pipeline stages, data-parallel size, ZeRO stage):
ZeRO shards the fp32 weights and Adam moments over the data-parallel ranks, the pipeline splits them by
layer under its own parameter names. Loading it under another layout goes through DeepSpeed's universal
checkpoint (`deepspeed.checkpoint.ds_to_universal`): one folder per parameter holding the whole fp32 weight
and its whole `exp_avg` / `exp_avg_sq`, which any layout re-partitions on load (`"checkpoint":
{"load_universal": true}`). What this module adds around it:

- `Layout` of a checkpoint (its `fingerprint.json` when the checkpoint has one, else what DeepSpeed's file
  names say) and of this run; `resume_plan` decides: load as is, or convert.
- `convert_to_universal`: rank 0 converts once into `<tag>/universal_<mode>` (written under a temporary
  name and renamed, so a crash mid-conversion leaves nothing that is ever loaded), then the small bridges
  DeepSpeed 0.19.8 lacks (below); every rank waits at a barrier.
- `load`: `engine.load_checkpoint` on the converted folder, then the repair of ZeRO-3's hyperparameters.

Bridges (what ds_to_universal / the universal loaders of 0.19.8 do not do for us, kept as small as possible):

1. `universal_checkpoint_info`: ZeRO-1/2 and pipeline checkpoints lack it (Megatron-DeepSpeed sets it on its
   module); ds_to_universal's own `inject_missing_state` fills the empty default, right for this model (no
   tensor parallelism, no padded vocabulary, no parameter replicated across pipeline stages: untied head).
2. Parameter names: the pipeline names a tensor `<layer index>.<rest>` (`3.mlp.up_proj.weight`), the plain
   model by its HF name (`model.layers.2.mlp.up_proj.weight`). Each per-parameter folder is renamed with
   model/transformer.py's key mappers (`stage_key_to_hf`, `hf_key_to_stage`) when the mode changes.
3. Loader formats: the ZeRO-3 loader reads `optimizer_state.pt["optimizer_state_dict"]` and the Adam step
   from it, the ZeRO-1/2 loader `optimizer_state.pt["param_groups"]`, `ds_version` and a `step.pt` per
   parameter, and each globs its own model-states file name (`zero_pp_rank_0_mp_rank_*` vs `mp_rank_*`);
   the converted folder gets both forms, copied from what the conversion wrote.
4. ZeRO-3's universal loader sets every optimizer group's hyperparameters from group 0, so the no-decay
   group (norms, MoD routers) would silently get weight decay; `load` puts each group's back.
5. ZeRO-3's universal loader gives every optimizer group one shared Adam `step` tensor, which AdamW then
   increments once per group per step (the bias correction runs ahead); `load` gives each its own.

Exact: the fp32 weights, Adam moments, Adam step, LR-scheduler state and the step counter (the universal
folder holds the consolidated tensors bit for bit, tests/test_elastic.py checks it). Not exact: the batch
order after the switch (data/loader.py `load_state_dict(elastic=True)` restarts the epoch at the same
global number of micro-batches, but the new ranks read other shards in another order), and the reduction
order of gradients over a different number of ranks (float rounding). Keep the global batch the same
(scale optim.grad_accum by old dp / new dp), or the optimisation itself changes.

A ZeRO-0 checkpoint (fp32 or fp16) keeps the whole optimizer in `mp_rank_00_model_states.pt`, replicated:
another data-parallel size loads it as it is; another mode or ZeRO stage cannot (it has no ZeRO shards for
ds_to_universal, and a ZeRO-0 engine cannot load a universal checkpoint: DeepSpeed restores weights from
it only through a ZeRO optimizer).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from train import fingerprint as fingerprints
from train.checkpoint import CheckpointManager
from train.config import MODES
from train.launch import distributed
from train.log import log
from train.safe_load import safe_torch_load, weights_only_torch_load

_UNIVERSAL = "universal_{mode}"   # converted folder inside the tag directory; the names depend on the mode


@dataclasses.dataclass(frozen=True)
class Layout:
    """How a run is laid out over its ranks: what a checkpoint's files depend on."""

    mode: str             # zero | pipeline
    world_size: int
    pipeline_stages: int  # 1 under mode zero
    zero_stage: int       # 0 | 1 | 2 | 3 (a checkpoint read from file names reports 1 for "1 or 2")
    sharded: bool | None = None
    """The optimizer state is ZeRO-partitioned (stage >= 1, or DeepSpeed's bf16 optimizer); None: from
    zero_stage."""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"layout mode must be one of {MODES}, got {self.mode!r}")
        if self.world_size < 1 or self.pipeline_stages < 1 or self.world_size % self.pipeline_stages:
            raise ValueError(f"layout world_size={self.world_size} is not a positive multiple of "
                             f"pipeline_stages={self.pipeline_stages}")
        if self.mode == "zero" and self.pipeline_stages != 1:
            raise ValueError("layout mode zero has pipeline_stages 1")
        if self.sharded is None:
            object.__setattr__(self, "sharded", self.zero_stage >= 1)

    @property
    def dp_size(self) -> int:
        return self.world_size // self.pipeline_stages

    def same_files_as(self, other: "Layout") -> bool:
        """Whether DeepSpeed's plain load works: ZeRO-1 and ZeRO-2 write the same files."""
        def family(stage: int) -> int:
            return {0: 0, 3: 3}.get(stage, 1)
        return (self.mode, self.pipeline_stages, self.dp_size, family(self.zero_stage), self.sharded) == \
            (other.mode, other.pipeline_stages, other.dp_size, family(other.zero_stage), other.sharded)

    def describe(self) -> str:
        stages = f", {self.pipeline_stages} stages" if self.mode == "pipeline" else ""
        return f"{self.mode}{stages}, data-parallel {self.dp_size}, ZeRO stage {self.zero_stage}"

    @classmethod
    def of_run(cls, mode: str, world_size: int, pipeline_stages: int, ds_config: dict[str, Any]) -> "Layout":
        stage = int(ds_config.get("zero_optimization", {}).get("stage", 0))
        bf16 = bool(ds_config.get("bf16", {}).get("enabled", False))
        # DeepSpeed steps bf16 without ZeRO through its BF16_Optimizer, which shards like ZeRO-1.
        return cls(mode, world_size, pipeline_stages if mode == "pipeline" else 1, stage, sharded=stage >= 1 or bf16)

    @classmethod
    def of_checkpoint(cls, tag_dir: str | Path) -> "Layout":
        """From `fingerprint.json` when the checkpoint has one, else from DeepSpeed's file names and our
        trainer_state_rank*.json files (no pickle is opened)."""
        tag_dir = Path(tag_dir)
        d = fingerprints.read(tag_dir)
        if d is not None:
            try:
                stage = int(d["parallel.zero_stage"])
                return cls(str(d["parallel.mode"]), int(d["parallel.world_size"]),
                           int(d.get("parallel.pipeline_stages") or 1), stage,
                           sharded=stage >= 1 or d.get("parallel.precision") == "bf16")
            except KeyError as e:
                raise ValueError(f"{tag_dir / fingerprints.FINGERPRINT}: field {e.args[0]} is missing") from None
        names = [p.name for p in tag_dir.iterdir()]
        world = sum(1 for n in names if re.fullmatch(r"trainer_state_rank\d+\.json", n))
        if world == 0:
            raise ValueError(f"{tag_dir}: no trainer_state_rank*.json, so not a checkpoint of this trainer")
        pipeline = any(re.fullmatch(r"layer_\d+-model_states\.pt", n) for n in names)
        stages = sum(1 for n in names if re.fullmatch(r"mp_rank_\d+_model_states\.pt", n)) if pipeline else 1
        optim = [n for n in names if re.fullmatch(r"(bf16_)?zero_pp_rank_\d+_mp_rank_\d+_optim_states\.pt", n)]
        if any(re.fullmatch(r"zero_pp_rank_\d+_mp_rank_\d+_model_states\.pt", n) for n in names):
            stage = 3
        elif optim and not any(n.startswith("bf16_") for n in optim):
            stage = 1  # or 2: the same files
        else:
            stage = 0
        return cls("pipeline" if pipeline else "zero", world, max(1, stages), stage, sharded=bool(optim))


@dataclasses.dataclass(frozen=True)
class ResumePlan:
    """What `engine.load_checkpoint` gets, and where the trainer state lives."""

    old: Layout
    new: Layout
    action: str            # same | replicated | universal
    state_dir: Path        # the checkpoint's tag directory: trainer_state_rank*.json
    load_dir: Path         # engine.load_checkpoint(load_dir, tag)
    tag: str

    @property
    def universal(self) -> bool:
        return self.action == "universal"

    @property
    def changed(self) -> bool:
        return self.action != "same"


def resume_plan(root: Path, tag: str, old: Layout, new: Layout, accept: bool,
                accept_field: str = "checkpoint.accept_changes") -> ResumePlan:
    """Decide how a checkpoint written under `old` loads under `new`. Raises ValueError naming the field and
    the fix when the layout changed and `accept` is false, or when no DeepSpeed path supports the change."""
    tag_dir = Path(root) / tag
    if old.same_files_as(new):
        return ResumePlan(old, new, "same", tag_dir, Path(root), tag)
    where = f"checkpoint {tag_dir} was written with {old.describe()}; this run has {new.describe()}"
    if not accept:
        raise ValueError(f"{where}. Resuming on another layout keeps the weights, Adam moments, LR schedule and "
                         f"step but not the batch order (docs/elastic.md); accept it with "
                         f"--set {accept_field}=[{LAYOUT_ACCEPT}], or launch with the checkpoint's layout")
    if not old.sharded:
        if old.mode == new.mode and old.pipeline_stages == new.pipeline_stages and not new.sharded:
            # ZeRO-0 replicates the whole optimizer in mp_rank_00: any data-parallel size loads it as is.
            return ResumePlan(old, new, "replicated", tag_dir, Path(root), tag)
        raise ValueError(f"{where}: a ZeRO-0 checkpoint has no ZeRO shards for DeepSpeed's universal checkpoint, so "
                         f"it only resumes with the same mode and zero_optimization.stage 0 (any data-parallel "
                         f"size); resume it that way, then save under a ZeRO stage >= 1 to move")
    if not new.sharded:
        raise ValueError(f"{where}: DeepSpeed restores a universal checkpoint only through a ZeRO optimizer, and this "
                         f"run's zero_optimization.stage is 0; use stage 1 or more in the DeepSpeed JSON")
    return ResumePlan(old, new, "universal", tag_dir, tag_dir, _UNIVERSAL.format(mode=new.mode))


# ----- conversion (rank 0) ----------------------------------------------------------------------------------------
def _rename_params(zero_dir: Path, rename: Callable[[str], str]) -> None:
    for p in sorted(zero_dir.iterdir()):
        if p.is_dir():
            new = rename(p.name)
            if new != p.name:
                if (zero_dir / new).exists():
                    raise RuntimeError(f"{zero_dir}: {p.name} and {new} map to the same parameter")
                p.rename(zero_dir / new)


def _shape_zero3_states(out: Path) -> None:
    """ZeRO-3's conversion stores each state as a flat tensor; the ZeRO-1/2 loader reads {"param": tensor of
    the parameter's shape}, which the ZeRO-3 loader reads as well (bridge 3)."""
    states = sorted(out.glob("zero_pp_rank_*_mp_rank_*_model_states.pt"))
    if not states:
        return
    shapes = {k: v for group in safe_torch_load(states[0], map_location="cpu")["param_shapes"]
              for k, v in group.items()}
    for name, shape in shapes.items():
        for f in (out / "zero" / name).glob("*.pt"):
            x = safe_torch_load(f, map_location="cpu")
            if f.name != "step.pt" and torch.is_tensor(x):
                torch.save({"param": x.reshape(shape), "cat_dim": 0}, f)


def _bridge_formats(out: Path) -> None:
    """Give the converted folder what both DeepSpeed universal loaders read (bridge 3 of the docstring)."""
    zero = out / "zero"
    path = zero / "optimizer_state.pt"
    sd = safe_torch_load(path, map_location="cpu")
    params = [p for p in sorted(zero.iterdir()) if p.is_dir()]
    if "optimizer_state_dict" in sd:  # from ZeRO-3: the step is global, per-parameter step.pt missing
        step = sd["optimizer_state_dict"]["state"][0]["step"]
        sd.setdefault("param_groups", sd["optimizer_state_dict"]["param_groups"])
        for p in params:
            if not (p / "step.pt").exists():
                torch.save(step, p / "step.pt")
    else:  # from ZeRO-1/2 or the pipeline: one step.pt per parameter, equal everywhere
        steps = {float(safe_torch_load(p / "step.pt")) for p in params if (p / "step.pt").exists()}
        if len(steps) != 1:
            raise RuntimeError(f"{zero}: expected one Adam step over all parameters, found {sorted(steps)}")
        step = torch.tensor(steps.pop())
        groups = [{k: v for k, v in g.items()} for g in sd["param_groups"]]
        sd["optimizer_state_dict"] = {"state": {i: {"step": step.clone()} for i in range(len(groups))},
                                      "param_groups": groups}
    if "ds_version" not in sd:
        import deepspeed

        sd["ds_version"] = deepspeed.__version__
    torch.save(sd, path)
    # One model-states file per model-parallel rank (pipeline stage), under both names: DeepSpeed checks their
    # count against the mp_world_size saved inside them.
    by_mp: dict[int, Path] = {}
    for f in sorted(out.glob("*model_states.pt")):
        m = re.fullmatch(r"(?:zero_pp_rank_0_)?mp_rank_(\d+)_model_states\.pt", f.name)
        if m:
            by_mp.setdefault(int(m.group(1)), f)
    if not by_mp:
        raise RuntimeError(f"{out}: the conversion wrote no mp_rank_*_model_states.pt")
    for mp, src in by_mp.items():
        for name in (f"mp_rank_{mp:02d}_model_states.pt", f"zero_pp_rank_0_mp_rank_{mp:02d}_model_states.pt"):
            if not (out / name).exists():
                shutil.copy2(src, out / name)


def convert_to_universal(tag_dir: str | Path, old: Layout, new: Layout, num_layers: int) -> Path:
    """Rank-0 work: `<tag_dir>/universal_<new.mode>`, converted once and reused. Written into a temporary
    sibling and renamed, so the final folder exists only complete."""
    from deepspeed.checkpoint import ds_to_universal

    from model.transformer import hf_key_to_stage, stage_key_to_hf

    tag_dir = Path(tag_dir)
    final = tag_dir / _UNIVERSAL.format(mode=new.mode)
    if final.is_dir():
        return final
    for stale in tag_dir.glob(final.name + ".tmp*"):  # an earlier conversion that crashed
        shutil.rmtree(stale, ignore_errors=True)
    tmp = tag_dir / f"{final.name}.tmp{os.getpid()}"
    args = dict(input_folder=str(tag_dir), output_folder=str(tmp), num_extract_workers=1, num_merge_workers=1,
                keep_temp_folder=False, strict=True,
                inject_missing_state=True)  # bridge 1: the empty universal_checkpoint_info is right for this model
    try:
        # DeepSpeed's converter calls torch.load(weights_only=False) itself: inside this block that is
        # train/safe_load.py's weights_only load with its allow-list.
        with weights_only_torch_load():
            import argparse

            ds_to_universal.main(argparse.Namespace(**args))
            _shape_zero3_states(tmp)
            if old.mode != new.mode:  # bridge 2
                to_new = (lambda k: stage_key_to_hf(k, num_layers)) if old.mode == "pipeline" else \
                    (lambda k: hf_key_to_stage(k, num_layers))
                _rename_params(tmp / "zero", to_new)
            _bridge_formats(tmp)
        (tmp / "elastic.json").write_text(json.dumps({"from": dataclasses.asdict(old), "names_for": new.mode}))
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        # ds_to_universal points <parent>/latest_universal at its output folder; we always pass the tag.
        (tag_dir / "latest_universal").unlink(missing_ok=True)
    return final


def prepare(plan: ResumePlan, rank: int, ds_config: dict[str, Any], num_layers: int) -> None:
    """Before the engine is built, on every rank: convert on rank 0 (cached), wait, and switch DeepSpeed's
    `checkpoint.load_universal` on in `ds_config` (read at `deepspeed.initialize`). A failed conversion
    on rank 0 is reported on every rank instead of hanging the others at the barrier."""
    if not plan.universal:
        return
    error = None
    if rank == 0:
        try:
            convert_to_universal(plan.state_dir, plan.old, plan.new, num_layers)
        except Exception as e:  # noqa: BLE001 - re-raised below on every rank
            error = e
    failed = torch.tensor([1.0 if error is not None else 0.0])
    if distributed():
        dist.all_reduce(failed)  # the barrier, carrying rank 0's outcome
    if error is not None:
        raise RuntimeError(f"converting {plan.state_dir} to a universal checkpoint failed: {error}") from error
    if failed.item():
        raise RuntimeError(f"rank 0 failed to convert {plan.state_dir} to a universal checkpoint (see its log)")
    ds_config.setdefault("checkpoint", {})["load_universal"] = True


def load(engine, plan: ResumePlan, ckpt: CheckpointManager) -> dict[str, Any]:
    """`ckpt.load` of the plan's (converted) checkpoint, with the trainer state from the original tag (rank 0's
    when the old run had fewer ranks: the step and loader position are the same on every rank), then the
    repairs a universal load needs."""
    saved_groups = None
    if plan.universal:
        saved_groups = safe_torch_load(plan.load_dir / plan.tag / "zero" / "optimizer_state.pt",
                                       map_location="cpu")["param_groups"]
    # engine.load_checkpoint runs inside train/safe_load.py's guard (install_safe_checkpoint_engine).
    state = ckpt.load(engine, plan.load_dir, plan.tag, state_dir=plan.state_dir)
    if saved_groups is not None:
        _repair_after_universal_load(engine, saved_groups)
    return state


def _repair_after_universal_load(engine, saved_groups: list[dict[str, Any]]) -> None:
    """Bridges 4 and 5: ZeRO-3's universal loader copies group 0's hyperparameters into every optimizer group
    (weight decay on norms and routers), and hands every group the same Adam `step` tensor, which AdamW then
    increments once per group per step (a wrong bias correction from the first step on)."""
    opt = engine.optimizer.optimizer if hasattr(engine.optimizer, "optimizer") else engine.optimizer
    if len(opt.param_groups) != len(saved_groups):
        raise RuntimeError(f"the checkpoint has {len(saved_groups)} optimizer groups, this run {len(opt.param_groups)}")
    for group, saved in zip(opt.param_groups, saved_groups):
        group.update({k: v for k, v in saved.items() if k != "params"})
    for state in opt.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


# ----- the trainer's hook -----------------------------------------------------------------------------------------
LAYOUT_ACCEPT = "parallel.layout"


def accepts_layout_change(accept_changes: list[str], old: Layout, new: Layout) -> bool:
    """`checkpoint.accept_changes` allows a layout change with `parallel.layout` (any), or by naming every
    changed field as train/fingerprint.py does (parallel.world_size, parallel.data_parallel_size, ...)."""
    if LAYOUT_ACCEPT in accept_changes:
        return True
    changed = {f"parallel.{k}" for k, a, b in (("world_size", old.world_size, new.world_size),
                                                ("data_parallel_size", old.dp_size, new.dp_size),
                                                ("mode", old.mode, new.mode),
                                                ("pipeline_stages", old.pipeline_stages, new.pipeline_stages),
                                                ("zero_stage", old.zero_stage, new.zero_stage)) if a != b}
    return changed <= set(accept_changes)


def before_engine(cfg, ds_config: dict[str, Any], rank: int, world_size: int) -> ResumePlan | None:
    """Called by the Trainer on every rank before it builds the engine: the checkpoint `checkpoint.resume`
    names (None when there is none), compared with this run's layout, converted when the layout changed and
    the run accepts that. Mutates `ds_config` (load_universal) for `deepspeed.initialize`."""
    found = CheckpointManager.resolve(cfg.checkpoint.resume, Path(cfg.run.output_dir) / "checkpoints")
    if found is None:
        return None
    root, tag = found
    old = Layout.of_checkpoint(root / tag)
    new = Layout.of_run(cfg.parallel.mode, world_size, cfg.parallel.pipeline_stages, ds_config)
    accept = accepts_layout_change(list(cfg.checkpoint.accept_changes), old, new)
    plan = resume_plan(root, tag, old, new, accept)
    prepare(plan, rank, ds_config, cfg.model.num_hidden_layers)
    if plan.changed:
        how = "via DeepSpeed's universal checkpoint" if plan.universal else "as is (ZeRO-0 replicates the optimizer)"
        log.info(f"[train] elastic resume {how}: {old.describe()} -> {new.describe()}; the batch order from here on "
                 f"differs from an uninterrupted run")
    return plan
