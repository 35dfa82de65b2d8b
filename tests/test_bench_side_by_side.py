"""bench/hf_side_by_side.py (ours vs transformers' Emu3ForCausalLM) and bench/gpu.sh (the GPU pack), at tiny
shapes on CPU, run as a user runs them.

The side-by-side's numbers are checked against independent sources: the two dense models' first-step losses
must agree (transformers computes its own forward and loss: the same network with the same weights gives the
same loss), the FLOPs ratio is recounted here from the batch's tokens with model/flops.py, and R is recomputed
from the recorded step times.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=176)
SEQ_LEN, BATCH, VOCAB = 128, 2, 4096
VARIANTS = ["hf_eager", "ours_dense", "ours_dense_compiled", "ours_mod"]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO)}


@pytest.fixture(scope="module")
def side_by_side(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("side_by_side") / "sbs.json"
    cmd = [sys.executable, str(REPO / "bench" / "hf_side_by_side.py"), "--hidden-size", "64", "--layers", "2",
           "--heads", "4", "--kv-heads", "2", "--intermediate-size", "176", "--vocab-size", str(VOCAB),
           "--seq-len", str(SEQ_LEN), "--batch", str(BATCH), "--warmup", "1", "--repeats", "1", "--threads", "1",
           "--variants", ",".join(VARIANTS), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert out.with_suffix(".md").exists() and out.with_suffix(".png").exists()
    return result


def test_every_requested_variant_is_timed(side_by_side):
    assert list(side_by_side["variants"]) == VARIANTS
    for name, v in side_by_side["variants"].items():
        assert v["status"] == "ok", (name, v.get("error"))
        assert len(v["times_s"]) == 1 and all(t > 0 for t in v["times_s"]) and v["median_s"] > 0, name
        assert v["tokens_per_s"] == pytest.approx(SEQ_LEN * BATCH / v["median_s"])
        assert v["speedup_vs_hf_eager"] == pytest.approx(side_by_side["variants"]["hf_eager"]["median_s"] / v["median_s"])


def test_hf_and_ours_dense_are_the_same_network(side_by_side):
    """transformers' forward and loss against ours, same weights: the first-step losses agree in fp32."""
    hf = side_by_side["variants"]["hf_eager"]["first_loss"]
    ours = side_by_side["variants"]["ours_dense"]["first_loss"]
    assert math.isclose(hf, ours, rel_tol=1e-5), (hf, ours)
    assert abs(hf - math.log(VOCAB)) < 0.5  # a freshly initialised model: about uniform over the vocabulary
    check = side_by_side["loss_check"]
    assert check["ok"] and check["hf_eager"] == hf and check["ours_dense"] == ours
    # At initialisation every model predicts about uniformly, so the loss alone barely sees the weights; every
    # parameter's gradient does (scaling HF's MLP weights by 1.01 moved the losses by 2e-6 but gradient norms by 3%).
    g_hf, g_ours = (side_by_side["variants"][n]["first_grad_norms"] for n in ("hf_eager", "ours_dense"))
    assert set(g_hf) == set(g_ours) and len(g_hf) == 2 + 2 * 9 + 1  # embed, head, 9 per layer, final norm
    for key in g_hf:
        assert math.isclose(g_hf[key], g_ours[key], rel_tol=1e-4), key
    assert check["grad_norm_max_rel_diff"] <= 1e-4
    # Compiling changes the kernels, not the network.
    assert math.isclose(side_by_side["variants"]["ours_dense_compiled"]["first_loss"], ours, rel_tol=1e-5)


