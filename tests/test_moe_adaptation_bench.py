"""bench/moe_adaptation.py without its training runs: the static-width-pruning baseline's checkpoint computes
what the dense model computes with the low-importance neurons masked out (analysis/runner.py's masked MLP, an
independent path), and every row's trainer overrides make the config the study describes."""

from __future__ import annotations

import argparse

import pytest
import torch


def test_pruned_checkpoint_is_the_dense_model_with_its_least_important_neurons_masked(demo_dataset, tmp_path):
    from analysis.runner import Edits, run_hidden
    from bench import moe_adaptation as bench
    from model import UnifiedTransformer
    from tests.train_helpers import SMOKE, settings
    from train.config import RunConfig
    from train.moe_init import calibration_importance

    cfg = RunConfig.load(SMOKE, settings(demo_dataset, tmp_path, model__mod__capacity="{}")).model
    torch.manual_seed(3)
    UnifiedTransformer(cfg).save_hf(tmp_path / "dense")
    dst = bench.prune_checkpoint(tmp_path / "dense", tmp_path / "pruned", 0.25, str(demo_dataset))
    dense, pruned = UnifiedTransformer.from_hf(tmp_path / "dense"), UnifiedTransformer.from_hf(dst)
    F = cfg.intermediate_size
    assert pruned.config.intermediate_size == F // 4

    ft = bench._finetune_cfg(str(demo_dataset))
    imp = calibration_importance(tmp_path / "dense", demo_dataset, split="train",
                                 tasks=[t for t, w in ft.data.tasks.items() if w > 0],
                                 samples_per_task=bench.CALIB_SAMPLES, seq_len=ft.data.seq_len, layout=cfg.vocab)
    keep = {}
    for i in range(cfg.num_hidden_layers):
        mask = torch.zeros(F, dtype=torch.bool)
        mask[imp[i].argsort(descending=True)[:F // 4]] = True
        keep[i] = mask
        assert imp[i][mask].min() >= imp[i][~mask].max()  # the most important quarter
    ids = torch.randint(0, cfg.vocab.text_size, (2, 24))
    with torch.no_grad():
        want = run_hidden(dense, ids, Edits(mlp_keep=keep))
        got = run_hidden(pruned, ids)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(run_hidden(dense, ids), want, atol=1e-3)  # the mask matters


@pytest.mark.parametrize("row", ["dense_ft", "moe_task_k4", "moe_shared_k4", "moe_task_k2", "moe_task_s2k2",
                                 "moe_shared_s2k2", "prune_k4", "prune_k2"])
def test_rows_configure_what_the_study_says(row, demo_dataset, tmp_path):
    from bench import moe_adaptation as bench
    from train.config import RunConfig

    args = argparse.Namespace(data=str(demo_dataset), runs_dir=str(tmp_path), set=[])
    sets = bench.row_overrides(row, 2, tmp_path / "pretrain_hf", args)
    cfg = RunConfig.load(bench.FINETUNE_CONFIG, [f"data.dataset_dir={demo_dataset}", *sets])
    top_k, router, prune, shared = bench.ROWS[row]
    assert cfg.run.seed == cfg.data.seed == 2 and not cfg.model.mod.mod_layers()
    F = 352
    if top_k is None or prune:
        assert not cfg.model.moe.layers
        assert cfg.model.intermediate_size == (F * top_k // bench.E if prune else F)
        assert cfg.checkpoint.init_from_hf.endswith(f"pruned_k{top_k}" if prune else "pretrain_hf")
    else:
        moe = cfg.model.moe
        assert moe.layers == list(range(cfg.model.num_hidden_layers)) and moe.num_experts == bench.E
        assert (moe.top_k, moe.shared_experts, moe.router, moe.balance_loss_weight) == (
            top_k - shared, shared, router, bench.BALANCE)
        assert moe.active_experts == top_k
        assert cfg.model.intermediate_size == F and cfg.checkpoint.moe_calibration_samples == bench.CALIB_SAMPLES


def test_verdict_signs_and_standard_errors():
    """Advantages are positive when the first row is better (higher accuracy, lower perplexity), with the
    standard error of a difference of two seed means; the claim needs the half-active MoE within 1 point of
    dense and an advantage over pruning beyond 2 standard errors on every metric."""
    from bench import moe_adaptation as bench

    def row(u, g, p, sd, seeds=3, params=100):
        return {"understanding": u, "generation": g, "text_ppl": p, "understanding_sd": sd, "generation_sd": sd,
                "text_ppl_sd": sd, "seeds": seeds, "flops_actual": 1.0, "step_time_median_s": 1.0,
                "params": {"active_non_embedding": params}}

    table = {"dense_ft": row(0.95, 0.95, 4.0, 0.01), "moe_task_k4": row(0.945, 0.97, 4.2, 0.01, params=60),
             "prune_k4": row(0.90, 0.90, 4.5, 0.01, params=60)}
    v = bench.verdict(table)
    se = 100 * (0.01 ** 2 / 3 + 0.01 ** 2 / 3) ** 0.5
    assert v["moe_task_k4_vs_dense_ft"]["understanding"]["diff"] == pytest.approx(-0.5)
    assert v["moe_task_k4_vs_dense_ft"]["generation"]["diff"] == pytest.approx(2.0)
    assert v["moe_task_k4_vs_dense_ft"]["text_ppl"]["diff"] == pytest.approx(-0.2)  # higher perplexity: worse
    assert v["moe_task_k4_vs_dense_ft"]["understanding"]["se"] == pytest.approx(se)
    assert v["half_active_within_goal"] is True
    assert v["moe_task_k4_cost_vs_dense_ft"]["active_params"] == pytest.approx(0.6)
    adv = v["moe_task_k4_vs_prune_k4"]
    assert [adv[m]["diff"] for m in ("understanding", "generation", "text_ppl")] == pytest.approx([4.5, 7.0, 0.3])
    assert v["moe_beats_prune_k4"] is True
    table["prune_k4"] = row(0.94, 0.96, 4.25, 0.05)  # within noise: no win claimed
    assert bench.verdict(table)["moe_beats_prune_k4"] is False
    table["moe_task_k4"] = row(0.935, 0.97, 4.2, 0.01)
    assert bench.verdict(table)["half_active_within_goal"] is False
