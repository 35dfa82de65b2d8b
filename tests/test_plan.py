"""tools/capacity.py: the capacity planner on the real Emu3-8B preset (meta device, CPU, seconds).

Checks the parameter count against Emu3-8B's published 8.49B, the ZeRO-3 per-GPU states against the
ZeRO paper's (2 + 2 + 12) * N / N_d, the pipeline partition (every module once, balanced within a
layer), the FLOPs of t2i with capacity 0.2 in layers 16-31 against a hand count under the planner's
stated row assumption (one 4096-token sample, 90% of it image codes), that every planned quantity is read
from the RunConfig, and the printed table.
"""

from __future__ import annotations

import pytest

from tools.capacity import GiB, format_plan, main, plan, run_config
from train.config import RunConfig

N_EMU3_8B = 8_492_011_520  # HF Emu3ForCausalLM with Emu3TextConfig() defaults
MOD = 'model.mod.capacity={"16-31": {t2i: 0.2, mmu: 0.2}}'
T2I = "data.tasks={t2i: 1}"
PIPELINE = ("parallel.mode=pipeline", "optim.grad_accum=16")


def cfg(*sets: str, preset: str = "emu3-8b") -> RunConfig:
    """The planner's stand-alone run config of a preset (seq_len 4096, micro-batch 1, bf16, activation
    checkpointing on, equal task shares), with `--set` overrides."""
    return run_config(None, preset, sets)


@pytest.fixture(scope="module")
def emu3_8b() -> RunConfig:
    return cfg()


@pytest.fixture(scope="module")
def emu3_8b_mod() -> RunConfig:
    return cfg(MOD)


def test_emu3_8b_zero3_one_node_of_8(emu3_8b):
    p = plan(emu3_8b, nodes=1, gpus_per_node=8)
    assert p.params_dense == p.params_total == N_EMU3_8B
    assert abs(p.params_total - 8.49e9) / 8.49e9 < 0.001
    states = p.memory_per_gpu["parameters"] + p.memory_per_gpu["gradients"] + p.memory_per_gpu["optimizer states"]
    assert states == pytest.approx((2 + 2 + 12) * N_EMU3_8B / 8, rel=0.01)
    assert p.memory_per_gpu["optimizer states"] == pytest.approx(12 * N_EMU3_8B / 8, rel=1e-9)
    # Working set: the last layer plus the prefetched LM head, in bf16.
    items = p.params_per_item
    assert p.memory_per_gpu["gathered parameters"] == 2 * (items["layer 31"] + items["norm+head"])
    # The LM head runs in chunks (model/loss.py): one chunk of fp32 logits the size of the bf16 hidden states
    # (4096 x 4096 x 2 bytes, i.e. 2048 vocabulary columns), its bf16 cast, an fp32 input-gradient accumulator
    # and the head's whole bf16 weight gradient, instead of 4096 x 184622 x 4 bytes of logits.
    N, D, V = 4096, 4096, 184622
    assert p.memory_per_gpu["LM head + loss"] == N * 2048 * (4 + 2) + N * D * 4 + V * D * 2
    assert p.memory_per_gpu["LM head + loss"] < N * V * 4  # less than the logits alone, weight gradient included
    assert p.data_parallel == 8 and p.global_batch == 8 and p.fits


def test_pipeline_partition_covers_every_layer_once_and_is_balanced():
    layer = 218_112_000  # one Emu3-8B decoder layer
    for stages in (4, 8):
        p = plan(cfg(*PIPELINE, f"parallel.pipeline_stages={stages}"), nodes=2, gpus_per_node=8)
        names = [n for st in p.stages for n in st.items]
        assert names == ["embed", *(f"layer {i}" for i in range(32)), "norm+head"]
        assert p.stages[0].items[0] == "embed" and p.stages[-1].items[-1] == "norm+head"
        counts = [st.params for st in p.stages]
        assert sum(counts) == N_EMU3_8B
        assert max(counts) - min(counts) <= layer, counts
        dp = 16 // stages
        for st in p.stages:  # ZeRO-1: full params and grads per stage, optimizer sharded over its dp ranks
            assert st.memory["parameters"] == 2 * st.params and st.memory["gradients"] == 2 * st.params
            assert st.memory["optimizer states"] == pytest.approx(12 * st.params / dp)
        # Only the last stage runs the head and the loss; 1F1B keeps `stages` micro-batches in flight on stage 0.
        assert [st.memory["LM head + loss"] > 0 for st in p.stages] == [False] * (stages - 1) + [True]
        assert p.stages[0].memory["activations"] > p.stages[-1].memory["activations"]


