#!/usr/bin/env bash
# The GPU benchmark pack in one command, on a machine with one CUDA GPU (bench/README.md, "The GPU pack"):
#   (a) bench/hf_side_by_side.py: ours vs transformers' Emu3ForCausalLM at the reference shapes, bf16,
#       dense and MoD, eager and compiled, with peak memory       -> side_by_side_gpu.{json,md,png}
#   (b) bench/mod_speed.py at the emu3-1b preset, S 4096 x B 4, bf16, with the profiler breakdown
#                                                                 -> mod_speed_emu3_1b_gpu.json
#   (c) MFU of the emu3-1b preset (real Emu3 vocabulary), bf16, flash SDPA, ours dense and MoD, eager and
#       compiled                                                  -> mfu_emu3_1b_gpu.{json,md,png}
#   and summary_gpu.md: the headline numbers of each, with links. About 8 minutes on one H100/H200.
#
#   bash bench/gpu.sh                  # or: make bench-gpu; results in bench/results
#   BENCH_DEVICE=cpu BENCH_SMOKE=1 BENCH_OUT=/tmp/x bash bench/gpu.sh   # every part at tiny shapes, on CPU
#
# Environment: BENCH_DEVICE (cuda), BENCH_OUT (bench/results), BENCH_SMOKE (0; 1 = tiny shapes, 1 repeat),
# PY (the repository's .venv/bin/python if there is one, else python).
set -euo pipefail
cd "$(dirname "$0")/.."

DEVICE=${BENCH_DEVICE:-cuda}
OUT=${BENCH_OUT:-bench/results}
SMOKE=${BENCH_SMOKE:-0}
if [[ -z ${PY:-} ]]; then
    if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python; fi
fi
mkdir -p "$OUT"

if [[ $DEVICE == cuda* ]]; then
    "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "bench/gpu.sh: no CUDA GPU visible to torch (BENCH_DEVICE=cpu BENCH_SMOKE=1 runs the pack on CPU)")'
else
    export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu} OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
fi

if [[ $SMOKE == 1 ]]; then
    TINY=(--hidden-size 64 --layers 2 --heads 4 --kv-heads 2 --intermediate-size 176)
    # The compiled variants' plumbing is (c)'s; compiling transformers' model too would double the smoke's time.
    SIDE=("${TINY[@]}" --seq-len 128 --batch 2 --warmup 1 --repeats 1 --variants hf_eager,ours_dense,ours_mod)
    SPEED=(--preset debug --seq-len 256 --batch 2 --warmup 1 --repeats 2)
    MFU=(--preset debug --seq-len 256 --batch 2 --warmup 1 --repeats 1)
else
    SIDE=(--warmup 2 --repeats 5)   # reference shapes: hidden 512, 8 layers, vocabulary 4096, S 2048 x B 2
    SPEED=(--preset emu3-1b --seq-len 4096 --batch 4)
    MFU=(--preset emu3-1b --seq-len 4096 --batch 4 --warmup 2 --repeats 3)
fi

run() { echo "+ $*" >&2; "$@"; }

echo "== (a) side by side with transformers' Emu3ForCausalLM ($DEVICE, bf16)" >&2
run "$PY" bench/hf_side_by_side.py --device "$DEVICE" --dtype bf16 "${SIDE[@]}" --out "$OUT/side_by_side_gpu.json"

echo "== (b) MoD speed at emu3-1b shapes with the profiler breakdown" >&2
run "$PY" bench/mod_speed.py --device "$DEVICE" --dtype bf16 "${SPEED[@]}" --profile --out "$OUT/mod_speed_emu3_1b_gpu.json"

echo "== (c) MFU of emu3-1b, flash SDPA, eager and compiled" >&2
run "$PY" bench/hf_side_by_side.py --device "$DEVICE" --dtype bf16 --sdpa flash --no-memory "${MFU[@]}" \
    --variants ours_dense,ours_dense_compiled,ours_mod,ours_mod_compiled --out "$OUT/mfu_emu3_1b_gpu.json"

"$PY" - "$OUT" "$SMOKE" <<'EOF'
"""summary_gpu.md: one section per part, its headline numbers and its files."""
import json, sys
from pathlib import Path

