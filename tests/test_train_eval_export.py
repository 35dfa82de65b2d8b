"""Evaluation during and after training (TensorBoard eval/* and image grid, eval.json, the summary), and
`python -m tools.export` on the checkpoint of that run (equal to the run's own end-of-run HF export)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from model import UnifiedTransformer
from tests.train_helpers import REPO, child_env, overrides, run, single_cmd


@pytest.fixture(scope="module")
def evaluated_run(demo_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval_run")
    args = overrides(demo_dataset, out, run__max_steps=4, logging__eval_every=2, logging__eval_at_end="true",
                     logging__eval_samples=8, checkpoint__export_hf="true",
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


def test_open_checkpoint_reads_every_form_of_the_run(evaluated_run, tmp_path, capsys):
    """The run directory, its checkpoints/ root and its newest step directory are one checkpoint; the run's own HF
    export is the same weights; the run config is the run's config.yaml, read by RunConfig."""
    from tools.checkpoints import open_checkpoint

    out, _ = evaluated_run
    step = out / "checkpoints" / "step_00000004"
    forms = [open_checkpoint(p) for p in (out, out / "checkpoints", step, out / "hf")]
    assert [c.kind for c in forms] == ["deepspeed"] * 3 + ["hf"]
    assert [c.step_dir for c in forms] == [step] * 3 + [None]
    assert all(c.config_path == out / "config.yaml" and c.run_config.run.max_steps == 4 for c in forms)
    reference = forms[0].model.state_dict()
    for c in forms[1:]:
        for k, v in c.model.state_dict().items():
            torch.testing.assert_close(v, reference[k], rtol=0, atol=0, msg=k)

    # A config.yaml RunConfig refuses (here a field this version does not know, as a run of another version may
    # hold) still gives the model shape: its model section alone is read, with a warning naming the reason.
    copy = tmp_path / "run"
    shutil.copytree(out / "checkpoints", copy / "checkpoints")
    doc = yaml.safe_load((out / "config.yaml").read_text())
    doc["logging"]["a_field_of_another_version"] = 1
    (copy / "config.yaml").write_text(yaml.safe_dump(doc))
    capsys.readouterr()
    opened = open_checkpoint(copy)
    assert opened.run_config is None and opened.config_path == copy / "config.yaml"
    assert "read only its model section" in capsys.readouterr().out
    for k, v in opened.model.state_dict().items():
        torch.testing.assert_close(v, reference[k], rtol=0, atol=0, msg=k)
    with pytest.raises(ValueError, match="no complete checkpoint"):
        open_checkpoint(tmp_path / "nothing")