def _train_flops_by_hand(n: int, *, D=4096, F=14336, H=32, KV=8, hd=128) -> int:
    """One Emu3-8B decoder layer on n tokens, trained with recomputation: its matmuls 4x (forward, two
    backward, recompute), attention 2 + 5 + 2 products of n x n x hd per head (torch's SDPA formulas)."""
    linear = 2 * n * (D * H * hd + 2 * D * KV * hd + H * hd * D + 3 * D * F)
    return 4 * linear + (2 + 5 + 2) * H * 2 * n * n * hd


def test_mod_flops_for_t2i_by_hand():
    p = plan(cfg(MOD, T2I), nodes=1, gpus_per_node=8)
    assert p.params_total - p.params_dense == 16 * 4096 * 3  # one Linear(D, 3 tasks) per MoD layer
    # The assumed row: floor(0.9 * 4096) = 3686 image codes; a MoD layer keeps the 410 other tokens and
    # ceil(0.2 * 3686) = 738 codes: 1148 of 4096.
    assert p.routable_tokens == {"t2i": 3686}
    assert p.mod_tokens["t2i"][:16] == [4096] * 16 and p.mod_tokens["t2i"][16:] == [1148] * 16
    S, D, V = 4096, 4096, 184622
    head = 3 * 2 * S * D * V  # forward + backward, never recomputed
    dense_row = 32 * _train_flops_by_hand(S) + head
    mod_row = 16 * _train_flops_by_hand(S) + 16 * (_train_flops_by_hand(1148) + 4 * 2 * S * D * 3) + head
    assert (p.flops_mod, p.flops_dense) == (8 * mod_row, 8 * dense_row)  # 8 GPUs x 1 row
    assert p.mod_saved_pct == pytest.approx(100 * (1 - mod_row / dense_row))
    assert 34.0 < p.mod_saved_pct < 36.0, p.mod_saved_pct  # 80% of the image codes in half the layers
    assert p.step_time_mod_s == pytest.approx(p.flops_mod / (8 * 989e12 * 0.4))
    assert p.tokens_per_s_mod == pytest.approx(8 * 4096 / p.step_time_mod_s)
    lm = plan(cfg(MOD, "data.tasks={lm: 1}"), nodes=1, gpus_per_node=8)
    assert abs(lm.mod_saved_pct) < 0.1  # lm keeps capacity 1.0; only the routers cost extra
    mixed = plan(cfg(MOD, "data.tasks={t2i: 0.5, mmu: 0.4, lm: 0.1}"), nodes=1, gpus_per_node=8)
    assert lm.mod_saved_pct < mixed.mod_saved_pct < p.mod_saved_pct


def test_routable_fraction_is_an_option():
    t2i = cfg(MOD, T2I)
    kw = dict(nodes=1, gpus_per_node=8)
    every = plan(t2i, routable_fraction={"t2i": 1.0}, **kw)
    assert every.mod_tokens["t2i"][16:] == [820] * 16  # ceil(0.2 * 4096): all 4096 tokens routable
    half = plan(t2i, routable_fraction={"t2i": 0.5}, **kw)
    assert half.mod_tokens["t2i"][16:] == [2048 + 410] * 16  # 2048 others + ceil(0.2 * 2048)
    assert half.mod_saved_pct < plan(t2i, **kw).mod_saved_pct < every.mod_saved_pct
    with pytest.raises(ValueError, match="plan.routable_fraction.t2i"):
        plan(t2i, routable_fraction={"t2i": 1.5}, **kw)
    with pytest.raises(ValueError, match="plan.routable_fraction names task 'vqa'"):
        plan(t2i, routable_fraction={"vqa": 0.5}, **kw)


def test_activation_memory_follows_checkpointing_and_mod():
    kw = dict(nodes=1, gpus_per_node=8)
    off = "parallel.activation_checkpointing=false"
    ckpt = plan(cfg(T2I), **kw).memory_per_gpu["activations"]
    full = plan(cfg(T2I, off), **kw).memory_per_gpu["activations"]
    full_mod = plan(cfg(MOD, T2I, off), **kw).memory_per_gpu["activations"]
    # Checkpointing keeps one S*D bf16 input per layer plus one layer's full activations.
    d, f, dkv = 4096, 14336, 1024
    per_layer_full = 4096 * (6 * d + 2 * dkv + 4 * f) * 2
    assert ckpt == 32 * 4096 * d * 2 + per_layer_full
    assert full == 32 * per_layer_full
    assert ckpt < full_mod < full


