"""The UniMoD recipe end to end at a few steps (bench/unimod_recipe.py, which scripts/unimod_recipe.sh runs):
dense pre-training, the analysis and its plan, dense and UniMoD fine-tunes from the pretrained weights on the
same data order, the table, and a rerun that finds everything done."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors import safe_open
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

REPO = Path(__file__).resolve().parents[1]


def _recipe(runs: Path, data: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / "bench" / "unimod_recipe.py"), "--runs-dir", str(runs), "--data", str(data),
           "--pretrain-steps", "30", "--finetune-steps", "15", "--jobs", "2", "--threads", "1", "--calib-samples", "12",
           "--set", "logging.log_every=5", *extra]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)


def _metrics(run: Path) -> list[dict]:
    """The training-step lines of a run's metrics.jsonl (evaluation lines carry no loss)."""
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line]
    return [r for r in lines if "loss/total" in r]


@pytest.fixture(scope="module")
def recipe(demo_dataset, tmp_path_factory):
    runs = tmp_path_factory.mktemp("recipe")
    proc = _recipe(runs, demo_dataset)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return runs, demo_dataset, proc


def test_recipe_trains_analyses_fine_tunes_and_tabulates(recipe):
    runs, _, proc = recipe
    result = json.loads((runs / "unimod_recipe.json").read_text())
    assert set(result["table"]) == {"pretrain", "dense_ft", "unimod_ft"}
    for row in ("dense_ft", "unimod_ft"):
        r = result["table"][row]
        assert r["seeds"] == 1 and r["steps"] == 15 and 0 <= r["understanding"] <= 1 and r["text_ppl"] > 1
    assert result["table"]["pretrain"]["steps"] == 30
    assert (runs / "unimod_recipe.md").read_text().startswith("# UniMoD recipe")
    assert (runs / "unimod_recipe.png").read_bytes()[:4] == b"\x89PNG"
    v = result["verdict"]
    assert set(v) >= {"flops_saved_vs_padding_free_dense_pct", "understanding_gap_pts", "generation_gap_pts",
                      "flops_goal_met", "quality_goal_met"}
    fc = result["flops_context"]
    assert 0 < fc["planned_saved"] <= fc["ceiling_plan_layers"] <= fc["ceiling_every_layer"] < 1
    assert set(fc["emu3_8b"]) >= {"t2i", "mmu", "lm", "capacity"}
    # the plan the fine-tune used is the analysis's, with its record
    doc = yaml.safe_load((runs / "plan" / "mod_plan.yaml").read_text())
    assert doc["plan"]["measure"] == "token_skip" and doc["plan"]["parameters"]["flops_target"] == 0.4
    ft_cfg = yaml.safe_load((runs / "unimod_ft_s0" / "config.yaml").read_text())
    assert ft_cfg["model"]["mod"]["capacity"] == doc["model"]["mod"]["capacity"]
    dense_cfg = yaml.safe_load((runs / "dense_ft_s0" / "config.yaml").read_text())
    assert dense_cfg["model"]["mod"]["capacity"] == {}
    for cfg in (ft_cfg, dense_cfg):  # both start from this recipe's pre-training
        assert cfg["checkpoint"]["init_from_hf"] == str(runs / "pretrain" / "hf")
    # the MoD model saves FLOPs against the padding-free dense baseline; the dense fine-tune pays its padding
    assert result["table"]["unimod_ft"]["saved_vs_padding_free_dense_pct"] > 20
    assert result["table"]["dense_ft"]["saved_vs_padding_free_dense_pct"] <= 0


def test_fine_tunes_start_from_the_pretrained_model_on_the_same_data_order(recipe):
    runs, _, _ = recipe
    pre, dense, mod = (_metrics(runs / r) for r in ("pretrain", "dense_ft_s0", "unimod_ft_s0"))
    # both fine-tunes start where pre-training ended: at their first logged step (5, inside a 20-step warmup) the
    # loss is far below a fresh model's ln(vocab) = 6.29, which pre-training started from
    assert pre[0]["step"] == 20 and dense[0]["step"] == mod[0]["step"] == 5
    assert dense[0]["loss/total"] < 4.8 and mod[0]["loss/total"] < 4.8
    # the same batches in the same order: the same task at every logged step and the same samples read
    tasks = lambda m: [sorted(k for k in r if k.startswith("loss/") and k != "loss/total") for r in m]  # noqa: E731
    assert tasks(dense) == tasks(mod)
    assert [r["data/read_samples"] for r in dense] == [r["data/read_samples"] for r in mod]
    # the MoD model's export carries its fresh routers beside the Emu3 weights; the dense one has none
    with safe_open(str(runs / "unimod_ft_s0" / "hf" / "mod_routers.safetensors"), "pt") as f:
        assert any("mod_router" in k for k in f.keys())
    assert not (runs / "dense_ft_s0" / "hf" / "mod_routers.safetensors").exists()


