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