def test_offload_moves_optimizer_states_to_host(emu3_8b):
    p = plan(emu3_8b, nodes=2, gpus_per_node=8, offload_optimizer=True)
    assert p.memory_per_gpu["optimizer states"] == 0
    assert p.host_memory_per_node == pytest.approx(12 * N_EMU3_8B / 16 * 8)
    assert "host memory per node" in format_plan(p)


def test_tiny_gpu_memory_does_not_fit(emu3_8b):
    p = plan(emu3_8b, nodes=1, gpus_per_node=8, gpu_memory_gib=8.0)
    assert not p.fits and p.biggest_term[0] == "optimizer states"
    last = format_plan(p).splitlines()[-1]
    assert last.startswith("DOES NOT FIT:") and "> 8.0 GiB per GPU" in last and "optimizer states" in last
    assert f"{p.total_bytes_per_gpu / GiB:.2f} GiB needed" in last


def test_format_plan_prints_every_section(emu3_8b_mod):
    sections = ["== Model", "== Layout", "== Memory per GPU", "== Pipeline partition", "== FLOPs per optimizer step",
                "== Step time at 40% MFU"]
    zero3 = format_plan(plan(cfg(MOD, "data.tasks={t2i: 0.5, mmu: 0.4, lm: 0.1}"), nodes=1, gpus_per_node=8))
    pipe = format_plan(plan(cfg(MOD, *PIPELINE, "parallel.pipeline_stages=4"), nodes=2, gpus_per_node=8))
    for text in (zero3, pipe):
        positions = [text.index(s) for s in sections]
        assert positions == sorted(positions), text
        assert text.splitlines()[-1].startswith("FITS:")
        for term in ("parameters", "gradients", "optimizer states", "activations", "LM head + loss", "total"):
            assert f"\n  {term} " in text
        assert "MoD tokens per layer (t2i)" in text and "1148 of 4096 in layers 16-31" in text
    assert "gathered parameters" in zero3 and "ZeRO-3 shards the whole model" in zero3
    assert [f"  stage {i} " in pipe for i in range(4)] == [True] * 4
    assert "embed + layers 0-5" in pipe and "layers 26-31 + norm+head" in pipe and "pipeline bubble" in pipe


def test_every_planned_quantity_comes_from_the_run_config(emu3_8b):
    base = plan(emu3_8b, nodes=1, gpus_per_node=8)
    assert (base.mode, base.precision, base.activation_checkpointing) == ("zero", "bf16", True)
    assert (base.micro_batch_size, base.seq_len, base.grad_accum, base.pipeline_stages) == (1, 4096, 1, 1)
    assert base.task_mix == pytest.approx({"t2i": 1 / 3, "mmu": 1 / 3, "lm": 1 / 3})
    p = plan(cfg("data.micro_batch_size=2", "data.seq_len=2048", "optim.grad_accum=4", "parallel.precision=fp32",
                 "data.tasks={t2i: 1.0, mmu: 1.0, lm: 0.2}", "logging.peak_tflops=500"), nodes=1, gpus_per_node=8)
    assert (p.micro_batch_size, p.seq_len, p.grad_accum, p.precision) == (2, 2048, 4, "fp32")
    assert p.global_batch == 2 * 4 * 8 and p.tokens_per_step == 64 * 2048
    assert p.task_mix == pytest.approx({"t2i": 1 / 2.2, "mmu": 1 / 2.2, "lm": 0.2 / 2.2})
    assert p.memory_per_gpu["parameters"] == pytest.approx(4 * N_EMU3_8B / 8)  # fp32: 4 + 4 + 8 bytes
    assert p.memory_per_gpu["optimizer states"] == pytest.approx(8 * N_EMU3_8B / 8)
    assert p.peak_flops_per_gpu == 500e12
    assert plan(emu3_8b, nodes=1, gpus_per_node=8, peak_flops_per_gpu=1e15).peak_flops_per_gpu == 1e15
    assert base.peak_flops_per_gpu == 989e12
    assert plan(cfg("parallel.precision=auto"), nodes=1, gpus_per_node=8).precision == "bf16"  # auto on a GPU


def test_the_shipped_emu3_8b_run_config_plans():
    from tests.train_helpers import REPO

    run = RunConfig.load(REPO / "train" / "configs" / "emu3_8b_unimod.yaml")
    p = plan(run, nodes=4, gpus_per_node=8)
    assert (p.seq_len, p.grad_accum, p.mode, p.activation_checkpointing) == (10240, 4, "zero", True)
    assert p.global_batch == 4 * 32 and p.fits


