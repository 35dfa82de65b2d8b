"""bench/moe_speed.py on a tiny shape: its FLOPs column is what FlopCounterMode counts for the three steps it
times (the MoE step: the k slots per token through the experts' matmuls plus the task-aware router)."""

from __future__ import annotations

import argparse

import torch
from torch.utils.flop_counter import FlopCounterMode


def test_moe_speed_counts_the_flops_it_times(tmp_path):
    from bench import moe_speed
    from model.config import ModelConfig
    from model.layers import MLP
    from model.moe import MoEMLP

    result = moe_speed.main(["--shapes", "debug", "--top-k", "2", "--tokens", "64", "--repeats", "1",
                             "--warmup", "0", "--out", str(tmp_path / "r.json")])
    (row,) = result["rows"]
    assert (tmp_path / "r.md").exists() and (tmp_path / "r.png").exists()
    assert row["overhead"] > 0 and row["speedup_vs_full"] > 0 and 1.0 <= row["busiest_expert_x_E"] <= 8

    cfg = ModelConfig.from_preset("debug")
    args = argparse.Namespace(tokens=64)
    x = torch.randn(args.tokens, cfg.hidden_size, requires_grad=True)
    task = torch.randint(0, 3, (args.tokens,))
    full = MLP(cfg)
    moe = MoEMLP.from_dense(full, torch.rand(cfg.intermediate_size), 8, 2, num_tasks=3, router="task")
    with torch.no_grad():
        moe.router.weight.normal_()
    counted = {}
    for name, fn in (("dense_full", lambda: full(x)), ("moe", lambda: moe.dispatch(x, task, apply_capacity=False)[0])):
        with FlopCounterMode(display=False) as fc:
            fn().square().mean().backward()
        counted[name] = fc.get_total_flops()
    assert counted == {k: row["flops"][k] for k in counted}
