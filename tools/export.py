"""Export a training checkpoint as an HF Emu3 directory (safetensors), without GPUs or a process group.

    python -m tools.export --checkpoint runs/demo/checkpoints/step_00000300 --out exported/
    python -m tools.export --checkpoint runs/demo/checkpoints --out exported/      # the newest complete one

Reads every checkpoint kind this trainer writes, through `tools.checkpoints.open_checkpoint`: ZeRO-1/2/3
shards (consolidated to fp32 with DeepSpeed's zero_to_fp32), ZeRO-0 model states, and pipeline per-layer
files. The model shape comes from the run's `config.yaml` (two levels above the checkpoint), or `--config`.
Every file loads with `torch.load(weights_only=True)` and the allow-list of train/safe_load.py (zero_to_fp32
included), so a checkpoint with a planted pickle is refused, never run. The result loads with
`UnifiedTransformer.from_hf` and with `transformers.Emu3ForCausalLM.from_pretrained`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from tools.checkpoints import open_checkpoint


def export(checkpoint: str | Path, out: str | Path, config: str | Path | None = None,
           dtype: torch.dtype | None = None) -> Path:
    open_checkpoint(checkpoint, config).model.save_hf(out, dtype=dtype)
    return Path(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.export", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True,
                   help="a step_NNNNNNNN directory, a checkpoints/ root (newest) or a run directory")
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