@pytest.mark.parametrize("sets, kwargs, message", [
    ((), dict(gpus_per_node=0), "plan.gpus_per_node"),
    ((), dict(assumed_mfu=1.5), "plan.assumed_mfu"),
    ((), dict(gpu_memory_gib=0), "plan.gpu_memory_gib"),
    (("parallel.mode=pipeline", "parallel.pipeline_stages=3"), {}, r"parallel.pipeline_stages \(3\) must divide"),
    (("model.mod.tasks=[t2i, mmu]", "model.mod.routable={t2i: image, mmu: image}", "data.tasks={lm: 1}"), {},
     "data.tasks names task 'lm' which is not in model.mod.tasks"),
])
def test_invalid_inputs_name_the_field(sets, kwargs, message):
    with pytest.raises(ValueError, match=message):
        plan(cfg(*sets, preset="debug"), **{"nodes": 1, "gpus_per_node": 2, **kwargs})


@pytest.mark.parametrize("sets, message", [
    (["parallel.mode=tp"], "parallel.mode must be one of"),
    (["parallel.precision=int8"], "parallel.precision must be one of"),
    (["parallel.pipeline_stages=2"], "parallel.pipeline_stages > 1 needs parallel.mode: pipeline"),
    (["data.tasks={t2i: 0}"], "data.tasks.t2i must be a number > 0"),
])
def test_run_config_errors_exit_2(sets, message, capsys):
    argv = ["--preset", "debug", "--nodes", "1", "--gpus-per-node", "2"]
    assert main([*argv, *(a for s in sets for a in ("--set", s))]) == 2
    assert message in capsys.readouterr().err


def test_cli_with_a_yaml_model(tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text('model:\n  preset: demo\n  mod:\n    capacity:\n      "4-7": {t2i: 0.25}\n')
    argv = ["--config", str(cfg), "--nodes", "1", "--gpus-per-node", "2", "--set", "data.seq_len=1024", "--set", T2I]
    assert main(argv) == 0
    out = capsys.readouterr().out
    # floor(0.9 * 1024) = 921 image codes; 103 others + ceil(0.25 * 921) = 231 kept.
    assert "routable tokens per row (assumed)" in out and "t2i 921" in out
    assert main([*argv, "--routable-fraction", "t2i=1"]) == 0
    assert "256 of 1024 in layers 4-7" in capsys.readouterr().out  # ceil(0.25 * 1024): everything routable
    assert "demo (L=8, D=256" in out and "334 of 1024 in layers 4-7" in out and out.rstrip().splitlines()[-1].startswith("FITS")
    assert main(["--preset", "emu3-8b", "--nodes", "1", "--gpus-per-node", "8", "--gpu-memory-gib", "8"]) == 1
    assert "DOES NOT FIT" in capsys.readouterr().out


def test_cli_with_a_run_config(tmp_path, capsys):
    """A full run YAML as train/main.py reads it: its data, optim and parallel sections are what is planned."""
    from tests.train_helpers import REPO

    config = str(REPO / "train" / "configs" / "emu3_8b_unimod.yaml")
    assert main(["--config", config, "--nodes", "2", "--gpus-per-node", "8", "--set", "parallel.mode=pipeline",
                 "--set", "parallel.pipeline_stages=4"]) == 0
    out = capsys.readouterr().out
    assert "pipeline (4 pipeline stages x 4 data-parallel ranks)" in out
    assert "1 x 10240 x 4" in out and "t2i 0.48, mmu 0.48, lm 0.05" in out


def test_main_plan_flag_plans_the_run_config_and_reads_offload_from_the_ds_json(capsys):
    """`python train/main.py --config ... --plan` (the README's command) plans the run's own RunConfig; the
    DeepSpeed JSON decides the optimizer offload."""
    from train.main import main as train_main

    base = ["--config", "train/configs/emu3_8b_unimod.yaml", "--plan", "--nodes", "4", "--gpus-per-node", "8"]
    assert train_main(base + ["--deepspeed_config", "ds_configs/zero3_bf16.json"]) == 0
    plain = capsys.readouterr().out
    assert "FITS" in plain and "ZeRO-3" in plain
    cfg = RunConfig.load("train/configs/emu3_8b_unimod.yaml")
    expected = plan(cfg, nodes=4, gpus_per_node=8)
    assert f"{expected.total_bytes_per_gpu / GiB:.2f} GiB" in plain
    assert train_main(base + ["--deepspeed_config", "ds_configs/zero3_offload_bf16.json"]) == 0
    offloaded = plan(cfg, nodes=4, gpus_per_node=8, offload_optimizer=True)
    assert offloaded.total_bytes_per_gpu < expected.total_bytes_per_gpu
    assert f"{offloaded.total_bytes_per_gpu / GiB:.2f} GiB" in capsys.readouterr().out
