"""A MoD plan written by `python -m tools.analyze` is accepted by the run config as `model.mod_plan`."""

import pytest
import yaml

from train.config import RunConfig


def _doc(tmp_path, **model):
    return {"model": {"preset": "debug", **model},
            "data": {"shards": {"t2i": str(tmp_path / "x.tar")}, "tasks": {"t2i": 1.0}, "batches_per_epoch": 1,
                     "seq_len": 1024}}


def test_plan_file_sets_the_mod_section(tmp_path):
    plan = tmp_path / "mod_plan.yaml"
    plan.write_text(yaml.safe_dump({"model": {"mod": {"tasks": ["t2i", "mmu", "lm"],
                                                      "capacity": {"2-3": {"t2i": 0.3}, "1": {"mmu": 0.5}}}}}))
    cfg = RunConfig.from_dict(_doc(tmp_path, mod_plan=str(plan), mod={"aux_loss_weight": 0.05}))
    assert cfg.model.mod.capacity == {1: {"mmu": 0.5}, 2: {"t2i": 0.3}, 3: {"t2i": 0.3}}
    assert cfg.model.mod.aux_loss_weight == 0.05  # the YAML's own mod fields stay unless the plan sets them


@pytest.mark.parametrize("content,match", [(None, "does not exist"), ({"mod": {}}, "must hold exactly"),
                                           ({"model": {"mod": {"routing": "x"}}}, "routing")])
def test_bad_plan_files_are_named(tmp_path, content, match):
    plan = tmp_path / "plan.yaml"
    if content is not None:
        plan.write_text(yaml.safe_dump(content))
    with pytest.raises(ValueError, match=match):
        RunConfig.from_dict(_doc(tmp_path, mod_plan=str(plan)))


def test_the_analysis_writer_and_the_config_reader_agree(tmp_path):
    """analysis/plan.py writes mod_plan.yaml; model/config.py's read_mod_plan is the one reader of it."""
    from analysis.plan import write_plan
    from model.config import read_mod_plan

    mod = {"tasks": ["t2i", "mmu", "lm"], "capacity": {"2": {"t2i": 0.3}}, "routable": {"t2i": "image"},
           "aux_loss_weight": 0.01, "routing": "topk"}
    plan_path, _ = write_plan(tmp_path, mod, header="a header line")
    assert read_mod_plan(plan_path) == mod
    cfg = RunConfig.from_dict(_doc(tmp_path, mod_plan=str(plan_path)))
    assert cfg.model.mod.capacity == {2: {"t2i": 0.3}}


def test_unknown_plan_field_is_named(tmp_path):
    plan = tmp_path / "plan.yaml"
    plan.write_text(yaml.safe_dump({"model": {"mod": {"tasks": ["t2i"], "capacities": {}}}}))
    with pytest.raises(ValueError, match="mod.capacities is not a known field"):
        RunConfig.from_dict(_doc(tmp_path, mod_plan=str(plan)))


def test_reading_a_plan_does_not_import_analysis(tmp_path):
    """The run config reads a plan file without analysis/ (which imports the configs, not the other way)."""
    import json
    import subprocess
    import sys

    from tests.train_helpers import REPO

    plan = tmp_path / "mod_plan.yaml"
    plan.write_text(yaml.safe_dump({"model": {"mod": {"tasks": ["t2i", "mmu", "lm"], "capacity": {"3": {"t2i": 0.5}}}}}))
    code = ("import json, sys\n"
            "from train.config import RunConfig\n"
            f"cfg = RunConfig.from_dict(json.loads({json.dumps(json.dumps(_doc(tmp_path, mod_plan=str(plan))))}))\n"
            "assert cfg.model.mod.capacity == {3: {'t2i': 0.5}}, cfg.model.mod.capacity\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'analysis'))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]", out.stdout
