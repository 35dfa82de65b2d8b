# Benchmarks (bench/README.md). `make bench` reruns every part on this machine and rewrites bench/results/;
# `make bench-quick` runs every script on tiny settings into runs/bench_quick/ (a smoke check, minutes).
# The CPU numbers need a quiet machine: other jobs on the cores inflate wall-clock times.
PY ?= .venv/bin/python
OUT ?= bench/results
QUICK ?= runs/bench_quick
export DS_ACCELERATOR ?= cpu

.PHONY: bench bench-quick bench-grid bench-peer bench-quality bench-moe bench-loader bench-scale bench-gpu

bench: bench-grid bench-peer bench-quality bench-moe bench-loader bench-scale

# 1. MoD realisation grid (~5 min on 2 cores)
bench-grid:
	$(PY) bench/mod_grid.py --threads 1 --out $(OUT)/mod_grid_cpu.json

# 2. HF Emu3ForCausalLM vs ours under ZeRO-3, 2 processes (~8 min)
bench-peer:
	$(PY) bench/peer_stack.py --out $(OUT)/peer_cpu.json

# 3. the UniMoD recipe's quality table: dense pre-training, analysed plan, dense / UniMoD / hand-plan /
#    shared-router / from-scratch / isoFLOP fine-tunes, 3 seeds for dense and UniMoD (~50 min on 2 cores)
bench-quality:
	$(PY) bench/unimod_recipe.py --rows all --seeds 0,1,2 --runs-dir runs/unimod_study --out $(OUT)/unimod_recipe_cpu.json

# 3b. MoE adaptation of the recipe's pretrained model: dense fine-tune, MoE top-4/top-2 of 8 (task and shared
#     router), static width pruning at the same active parameters, 3 seeds each (~75 min on 2 cores)
bench-moe: bench-quality
	$(PY) bench/moe_adaptation.py --seeds 0,1,2 --runs-dir runs/moe_study --pretrain-hf runs/unimod_study/pretrain/hf \
		--out $(OUT)/moe_adaptation_cpu.json

# 4. loader throughput against a step's need, emu3-8b and demo shapes (~2 min)
bench-loader:
	$(PY) bench/loader_study.py --out $(OUT)/loader_cpu.json

# 5. capacity planner: emu3-8b UniMoD vs dense on 1/4/16 nodes, ZeRO-3 and 4-stage pipeline (seconds)
bench-scale:
	$(PY) bench/scale_plan.py --out $(OUT)/scale_plan_emu3_8b.json

# The GPU pack (bench/gpu.sh), on a machine with one CUDA GPU (~8 min on an H100/H200): ours vs HF Emu3ForCausalLM
# at the reference shapes in bf16, mod_speed.py and MFU at emu3-1b; *_gpu.{json,md} and summary_gpu.md in $(OUT).
# The same on CPU at tiny shapes: BENCH_DEVICE=cpu BENCH_SMOKE=1 BENCH_OUT=/tmp/gpu_smoke make bench-gpu
bench-gpu:
	env -u DS_ACCELERATOR PY=$(PY) BENCH_OUT=$${BENCH_OUT:-$(OUT)} bash bench/gpu.sh

bench-quick:
	$(PY) bench/mod_grid.py --preset debug --seq-lens 128,256 --capacities 0.5 --layers 1,2 --base-seq-len 128 \
		--repeats 2 --warmup 1 --threads 1 --out $(QUICK)/mod_grid.json
	$(PY) bench/peer_stack.py --preset debug --mod-layers 2-3 --seq-len 256 --warmup 1 --steps 2 --rounds 1 \
		--out $(QUICK)/peer.json
	$(PY) bench/unimod_recipe.py --rows all --pretrain-steps 10 --finetune-steps 5 --runs-dir $(QUICK)/unimod \
		--set logging.eval_samples=4 --out $(QUICK)/unimod_recipe.json
	$(PY) bench/moe_adaptation.py --pretrain-hf $(QUICK)/unimod/pretrain/hf --finetune-steps 5 \
		--runs-dir $(QUICK)/moe --set logging.eval_samples=4 --out $(QUICK)/moe_adaptation.json
	$(PY) bench/loader_study.py --samples 24 --batches 10 --workers 1 --out $(QUICK)/loader.json
	$(PY) bench/scale_plan.py --nodes 1,2 --out $(QUICK)/scale_plan.json
