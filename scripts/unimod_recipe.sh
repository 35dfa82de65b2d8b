#!/usr/bin/env bash
# The UniMoD recipe, the paper's way, on the embedded demo data: pre-train the dense demo model, analyse it
# (python -m tools.analyze writes the MoD plan), fine-tune it with that plan and, as the baseline, without
# MoD on the same data order, then print the quality table (runs/unimod/unimod_recipe.md, .json, .png).
# Set up like the main job (idempotent); finished steps are found and skipped, so a rerun only reprints.
# 14 min 5 s on a quiet 2-core CPU with .venv in place (pre-training 8 min, analysis 8 s, the two fine-tunes
# side by side 6 min with their evaluations). Extra arguments go to bench/unimod_recipe.py, e.g. the full
# study: ./scripts/unimod_recipe.sh --rows all --seeds 0,1,2
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python bench/unimod_recipe.py "$@"
