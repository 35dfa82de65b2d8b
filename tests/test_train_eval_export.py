"""Evaluation during and after training (TensorBoard eval/* and image grid, eval.json, the summary), and
`python -m tools.export` on the checkpoint of that run (equal to the run's own end-of-run HF export)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from model import UnifiedTransformer
from tests.train_helpers import REPO, child_env, overrides, run, single_cmd


@pytest.fixture(scope="module")
def evaluated_run(demo_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval_run")
    args = overrides(demo_dataset, out, run__max_steps=4, logging__eval_every=2, logging__eval_at_end="true",
                     logging__eval_samples=8, logging__eval_images_per_digit=1, checkpoint__export_hf="true",
                     checkpoint__save_every=2)
    result = run(single_cmd(args), child_env(), out / "train.log", timeout=300)
    assert result.rc == 0, result.explain()
    return out, result


def test_eval_metrics_and_images_reach_tensorboard_and_the_summary(evaluated_run):
    out, result = evaluated_run
    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    tags = acc.Tags()
    for tag in ("eval/understanding/accuracy", "eval/generation/accuracy", "eval/text/perplexity"):
        assert tag in tags["scalars"], tag
        assert [e.step for e in acc.Scalars(tag)] == [2, 4]  # periodic at step 2, final at step 4
    assert "eval/samples" in tags["images"]
    assert sorted(e.step for e in acc.Images("eval/samples")) == [2, 4]
    final = json.loads((out / "eval.json").read_text())
    assert final["step"] == 4 and 0.0 <= final["generation/accuracy"] <= 1.0
    assert final["text/perplexity"] > 1.0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval"]["understanding/accuracy"] == final["understanding/accuracy"]
    assert "[eval] step 4:" in result.output


def test_export_cli_matches_the_end_of_run_export(evaluated_run, tmp_path):
    out, _ = evaluated_run
    exported = tmp_path / "hf"
    proc = subprocess.run([sys.executable, "-m", "tools.export", "--checkpoint", str(out / "checkpoints"),
                           "--out", str(exported)], cwd=REPO, env=child_env(), capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stderr
    a, b = UnifiedTransformer.from_hf(exported).eval(), UnifiedTransformer.from_hf(out / "hf").eval()
    ids = torch.randint(0, a.config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(0))
    tasks = torch.tensor([0])
    with torch.no_grad():
        torch.testing.assert_close(a(ids, task_ids=tasks).logits, b(ids, task_ids=tasks).logits, rtol=0, atol=0)
    bad = subprocess.run([sys.executable, "-m", "tools.export", "--checkpoint", str(tmp_path / "nothing"),
                          "--out", str(tmp_path / "x")], cwd=REPO, env=child_env(), capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and "no complete checkpoint" in bad.stderr
