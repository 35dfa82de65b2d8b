"""tools/capacity.py: the capacity planner on the real Emu3-8B preset (meta device, CPU, seconds).

Checks the parameter count against Emu3-8B's published 8.49B, the ZeRO-3 per-GPU states against the
ZeRO paper's (2 + 2 + 12) * N / N_d, the pipeline partition (every module once, balanced within a
layer), the FLOPs of t2i with capacity 0.2 in layers 16-31 against a hand count under the planner's
stated row assumption (one 4096-token sample, 90% of it image codes), and the printed table.
"""

from __future__ import annotations

import pytest

from model.config import ModelConfig
from tools.capacity import GiB, format_plan, main, plan

N_EMU3_8B = 8_492_011_520  # HF Emu3ForCausalLM with Emu3TextConfig() defaults


@pytest.fixture(scope="module")
def emu3_8b() -> ModelConfig:
    return ModelConfig.from_preset("emu3-8b")


@pytest.fixture(scope="module")
def emu3_8b_mod() -> ModelConfig:
    return ModelConfig.from_preset("emu3-8b", mod={"capacity": {"16-31": {"t2i": 0.2, "mmu": 0.2}}})


def test_emu3_8b_zero3_one_node_of_8(emu3_8b):
    p = plan(emu3_8b, nodes=1, gpus_per_node=8, micro_batch_size=1, seq_len=4096, grad_accum=1)
    assert p.params_dense == p.params_total == N_EMU3_8B
    assert abs(p.params_total - 8.49e9) / 8.49e9 < 0.001
    states = p.memory_per_gpu["parameters"] + p.memory_per_gpu["gradients"] + p.memory_per_gpu["optimizer states"]
    assert states == pytest.approx((2 + 2 + 12) * N_EMU3_8B / 8, rel=0.01)
    assert p.memory_per_gpu["optimizer states"] == pytest.approx(12 * N_EMU3_8B / 8, rel=1e-9)
    # Working set: the last layer plus the prefetched LM head, in bf16.
    items = p.params_per_item
    assert p.memory_per_gpu["gathered parameters"] == 2 * (items["layer 31"] + items["norm+head"])
    assert p.memory_per_gpu["logits"] == 4096 * 184622 * 4
    assert p.data_parallel == 8 and p.global_batch == 8 and p.fits


def test_pipeline_partition_covers_every_layer_once_and_is_balanced(emu3_8b):
    layer = 218_112_000  # one Emu3-8B decoder layer
    for stages in (4, 8):
        p = plan(emu3_8b, nodes=2, gpus_per_node=8, mode="pipeline", pipeline_stages=stages, grad_accum=16)
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
        # Only the last stage holds logits; 1F1B keeps `stages` micro-batches in flight on stage 0.
        assert [st.memory["logits"] > 0 for st in p.stages] == [False] * (stages - 1) + [True]
        assert p.stages[0].memory["activations"] > p.stages[-1].memory["activations"]


def _train_flops_by_hand(n: int, *, D=4096, F=14336, H=32, KV=8, hd=128) -> int:
    """One Emu3-8B decoder layer on n tokens, trained with recomputation: its matmuls 4x (forward, two
    backward, recompute), attention 2 + 5 + 2 products of n x n x hd per head (torch's SDPA formulas)."""
    linear = 2 * n * (D * H * hd + 2 * D * KV * hd + H * hd * D + 3 * D * F)
    return 4 * linear + (2 + 5 + 2) * H * 2 * n * n * hd


def test_mod_flops_for_t2i_by_hand(emu3_8b_mod):
    p = plan(emu3_8b_mod, nodes=1, gpus_per_node=8, seq_len=4096, task_mix={"t2i": 1.0})
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
    lm = plan(emu3_8b_mod, nodes=1, gpus_per_node=8, seq_len=4096, task_mix={"lm": 1.0})
    assert abs(lm.mod_saved_pct) < 0.1  # lm keeps capacity 1.0; only the routers cost extra
    mixed = plan(emu3_8b_mod, nodes=1, gpus_per_node=8, seq_len=4096, task_mix={"t2i": 0.5, "mmu": 0.4, "lm": 0.1})
    assert lm.mod_saved_pct < mixed.mod_saved_pct < p.mod_saved_pct


