"""One reader for every checkpoint directory the tools are pointed at: `open_checkpoint(path)`.

    ckpt = open_checkpoint("runs/demo")          # -> OpenedCheckpoint(model, kind, step_dir, run_config, ...)
    ckpt.model                                   # UnifiedTransformer with the checkpoint's weights, CPU, eval mode

`path` may be
  - an HF Emu3 directory (`config.json` + weights, e.g. a run's `hf/` or `python -m tools.export` output):
    `UnifiedTransformer.from_hf`; the run config is the `config.yaml` beside it, if any;
  - a run directory (`config.yaml` + `checkpoints/`), a `checkpoints/` root (its newest complete checkpoint,
    train/checkpoint.py) or one `step_NNNNNNNN` directory, in any layout this trainer writes: ZeRO-1/2/3
    shards (consolidated to fp32 with DeepSpeed's zero_to_fp32), ZeRO-0 model states, or pipeline per-layer
    files (keys mapped with `model.transformer.stage_key_to_hf`). The model shape comes from the run's
    `config.yaml` two levels above the step directory, or `config=`.

Every DeepSpeed file loads with `torch.load(weights_only=True)` and the allow-list of train/safe_load.py
(zero_to_fp32 included), so a checkpoint with a planted pickle is refused with `UnsafeCheckpointError`, never
run. train/safe_load.py and zero_to_fp32 import DeepSpeed, so they are imported only when a DeepSpeed
checkpoint is read: opening an HF directory never imports DeepSpeed.

The run's config.yaml is read by `RunConfig.load`, the trainer's own reader. A config written by another
version of the trainer (a field since removed, say) may not pass its checks; the weights still need only the
model section, so then that section alone is read (`ModelConfig.from_dict`), `run_config` is None and a
warning names the reason.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from model import ModelConfig, UnifiedTransformer
from train.config import RunConfig, read_config_doc

_LAYER_FILE = re.compile(r"^layer_(\d+)-model_states\.pt$")


@dataclass
class OpenedCheckpoint:
    model: UnifiedTransformer
    """The checkpoint's weights, on CPU, in eval mode."""
    kind: str
    """hf | deepspeed: which kind of directory it came from."""
    source: Path
    """The directory given to open_checkpoint."""
    step_dir: Path | None
    """The step_NNNNNNNN directory read (None for an HF directory)."""
    run_config: RunConfig | None
    """The run's config.yaml, when one was found and RunConfig accepts it (gives the dataset directory)."""
    config_path: Path | None
    """The config.yaml that was read, if any (also when only its model section could be)."""

    @property
    def description(self) -> str:
        """What was opened, for reports."""
        if self.kind == "hf":
            return f"HF directory {self.source}"
        return f"checkpoint {self.step_dir} (shape from {self.config_path})"


def open_checkpoint(path: str | Path, config: str | Path | None = None,
                    dtype: torch.dtype | None = None) -> OpenedCheckpoint:
    """The model of any checkpoint directory (see the module docstring); ValueError naming the path when there
    is none. `config` overrides the run's config.yaml of a DeepSpeed checkpoint; `dtype` casts the weights
    (default: fp32 for DeepSpeed checkpoints, the stored dtype for HF directories)."""
    path = Path(path)
    if (path / "config.json").is_file():
        model = UnifiedTransformer.from_hf(path, dtype=dtype).eval()
        beside = path.parent / "config.yaml"
        config_path = beside if beside.is_file() else None
        run_config = None
        if config_path:
            try:
                run_config = _read_run_config(config_path)[0]
            except ValueError as e:  # the weights do not need it: only --data defaults come from it
                _warn(f"{config_path}: not read ({e})")
        return OpenedCheckpoint(model, "hf", path, None, run_config, config_path)

    tag_dir = _step_dir(path)
    config_path = Path(config) if config else tag_dir.parent.parent / "config.yaml"
    if not config_path.is_file():
        raise ValueError(f"{config_path}: the run's config.yaml is needed for the model shape of {tag_dir} "
                         f"(pass --config)")
    run_config, model_cfg = _read_run_config(config_path)
    state = deepspeed_state_dict(tag_dir, model_cfg)
    with torch.device("meta"):
        model = UnifiedTransformer(model_cfg)
    expected = {k for k, _ in model.named_parameters()}
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise ValueError(f"{tag_dir}: weights do not match {config_path}: missing {missing[:4]}, "
                         f"unexpected {extra[:4]}")
    model.load_state_dict({k: (v.to(dtype) if dtype else v) for k, v in state.items()}, strict=True, assign=True)
    return OpenedCheckpoint(model.eval(), "deepspeed", path, tag_dir, run_config, config_path)


def _step_dir(path: Path) -> Path:
    """The step directory a run directory, checkpoints/ root or step directory stands for."""
    from train.checkpoint import CheckpointManager

    if not path.exists():
        raise ValueError(f"{path}: no complete checkpoint there (the path does not exist)")
    spec = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    try:
        found = CheckpointManager.resolve(str(spec), spec)
    except ValueError:
        found = None
    if found is None:
        raise ValueError(f"{path}: no complete checkpoint (not an HF directory with config.json, nor a run "
                         f"directory, checkpoints/ root or step_NNNNNNNN directory with a COMPLETE checkpoint)")
    root, tag = found
    return root / tag


def _read_run_config(path: Path) -> tuple[RunConfig | None, ModelConfig]:
    """(the run config, its model config); (None, the model section alone) when RunConfig refuses the file."""
    try:
        run_config = RunConfig.load(path)
        return run_config, run_config.model
    except ValueError as e:
        refused = e
    doc = read_config_doc(path)  # raises ValueError naming the file when it is not YAML at all
    if not isinstance(doc.get("model"), dict):
        raise refused
    try:
        model_cfg = ModelConfig.from_dict(doc["model"])
    except ValueError:
        raise refused from None
    _warn(f"{path}: read only its model section; as a run config it is refused: {refused}")
    return None, model_cfg


def _warn(msg: str) -> None:
    from train.log import log

    log.warning(f"warning: {msg}")


def deepspeed_state_dict(tag_dir: Path, model_cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Whole fp32 weights under HF names from one DeepSpeed step directory (any layout this trainer writes)."""
    from train.safe_load import safe_torch_load, weights_only_torch_load  # imports DeepSpeed

    files = {p.name for p in tag_dir.iterdir()}
    layer_files = sorted(f for f in files if _LAYER_FILE.match(f))
    if layer_files:  # pipeline: one file per pipeline layer, keys relative to the layer
        from model.transformer import stage_key_to_hf

        state = {}
        for f in layer_files:
            idx = int(_LAYER_FILE.match(f).group(1))
            for k, v in safe_torch_load(tag_dir / f, map_location="cpu").items():
                state[stage_key_to_hf(f"{idx}.{k}", model_cfg.num_hidden_layers)] = v.float()
        return state
    if any(f.startswith("zero_pp_rank_") and f.endswith("optim_states.pt") for f in files):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with weights_only_torch_load():  # zero_to_fp32 calls torch.load(weights_only=False) itself
            return dict(get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name))
    model_file = tag_dir / "mp_rank_00_model_states.pt"
    if model_file.exists():
        return {k: v.float() for k, v in safe_torch_load(model_file, map_location="cpu")["module"].items()}
    raise ValueError(f"{tag_dir}: no DeepSpeed model states found (not a checkpoint of this trainer)")