def test_tensorboard_shows_the_routers_learning(recipe):
    runs, _, _ = recipe
    acc = EventAccumulator(str(runs / "unimod_ft_s0" / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    tags = acc.Tags()["scalars"]
    plan = yaml.safe_load((runs / "plan" / "mod_plan.yaml").read_text())["model"]["mod"]["capacity"]
    # every task a logged step trained (a short run may never meet a rare one, lm here) shows its routers
    trained = {k.split("/")[1] for r in _metrics(runs / "unimod_ft_s0") for k in r if k.startswith("loss/")} - {"total"}
    assert {"t2i", "mmu"} <= trained
    for layer, per_task in plan.items():
        for task in set(per_task) & trained:
            for kind in ("agreement", "causal_keep"):
                tag = f"mod/{kind}/{task}/layer_{layer}"
                assert tag in tags, tag
                assert all(0 <= e.value <= 1 for e in acc.Scalars(tag))
    routed = {f"mod/agreement/{task}/layer_{layer}" for layer, per in plan.items() for task in per}
    assert {t for t in tags if t.startswith("mod/agreement/")} <= routed  # only routed (layer, task) pairs


def test_a_rerun_finds_every_step_done(recipe):
    runs, data, _ = recipe
    before = json.loads((runs / "unimod_recipe.json").read_text())["table"]
    proc = _recipe(runs, data)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("done already") == 3 and "plan there already" in proc.stdout
    after = json.loads((runs / "unimod_recipe.json").read_text())["table"]
    assert after["unimod_ft"]["understanding"] == before["unimod_ft"]["understanding"]


def test_each_row_is_the_fine_tune_it_names():
    """The rows' trainer settings: a seed moves both init and data order, the same for every row; the MoD rows
    read the analysed plan (the hand plan is the main job's), the shared router only in its row, and the
    from-scratch row spends pre-training plus fine-tuning steps without any dense phase."""
    sys.path.insert(0, str(REPO))
    from bench import unimod_recipe as r

    args = r.parse_args(["--rows", "all", "--seeds", "0,1", "--pretrain-steps", "300", "--finetune-steps", "100",
                         "--runs-dir", "/elsewhere/recipe"])
    plan = Path("/plans/mod_plan.yaml")
    rows = {row: r.row_overrides(row, 1, plan, args, iso_steps=180) for row in r.ROWS}
    for row, (config, steps, sets) in rows.items():
        assert "run.seed=1" in sets and "data.seed=1" in sets, row
        assert (f"model.mod_plan={plan}" in sets) == (row not in ("dense_ft", "unimod_hand_ft")), row
        assert ("model.mod.shared_router=true" in sets) == (row == "shared_ft"), row
        assert config == (r.PRETRAIN_CONFIG if row == "unimod_scratch" else r.FINETUNE_CONFIG), row
        # fine-tunes start from this recipe's pre-training (its --runs-dir), not the config's default path
        start = f"checkpoint.init_from_hf={Path(args.runs_dir) / 'pretrain' / 'hf'}"
        assert (start in sets) == (row != "unimod_scratch"), row
    assert rows["unimod_hand_ft"][2][0] == r.HAND_PLAN
    assert {row: steps for row, (_, steps, _) in rows.items()} == {
        "dense_ft": 100, "unimod_ft": 100, "unimod_hand_ft": 100, "shared_ft": 100, "unimod_scratch": 400,
        "unimod_isoflop": 180}
    fine_tune = yaml.safe_load(r.FINETUNE_CONFIG.read_text())
    assert fine_tune["checkpoint"]["init_from_hf"].endswith("pretrain/hf") and fine_tune["model"]["mod"]["capacity"] == {}
