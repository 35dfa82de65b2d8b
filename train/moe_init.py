"""The start of an MoE adaptation run: which dense neurons each expert gets, from calibration on the training split.

`checkpoint.init_from_hf` names a dense checkpoint and `model.moe` makes some of its MLPs experts. The loaders
(train/zero.py, train/stages.py, through model/hf.py `moe_layout`) cut each such MLP into E experts by the
snake partition of a per-neuron importance, so that every expert gets one neuron of every importance tier and
the experts start equally strong (the sparsity study's MoE-fication). This module computes that importance:

  - the dense checkpoint (its MoE layers, if any, as their dense equivalent) runs `checkpoint.
    moe_calibration_samples` samples of each training task (data.tasks) from the TRAINING split of
    data.dataset_dir, truncated to data.seq_len as training truncates them; never validation samples, which
    the evaluator scores;
  - a neuron's score per task is mean|h_j| * ||W_down[:, j]|| (analysis/metrics.py `neuron_scores`), each
    task's scores normalised per layer and averaged over tasks (`combine_task_scores`), the analysis probes'
    MoE conversion order.

Rank 0 computes it once and writes `<output_dir>/moe_importance.safetensors` (with what it was computed from
in its metadata); the other ranks read that file, and a resumed run reuses it, so every rank and every
restart cuts the same experts. The file is the record of the partition the run started from.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from train.log import log

IMPORTANCE_FILE = "moe_importance.safetensors"
CALIBRATION_BATCH = 8


def calibration_key(cfg) -> dict[str, str]:
    """What the importance depends on (the file's metadata; a file made from anything else is recomputed)."""
    return {"init_from_hf": str(Path(cfg.checkpoint.init_from_hf).resolve()),
            "dataset_dir": str(Path(cfg.data.dataset_dir).resolve()), "split": cfg.data.split,
            "tasks": json.dumps(sorted(t for t, w in cfg.data.tasks.items() if w > 0)),
            "samples_per_task": str(cfg.checkpoint.moe_calibration_samples), "seq_len": str(cfg.data.seq_len)}


def conversion_importance(cfg, device: torch.device) -> dict[int, torch.Tensor] | None:
    """{layer: [F] neuron importance} for the MoE layers of the run (cfg: train.config.RunConfig) that start as a
    dense MLP of `checkpoint.init_from_hf`; None when none does or `moe_calibration_samples` is 0 (the loaders
    then deal the neurons in index order). Collective: every rank calls it, rank 0 computes."""
    from model.hf import moe_layers_to_convert

    path = cfg.checkpoint.init_from_hf
    if not (path and cfg.model.moe.layers and cfg.checkpoint.moe_calibration_samples):
        return None
    layers = moe_layers_to_convert(cfg.model, path)
    if not layers:
        return None
    file = Path(cfg.run.output_dir) / IMPORTANCE_FILE
    key = calibration_key(cfg)
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    rank = torch.distributed.get_rank() if distributed else 0
    failed: Exception | None = None
    if rank == 0 and _read(file, key) is None:
        try:
            scores = calibrate(cfg, device)
            file.parent.mkdir(parents=True, exist_ok=True)
            from safetensors.torch import save_file

            tmp = file.with_name(file.name + ".tmp")
            save_file({"importance": scores.contiguous()}, str(tmp), metadata=key)
            os.replace(tmp, file)  # a crash mid-write leaves no half file that a restart would trust
            log.info(f"[train] MoE conversion: neuron importance from {cfg.checkpoint.moe_calibration_samples} "
                     f"training samples per task written to {file}")
        except Exception as e:  # raised after the barrier, so the other ranks stop too instead of waiting on it
            failed = e
    if distributed:
        torch.distributed.barrier()
    if failed is not None:
        raise failed
    scores = _read(file, key)
    if scores is None:
        raise RuntimeError(f"{file}: rank {rank} finds no MoE neuron importance from rank 0 (rank 0's log says why "
                           "if it failed; otherwise is run.output_dir on a filesystem every rank shares?)")
    return {layer: scores[layer] for layer in layers}


def read_importance(cfg) -> dict[int, torch.Tensor] | None:
    """The importance `conversion_importance` wrote for this run's converted layers, or None (no such file, or
    one computed from other calibration)."""
    from model.hf import moe_layers_to_convert

    scores = _read(Path(cfg.run.output_dir) / IMPORTANCE_FILE, calibration_key(cfg))
    if scores is None:
        return None
    return {layer: scores[layer] for layer in moe_layers_to_convert(cfg.model, cfg.checkpoint.init_from_hf)}


def start_neuron_groups(cfg) -> dict[int, torch.Tensor]:
    """{layer: [E, F/E]} the dense neurons each expert was cut from at the start of the run (what the loaders cut
    with the same importance), for the HF export: it then writes each MoE layer's dense equivalent in the source
    checkpoint's neuron order. Empty when the run did not start from an HF checkpoint that still exists."""
    from model.hf import moe_layout

    path = cfg.checkpoint.init_from_hf
    if not (path and cfg.model.moe.layers and Path(path).exists()):
        return {}
    importance = read_importance(cfg) if cfg.checkpoint.moe_calibration_samples else None
    return moe_layout(cfg.model, path, importance)[0]


def _read(file: Path, key: dict[str, str]) -> torch.Tensor | None:
    """The [L, F] importance in `file` if it was computed from `key`, else None."""
    from safetensors import safe_open

    if not file.exists():
        return None
    with safe_open(str(file), framework="pt") as f:
        if f.metadata() != key:
            return None
        return f.get_tensor("importance")


def calibrate(cfg, device: torch.device) -> torch.Tensor:
    """[L, F] importance of the run's `init_from_hf` MLP neurons on its training split's calibration samples."""
    return calibration_importance(cfg.checkpoint.init_from_hf, cfg.data.dataset_dir, split=cfg.data.split,
                                  tasks=[t for t, w in cfg.data.tasks.items() if w > 0],
                                  samples_per_task=cfg.checkpoint.moe_calibration_samples, seq_len=cfg.data.seq_len,
                                  layout=cfg.model.vocab, device=device)


def calibration_importance(path, dataset_dir, *, split: str, tasks: list[str], samples_per_task: int, seq_len: int,
                           layout, device: torch.device | str = "cpu") -> torch.Tensor:
    """[L, F] importance of the MLP neurons of the HF checkpoint at `path` (its MoE layers as their dense
    equivalent): `samples_per_task` samples of each of `tasks` from `split` of `dataset_dir`, cut to `seq_len`,
    scored per task and combined (module docstring). Also what bench/moe_adaptation.py prunes by."""
    from analysis.metrics import combine_task_scores, neuron_scores
    from analysis.samples import load_task_samples, make_batches, open_dataset
    from model.transformer import UnifiedTransformer

    net = UnifiedTransformer.from_hf(path, moe={"layers": []}, vocab=layout).to(device).eval()
    manifest = open_dataset(str(dataset_dir), layout)
    per_task = []
    for task in tasks:
        samples = load_task_samples(manifest, split, task, samples_per_task)
        for s in samples:
            s.ids, s.labels = s.ids[:seq_len], s.labels[:seq_len]
        per_task.append(neuron_scores(net, make_batches(samples, CALIBRATION_BATCH, layout.pad_id, device)))
    del net  # before the training model is built
    return combine_task_scores(per_task)
