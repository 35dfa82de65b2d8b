"""The run config against the DeepSpeed JSON: every contradiction is a clear error raised before a process
group or a model exists, and `train/main.py` turns it into exit code 2 with the message on stderr.

All in-process and fast: `train.launch.init_distributed` is replaced by a function that fails the test, so
an error that surfaced any later (after the process group, at model build) would show up as that failure.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import train.launch
from tests.train_helpers import DS_PIPELINE, DS_SINGLE, DS_ZERO3, SMOKE
from train.config import RunConfig, apply_overrides, load_ds_config, reconcile_ds_config
from train.main import main

SMALL = ["data.dataset_dir=/nonexistent/demo", "data.micro_batch_size=2", "parallel.precision=fp32",
         "run.device=cpu"]


def cfg(*extra: str) -> RunConfig:
    return RunConfig.load(SMOKE, [*SMALL, *extra])


def ds_file(tmp_path: Path, base: Path, **changes) -> Path:
    """A copy of a shipped DeepSpeed JSON with some keys changed (None deletes)."""
    doc = json.loads(base.read_text())
    for key, value in changes.items():
        if value is None:
            doc.pop(key, None)
        else:
            doc[key] = value
    path = tmp_path / f"ds_{len(list(tmp_path.iterdir()))}.json"
    path.write_text(json.dumps(doc))
    return path


@pytest.fixture
def no_launch(monkeypatch):
    """main() must stop before the process group (and so before any model) exists."""

    def refuse(*a, **k):
        raise AssertionError("init_distributed was reached: the config error was not caught up front")

    monkeypatch.setattr(train.launch, "init_distributed", refuse)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "PMI_RANK",
                "SLURM_PROCID"):
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def run_main(capsys, ds: Path | None, *sets: str, config: Path = SMOKE) -> tuple[int, str]:
    argv = ["--config", str(config)]
    if ds is not None:
        argv += ["--deepspeed_config", str(ds)]
    for item in [*SMALL, *sets]:
        argv += ["--set", item]
    rc = main(argv)
    return rc, capsys.readouterr().err


# ----- each contradiction: exit 2, one line on stderr naming the JSON file, its key and the YAML field -----
MISMATCHES = [
    # (JSON changes, extra --set, words the message must hold)
    ({"train_micro_batch_size_per_gpu": 8}, [], ["train_micro_batch_size_per_gpu=8", "data.micro_batch_size=2"]),
    ({"gradient_accumulation_steps": 4}, [], ["gradient_accumulation_steps=4", "optim.grad_accum=1"]),
    ({"train_batch_size": 99}, [], ["train_batch_size=99", "data.micro_batch_size x optim.grad_accum"]),
    ({"bf16": {"enabled": True}}, [], ["bf16.enabled=True", "parallel.precision='fp32'"]),
    ({"fp16": {"enabled": True}}, [], ["fp16.enabled=True", "parallel.precision='fp32'"]),
    ({"gradient_clipping": 0.5}, ["optim.grad_clip=1.0"], ["gradient_clipping=0.5", "optim.grad_clip=1.0"]),
    ({"optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}, [], ['"optimizer" section', "optim:"]),
    ({"scheduler": {"type": "WarmupLR"}}, [], ['"scheduler" section']),
    ({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}}, [], ["offload needs a GPU"]),
]


@pytest.mark.parametrize("changes,sets,words", MISMATCHES, ids=[
    "micro_batch", "grad_accum", "train_batch_size", "bf16_vs_fp32", "fp16_vs_fp32", "grad_clip", "optimizer",
    "scheduler", "offload_on_cpu"])
def test_json_contradiction_exits_2(tmp_path, capsys, no_launch, changes, sets, words):
    ds = ds_file(tmp_path, DS_ZERO3, **changes)
    rc, err = run_main(capsys, ds, *sets)
    assert rc == 2, err
    assert err.startswith("error: ") and str(ds) in err, err
    for w in words:
        assert w in err, f"{w!r} not in {err!r}"


def test_zero3_with_pipeline_mode_exits_2(tmp_path, capsys, no_launch):
    # Two ranks (as a launcher would say) so the stage count divides the world and the stage check is reached.
    no_launch.setenv("RANK", "0")
    no_launch.setenv("WORLD_SIZE", "2")
    rc, err = run_main(capsys, DS_ZERO3, "parallel.mode=pipeline", "parallel.pipeline_stages=2")
    assert rc == 2, err
    assert "zero_optimization.stage=3" in err and "parallel.mode=pipeline" in err and str(DS_ZERO3) in err, err


def test_world_not_multiple_of_stages_exits_2(capsys, no_launch):
    rc, err = run_main(capsys, DS_PIPELINE, "parallel.mode=pipeline", "parallel.pipeline_stages=2")
    assert rc == 2 and "world size 1 is not a multiple of parallel.pipeline_stages 2" in err, err


# ----- the YAML and --set ----------------------------------------------------------------------------------
def test_unknown_yaml_field_exits_2(tmp_path, capsys, no_launch):
    bad = tmp_path / "typo.yaml"
    bad.write_text(SMOKE.read_text().replace("  warmup_steps: 5", "  warmup_step: 5"))
    rc, err = run_main(capsys, DS_SINGLE, config=bad)
    assert rc == 2, err
    assert str(bad) in err and "optim.warmup_step is not a known field" in err and "warmup_steps" in err, err


def test_unknown_section_exits_2(tmp_path, capsys, no_launch):
    rc, err = run_main(capsys, DS_SINGLE, "optimiser.lr=1e-3")
    assert rc == 2 and "unknown section 'optimiser'" in err, err


@pytest.mark.parametrize("item,words", [
    ("optim.lr", ["--set 'optim.lr'", "expected section.field=value"]),
    ("lr=1e-3", ["--set 'lr=1e-3'", "must name a section and a field"]),
    ("optim.lr=[1, 2", ["--set 'optim.lr=[1, 2'", "not valid YAML"]),
    ("optim.lr=fast", ["optim.lr must be a number", "'fast'"]),
    ("optim.learning_rate=1e-3", ["optim.learning_rate is not a known field"]),
    ("run.max_steps=0", ["run.max_steps must be an integer >= 1"]),
    ("optim.grad_accum=true", ["optim.grad_accum must be an integer >= 1, got True"]),
    ("optim.lr=0", ["optim.lr must be a number > 0, got 0"]),
    ("optim.min_lr_ratio=1.5", ["optim.min_lr_ratio must be a number in [0, 1], got 1.5"]),
    ("model.mod.capacity={2: {t2i: 0}}", ["mod.capacity[2].t2i must be a number in (0, 1], got 0"]),
    ("model.vocab.pad=3", ["model.vocab.pad is not a known field"]),
    ("optim.lr.value=1", ["--set 'optim.lr.value=1'", "lr is not a section"]),
])
def test_bad_set_exits_2(capsys, no_launch, item, words):
    rc, err = run_main(capsys, DS_SINGLE, item)
    assert rc == 2, err
    for w in words:
        assert w in err, f"{w!r} not in {err!r}"


def test_set_values_are_yaml_data_not_code():
    doc = apply_overrides({"optim": {"lr": 1.0}}, ["optim.lr=2.5e-4", "optim.betas=[0.9, 0.99]",
                                                   "data.tasks={t2i: 1.0, lm: 0.5}",
                                                   "run.output_dir=__import__('os').getcwd()"])
    assert doc["optim"]["lr"] == 2.5e-4 and doc["optim"]["betas"] == [0.9, 0.99]
    assert doc["data"]["tasks"] == {"t2i": 1.0, "lm": 0.5}
    assert doc["run"]["output_dir"] == "__import__('os').getcwd()"  # a string, never evaluated


def test_missing_ds_config_exits_2(tmp_path, capsys, no_launch):
    rc, err = run_main(capsys, tmp_path / "nope.json")
    assert rc == 2 and "nope.json does not exist" in err, err
    broken = tmp_path / "broken.json"
    broken.write_text("{\"train_batch_size\": ")
    rc, err = run_main(capsys, broken)
    assert rc == 2 and "broken.json: not valid JSON" in err, err


# ----- "auto" is filled from the YAML; agreeing explicit values pass ----------------------------------------
def test_auto_values_filled_for_zero3():
    c = cfg("data.micro_batch_size=3", "optim.grad_accum=2", "optim.grad_clip=0.5")
    ds = reconcile_ds_config(load_ds_config(DS_ZERO3), c, world_size=4, on_gpu=False)
    assert ds["train_micro_batch_size_per_gpu"] == 3
    assert ds["gradient_accumulation_steps"] == 2
    assert ds["train_batch_size"] == 3 * 2 * 4
    assert ds["gradient_clipping"] == 0.5
    assert ds["bf16"]["enabled"] is False and ds["fp16"]["enabled"] is False
    assert ds["zero_optimization"]["stage"] == 3
    assert "optimizer" not in ds and "scheduler" not in ds


def test_auto_values_filled_for_pipeline_and_gpu_precision():
    c = cfg("parallel.mode=pipeline", "parallel.pipeline_stages=2", "optim.grad_accum=4",
            "parallel.precision=auto")
    ds = reconcile_ds_config(load_ds_config(DS_PIPELINE), c, world_size=4, on_gpu=True)
    # 4 ranks in 2 stages -> 2 data-parallel replicas; "auto" precision is bf16 on a GPU.
    assert ds["train_batch_size"] == 2 * 4 * 2
    assert ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False
    assert ds["zero_optimization"]["stage"] == 1
    cpu = reconcile_ds_config(load_ds_config(DS_PIPELINE), c, world_size=4, on_gpu=False)
    assert cpu["bf16"]["enabled"] is False  # auto is fp32 on CPU


def test_missing_keys_are_treated_as_auto_and_explicit_agreement_passes(tmp_path):
    c = cfg("optim.grad_accum=2")
    ds = reconcile_ds_config({"train_micro_batch_size_per_gpu": 2, "train_batch_size": 8,
                              "bf16": {"enabled": False}}, c, world_size=2, on_gpu=False)
    assert ds["gradient_accumulation_steps"] == 2 and ds["train_batch_size"] == 8
    assert ds["zero_optimization"].get("stage", 0) == 0 and ds["gradient_clipping"] == 1.0


def test_bf16_pipeline_with_zero0_is_refused():
    c = cfg("parallel.mode=pipeline", "parallel.pipeline_stages=2", "parallel.precision=bf16")
    with pytest.raises(ValueError, match="bf16 with ZeRO stage 0 in pipeline mode"):
        reconcile_ds_config({"zero_optimization": {"stage": 0}}, c, world_size=2, on_gpu=True)
    # Left to us, the stage becomes 1 (bf16 + ZeRO-1 pipeline checkpoints reload fine).
    ds = reconcile_ds_config({}, c, world_size=2, on_gpu=True)
    assert ds["zero_optimization"]["stage"] == 1


def test_shipped_configs_reconcile_with_shipped_yamls():
    """Every ds_configs/*.json fits the YAMLs it is documented with (so the launch commands in
    train/main.py's docstring do not die on a contradiction)."""
    repo = SMOKE.parents[2]
    smoke = cfg()
    for name in ("single_cpu", "zero3_cpu"):
        reconcile_ds_config(load_ds_config(repo / "ds_configs" / f"{name}.json"), smoke, 2, on_gpu=False)
    pipe = cfg("parallel.mode=pipeline", "parallel.pipeline_stages=2")
    reconcile_ds_config(load_ds_config(repo / "ds_configs" / "pipeline_cpu.json"), pipe, 2, on_gpu=False)
    big = RunConfig.load(repo / "train" / "configs" / "emu3_8b_unimod.yaml", ["data.dataset_dir=/nonexistent"])
    for name in ("zero3_bf16", "zero3_offload_bf16"):
        ds = reconcile_ds_config(load_ds_config(repo / "ds_configs" / f"{name}.json"), big, 64, on_gpu=True)
        assert ds["bf16"]["enabled"] is True and ds["train_batch_size"] == 1 * 4 * 64


def test_routing_a_kind_the_task_never_holds_exits_2(capsys, no_launch):
    """`routable: {lm: image}` with lm capacity < 1 would skip nothing while the FLOPs plan counts on it."""
    rc, err = run_main(capsys, DS_SINGLE, "model.mod.routable.lm=image", 'model.mod.capacity={"2-3": {lm: 0.5}}')
    assert rc == 2, err
    assert "model.mod.routable.lm = 'image'" in err and "layers [2, 3]" in err, err
    cfg("model.mod.routable.lm=all", 'model.mod.capacity={"2-3": {lm: 0.5}}')  # routable text: accepted


def test_moe_layers_are_accepted_under_zero_and_the_pipeline():
    """Both engines carry the expert counts (TensorBoard moe/ tags, exact FLOPs; the pipeline's stages in their
    tuple, tests/test_pipeline_moe.py), so `model.moe` goes with either mode."""
    moe = 'model.moe={layers: "2-3", num_experts: 4, top_k: 2}'
    c = cfg(moe)
    assert c.model.moe.layers == [2, 3] and c.parallel.mode == "zero"
    c = cfg(moe, "parallel.mode=pipeline", "parallel.pipeline_stages=2")
    assert c.model.moe.layers == [2, 3] and c.parallel.mode == "pipeline" and c.parallel.pipeline_stages == 2
    c = cfg("model.moe={layers: []}", "parallel.mode=pipeline", "parallel.pipeline_stages=2")
    assert c.model.moe.layers == []


# ----- numbers such as 1e-4 are numbers (PyYAML's YAML 1.1 reads them as strings) --------------------------------
@pytest.mark.parametrize("text,value", [("1e-4", 1e-4), ("2E-5", 2e-5), ("-3e+2", -300.0), ("1.5e3", 1500.0),
                                        (".5e1", 5.0), ("3.0e-3", 3e-3), ("1e4", 1e4)])
def test_exponent_floats_are_numbers_in_set_values(text, value):
    from train.config import load_yaml

    assert load_yaml(text) == value and isinstance(load_yaml(text), float)
    assert apply_overrides({}, [f"optim.lr={text}"])["optim"]["lr"] == value


def test_exponent_floats_are_numbers_in_yaml_files_and_set(tmp_path):
    """The --help example (`--set optim.lr=1e-4`), docs/slurm.md's EXTRA_SETS="optim.lr=2e-5", and a YAML file
    that says `lr: 1e-4`."""
    import yaml

    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text(SMOKE.read_text().replace("  lr: 3.0e-3", "  lr: 1e-4"))
    assert "lr: 1e-4" in yaml_file.read_text()
    assert RunConfig.load(yaml_file, SMALL).optim.lr == 1e-4
    assert cfg("optim.lr=2e-5").optim.lr == 2e-5
    for text in ("yes", "1_000", "0x1f", "on", "1.0", "12:30"):  # YAML 1.1's other readings are kept
        assert apply_overrides({}, [f"a.b={text}"])["a"]["b"] == yaml.safe_load(text)


def test_strings_that_look_like_exponents_stay_strings_when_quoted():
    assert apply_overrides({}, ["run.output_dir='1e3'"])["run"]["output_dir"] == "1e3"


def test_a_retired_field_in_an_earlier_runs_config_is_ignored_with_a_warning(capsys):
    """config.yaml of runs from before logging.eval_images_per_digit was retired still load (resume, tools);
    a misspelt field still stops the run."""
    from train.config import RunConfig

    doc = {"model": {"preset": "debug"}, "data": {"dataset_dir": "nowhere", "seq_len": 64},
           "logging": {"eval_images_per_digit": 4, "log_every": 3}}
    cfg = RunConfig.from_dict(doc, where="old/config.yaml")
    assert cfg.logging.log_every == 3
    assert "ignoring logging.eval_images_per_digit" in capsys.readouterr().out
    with pytest.raises(ValueError, match="logging.eval_images_per_digit_typo is not a known field"):
        RunConfig.from_dict({**doc, "logging": {"eval_images_per_digit_typo": 4}})
