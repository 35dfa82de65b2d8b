"""Export a training checkpoint as an HF Emu3 directory (safetensors), without GPUs or a process group.

    python -m tools.export --checkpoint runs/demo/checkpoints/step_00000300 --out exported/
    python -m tools.export --checkpoint runs/demo/checkpoints --out exported/      # the newest complete one

Reads every checkpoint kind this trainer writes: ZeRO-1/2/3 shards (consolidated to fp32 with DeepSpeed's
zero_to_fp32), ZeRO-0 model states, and pipeline per-layer files. The model shape comes from the run's
resolved `config.yaml` (two levels above the checkpoint), or `--config`. Every file loads with
`torch.load(weights_only=True)` and the allow-list of train/safe_load.py (zero_to_fp32 included), so a
checkpoint with a planted pickle is refused, never run. The result loads with `UnifiedTransformer.from_hf`
and with `transformers.Emu3ForCausalLM.from_pretrained`.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import yaml

from model import ModelConfig, UnifiedTransformer
from train.checkpoint import CheckpointManager
from model.transformer import stage_key_to_hf
from train.safe_load import safe_torch_load, weights_only_torch_load

_LAYER_FILE = re.compile(r"^layer_(\d+)-model_states\.pt$")


def checkpoint_state_dict(tag_dir: Path, model_cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Whole fp32 weights under HF names from one checkpoint directory."""
    files = {p.name for p in tag_dir.iterdir()}
    layer_files = sorted(f for f in files if _LAYER_FILE.match(f))
    if layer_files:  # pipeline: one file per pipeline layer, keys relative to the layer
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


def load_checkpoint_model(checkpoint: str | Path, config: str | Path | None = None,
                          dtype: torch.dtype | None = None) -> tuple[UnifiedTransformer, Path, Path]:
    """A run directory, its checkpoints/ root (newest complete checkpoint) or one step_N directory ->
    (the model with that checkpoint's weights, on CPU; the step directory; the config.yaml it was shaped by).
    The one loader behind export, generation and analysis."""
    path = Path(checkpoint)
    spec = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    found = CheckpointManager.resolve(str(spec), spec) if spec.exists() else None
    if found is None:
        raise ValueError(f"{checkpoint}: no complete checkpoint")
    root, tag = found
    tag_dir = root / tag
    config = Path(config) if config else root.parent / "config.yaml"
    if not config.exists():
        raise ValueError(f"{config}: the run's config.yaml is needed for the model shape of {tag_dir} (pass --config)")
    doc = yaml.safe_load(config.read_text()) or {}
    model_cfg = ModelConfig.from_dict(doc.get("model", doc))
    state = checkpoint_state_dict(tag_dir, model_cfg)
    with torch.device("meta"):
        model = UnifiedTransformer(model_cfg)
    expected = {k for k, _ in model.named_parameters()}
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise ValueError(f"{tag_dir}: weights do not match {config}: missing {missing[:4]}, unexpected {extra[:4]}")
    model.load_state_dict({k: (v.to(dtype) if dtype else v) for k, v in state.items()}, strict=True, assign=True)
    return model, tag_dir, config


def export(checkpoint: str | Path, out: str | Path, config: str | Path | None = None,
           dtype: torch.dtype | None = None) -> Path:
    model, _, _ = load_checkpoint_model(checkpoint, config)
    model.save_hf(out, dtype=dtype)
    return Path(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.export", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="a step_NNNNNNNN directory, or a checkpoints/ root (newest)")
    p.add_argument("--out", required=True, help="HF directory to write")
    p.add_argument("--config", help="the run's config.yaml (default: next to the checkpoints/ root)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    args = p.parse_args(argv)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    try:
        out = export(args.checkpoint, args.out, args.config, dtype)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported {args.checkpoint} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