out, smoke = Path(sys.argv[1]), sys.argv[2] == "1"
side = json.loads((out / "side_by_side_gpu.json").read_text())
speed = json.loads((out / "mod_speed_emu3_1b_gpu.json").read_text())
mfu = json.loads((out / "mfu_emu3_1b_gpu.json").read_text())
fmt = lambda x, f="{:.3f}": "-" if x is None else f.format(x)  # noqa: E731
lines = [f"# GPU pack ({side['device_name']}){' - SMOKE RUN at tiny shapes, not numbers to quote' if smoke else ''}", "",
         "Written by `bench/gpu.sh` (bench/README.md, \"The GPU pack\").", "",
         "## (a) ours vs transformers' Emu3ForCausalLM: [side_by_side_gpu.md](side_by_side_gpu.md)", "",
         "| variant | median step (s) | tokens/s | speed-up vs hf_eager | peak memory vs hf_eager | MFU |", "|---|---|---|---|---|---|"]
for name, v in side["variants"].items():
    if v["status"] != "ok":
        lines.append(f"| {name} | {v['status']} | | | | |")
        continue
    lines.append(f"| {name} | {v['median_s']:.4f} | {v['tokens_per_s']:.0f} | {fmt(v.get('speedup_vs_hf_eager'), '{:.2f}x')} | "
                 f"{fmt(v.get('memory_ratio_vs_hf_eager'), '{:.2f}')} | {fmt(v.get('mfu'), '{:.1%}')} |")
facts = [f"flops_ratio {side['flops_ratio']:.3f}"] + [f"R ({k}) {r['R']:.3f}" for k, r in side["R"].items()]
if lc := side["loss_check"]:
    facts.append(f"first-step losses HF {lc['hf_eager']:.5f} / ours {lc['ours_dense']:.5f} ({'ok' if lc['ok'] else 'MISMATCH'})")
lines += ["", "; ".join(facts)]
met = [g for g in side["goals"] if g["met"]]
lines += ["", f"Goals met: {len(met)} of {len(side['goals'])} (" + ", ".join(
    f"{g['metric']} {g['value']:.2f} {'yes' if g['met'] else 'no'}" for g in side["goals"]) + ")", "",
    "## (b) MoD speed at emu3-1b shapes: mod_speed_emu3_1b_gpu.json", "",
    f"dense {speed['median_s']['dense']:.4f} s, MoD {speed['median_s']['mod']:.4f} s per step; flops_ratio "
    f"{speed['flops_ratio']:.3f}, time_ratio {speed['time_ratio']:.3f}, R {speed['R']:.3f} (causal-aware "
    f"{speed['R_causal_attention']:.3f}); TFLOP/s dense {speed['tflops_per_s']['dense']:.1f}, MoD {speed['tflops_per_s']['mod']:.1f}"]
for name, prof in speed.get("profile", {}).items():
    lines.append(f"- profile {name} ({prof['clock']}, ms): " + ", ".join(f"{g} {ms:.1f}" for g, ms in prof["groups_ms"].items()))
lines += ["", "## (c) MFU at emu3-1b, flash SDPA: [mfu_emu3_1b_gpu.md](mfu_emu3_1b_gpu.md)", "",
          "| variant | median step (s) | tokens/s | TFLOP/s | MFU |", "|---|---|---|---|---|"]
for name, v in mfu["variants"].items():
    if v["status"] != "ok":
        lines.append(f"| {name} | {v['status']} | | | |")
        continue
    lines.append(f"| {name} | {v['median_s']:.4f} | {v['tokens_per_s']:.0f} | {v['tflops_per_s']:.1f} | {fmt(v.get('mfu'), '{:.1%}')} |")
lines += ["", "; ".join(f"R ({k}) {r['R']:.3f}" for k, r in mfu["R"].items()), ""]
(out / "summary_gpu.md").write_text("\n".join(lines))
print("\n".join(lines))
EOF

echo "bench/gpu.sh: results in $OUT: side_by_side_gpu.{json,md,png} mod_speed_emu3_1b_gpu.json mfu_emu3_1b_gpu.{json,md,png} summary_gpu.md" >&2
