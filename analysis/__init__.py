"""Redundancy analysis of a unified decoder: what plans the MoD layers and what pruning can remove.

    config.py       AnalysisConfig (sample counts, ARank subsampling, plan and probe settings)
    samples.py      calibration (train split) and evaluation (validation split) samples per task
    checkpoint.py   any checkpoint (tools/checkpoints.py reads it) as a dense model: MoD plan and routers dropped
    runner.py       a dense forward with edits (skipped blocks / sublayers, pruned MLP neurons) and hooks
    metrics.py      ARank, input/output cosine similarity, MLP neuron scores, per-task loss
    plan.py         the MoD plan (`mod:` section) from ARank
    probes.py       loss-when-skipped, task interaction, depth/width pruning and MoE probes
    plots.py        heat-maps (layer x task) and probe curves

Entry point: `python -m tools.analyze --checkpoint DIR --data DIR --out plan_dir/`.
"""