def test_routable_fraction_is_an_option(emu3_8b_mod):
    kw = dict(nodes=1, gpus_per_node=8, seq_len=4096, task_mix={"t2i": 1.0})
    every = plan(emu3_8b_mod, routable_fraction={"t2i": 1.0}, **kw)
    assert every.mod_tokens["t2i"][16:] == [820] * 16  # ceil(0.2 * 4096): all 4096 tokens routable
    half = plan(emu3_8b_mod, routable_fraction={"t2i": 0.5}, **kw)
    assert half.mod_tokens["t2i"][16:] == [2048 + 410] * 16  # 2048 others + ceil(0.2 * 2048)
    assert half.mod_saved_pct < plan(emu3_8b_mod, **kw).mod_saved_pct < every.mod_saved_pct
    with pytest.raises(ValueError, match="plan.routable_fraction.t2i"):
        plan(emu3_8b_mod, routable_fraction={"t2i": 1.5}, **kw)
    with pytest.raises(ValueError, match="plan.routable_fraction names task 'vqa'"):
        plan(emu3_8b_mod, routable_fraction={"vqa": 0.5}, **kw)


def test_activation_memory_follows_checkpointing_and_mod(emu3_8b, emu3_8b_mod):
    kw = dict(nodes=1, gpus_per_node=8, seq_len=4096, task_mix={"t2i": 1.0})
    ckpt = plan(emu3_8b, **kw).memory_per_gpu["activations"]
    full = plan(emu3_8b, activation_checkpointing=False, **kw).memory_per_gpu["activations"]
    full_mod = plan(emu3_8b_mod, activation_checkpointing=False, **kw).memory_per_gpu["activations"]
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
    zero3 = format_plan(plan(emu3_8b_mod, nodes=1, gpus_per_node=8, task_mix={"t2i": 0.5, "mmu": 0.4, "lm": 0.1}))
    pipe = format_plan(plan(emu3_8b_mod, nodes=2, gpus_per_node=8, mode="pipeline", pipeline_stages=4, grad_accum=16))
    for text in (zero3, pipe):
        positions = [text.index(s) for s in sections]
        assert positions == sorted(positions), text
        assert text.splitlines()[-1].startswith("FITS:")
        for term in ("parameters", "gradients", "optimizer states", "activations", "logits", "total"):
            assert f"\n  {term} " in text
        assert "MoD tokens per layer (t2i)" in text and "1148 of 4096 in layers 16-31" in text
    assert "gathered parameters" in zero3 and "ZeRO-3 shards the whole model" in zero3
    assert [f"  stage {i} " in pipe for i in range(4)] == [True] * 4
    assert "embed + layers 0-5" in pipe and "layers 26-31 + norm+head" in pipe and "pipeline bubble" in pipe


@pytest.mark.parametrize("kwargs, message", [
    (dict(mode="tp"), "plan.mode"),
    (dict(precision="int8"), "plan.precision"),
    (dict(pipeline_stages=2), "plan.pipeline_stages is 2 but mode is zero3"),
    (dict(mode="pipeline", pipeline_stages=3), r"plan.pipeline_stages \(3\) must divide"),
    (dict(gpus_per_node=0), "plan.gpus_per_node"),
    (dict(task_mix={"video": 1.0}), "plan.task_mix names task 'video'"),
    (dict(task_mix={"t2i": 0.0}), "plan.task_mix must give"),
    (dict(assumed_mfu=1.5), "plan.assumed_mfu"),
])
def test_invalid_inputs_name_the_field(kwargs, message):
    cfg = ModelConfig.from_preset("debug")
    with pytest.raises(ValueError, match=message):
        plan(cfg, **{"nodes": 1, "gpus_per_node": 2, **kwargs})


def test_cli_with_a_yaml_model(tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text('model:\n  preset: demo\n  mod:\n    capacity:\n      "4-7": {t2i: 0.25}\n')
    assert main(["--config", str(cfg), "--nodes", "1", "--gpus-per-node", "2", "--seq-len", "1024",
                 "--task-mix", "t2i=1"]) == 0
    out = capsys.readouterr().out
    # floor(0.9 * 1024) = 921 image codes; 103 others + ceil(0.25 * 921) = 231 kept.
    assert "routable tokens per row (assumed)" in out and "t2i 921" in out
    assert main(["--config", str(cfg), "--nodes", "1", "--gpus-per-node", "2", "--seq-len", "1024",
                 "--task-mix", "t2i=1", "--routable-fraction", "t2i=1"]) == 0
    assert "256 of 1024 in layers 4-7" in capsys.readouterr().out  # ceil(0.25 * 1024): everything routable
    assert "demo (L=8, D=256" in out and "334 of 1024 in layers 4-7" in out and out.rstrip().splitlines()[-1].startswith("FITS")
    assert main(["--preset", "emu3-8b", "--nodes", "1", "--gpus-per-node", "8", "--gpu-memory-gib", "8"]) == 1
    assert "DOES NOT FIT" in capsys.readouterr().out