def test_flops_ratio_and_R_recounted_independently(side_by_side):
    """The FLOPs ratio from the batch's own tokens (every non-padding, non-structural token of a t2i row is
    routable: routable "all") and model/flops.py, and R from the recorded times."""
    from bench.mod_speed import make_batch
    from model import ModelConfig
    from model.flops import Document, RowTokens, microbatch_flops

    vocab = dict(text_size=256, pad_id=256, bos_id=257, eos_id=258, boi_id=259, eoi_id=260, img_id=261, eol_id=262,
                 eof_id=263, visual_start=264, visual_size=VOCAB - 264, vocab_size=VOCAB)
    dense = ModelConfig(**TINY, vocab=vocab)
    mod = ModelConfig(**TINY, vocab=vocab, mod={"capacity": {1: {"t2i": 0.2}}, "routable": {"t2i": "all"}})
    ids, _ = make_batch(mod, ["t2i"] * BATCH, SEQ_LEN)
    rows = []
    for row in ids:
        real = row != 256
        routable = real & ((row < 256) | (row >= 264))
        rows.append(RowTokens(mod.mod.tasks.index("t2i"), ((int(real.sum()), int(routable.sum())),),
                              padding=int((~real).sum())))
    assert all(isinstance(d, Document) for r in rows for d in r.documents)
    ratio = microbatch_flops(dense, rows).total / microbatch_flops(mod, rows).total
    assert ratio > 1.0
    assert side_by_side["flops_ratio"] == pytest.approx(ratio, rel=1e-12)
    assert side_by_side["mod_layers"] == [1]  # "last-half" of 2 layers
    v = side_by_side["variants"]
    assert side_by_side["R"]["eager"]["R"] == pytest.approx(v["ours_dense"]["median_s"] / v["ours_mod"]["median_s"] / ratio)
    assert "compiled" not in side_by_side["R"]  # ours_mod_compiled was not requested
    goals = {g["metric"]: g for g in side_by_side["goals"]}
    assert goals["R (eager)"]["goal"] == 1.0 and goals["ours_mod speed-up vs hf_eager"]["goal"] == 1.85
    assert goals["ours_dense speed-up vs hf_eager"]["goal"] == 1.10


def test_peak_memory_per_variant_from_its_own_process(side_by_side):
    for name, v in side_by_side["variants"].items():
        mem = v["memory"]
        assert "error" not in mem, (name, mem)
        assert mem["method"].startswith("VmHWM")  # Linux: the peak is reset, not the process's lifetime maximum
        assert mem["rss_peak_step_above_before_mib"] > 0 and mem["rss_before_step_mib"] > 0, name
        assert v["memory_ratio_vs_hf_eager"] == pytest.approx(
            mem["rss_peak_step_above_before_mib"] / side_by_side["variants"]["hf_eager"]["memory"]["rss_peak_step_above_before_mib"])
    assert any(g["metric"] == "ours_dense peak memory / hf_eager's" for g in side_by_side["goals"])


def test_gpu_pack_runs_on_cpu_in_smoke_mode(tmp_path):
    """bench/gpu.sh with the device swapped: every part at tiny shapes, the files the GPU run writes."""
    env = {**_env(), "BENCH_DEVICE": "cpu", "BENCH_SMOKE": "1", "BENCH_OUT": str(tmp_path), "PY": sys.executable}
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu.sh")], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert str(tmp_path) in proc.stderr  # says where the results went
    for name in ("side_by_side_gpu", "mfu_emu3_1b_gpu"):
        for ext in (".json", ".md", ".png"):
            assert (tmp_path / (name + ext)).stat().st_size > 0, name + ext
    side = json.loads((tmp_path / "side_by_side_gpu.json").read_text())
    assert side["setting"]["dtype"] == "bf16" and side["loss_check"]["ok"]
    assert all(v["status"] == "ok" and v["median_s"] > 0 for v in side["variants"].values())
    mfu = json.loads((tmp_path / "mfu_emu3_1b_gpu.json").read_text())
    assert list(mfu["variants"]) == ["ours_dense", "ours_dense_compiled", "ours_mod", "ours_mod_compiled"]
    assert mfu["setting"]["sdpa"] == "flash" and set(mfu["R"]) == {"eager", "compiled"}
    speed = json.loads((tmp_path / "mod_speed_emu3_1b_gpu.json").read_text())
    assert speed["R"] > 0 and set(speed["profile"]) == {"dense", "mod"}
    summary = (tmp_path / "summary_gpu.md").read_text()
    assert "SMOKE" in summary and all(part in summary for part in ("(a)", "(b)", "(c)"))


@pytest.mark.skipif(sys.platform != "linux", reason="the peak-RSS reset is Linux's /proc/self/clear_refs")
def test_peak_rss_reset_works_here():
    """The probe's method: after writing 5 to /proc/self/clear_refs, VmHWM falls back to the current RSS."""
    from bench.report import reset_peak_rss, status_kib

    x = torch.ones(64 * 2**20 // 4)  # 64 MiB touched
    del x
    assert status_kib("VmHWM") - status_kib("VmRSS") > 32 * 1024
    assert reset_peak_rss()
    assert status_kib("VmHWM") - status_kib("VmRSS") < 8 * 1024
