"""The tools around training: they read what a run wrote and never take part in one.

    python -m tools.generate   sample images or text from a checkpoint
    python -m tools.evaluate   understanding / generation accuracy and perplexity on a validation split
    python -m tools.export     any training checkpoint -> an HF Emu3 directory
    python -m tools.analyze    measure a dense checkpoint and write a MoD plan (library: analysis/)
    python -m tools.capacity   memory and FLOPs of a run configuration before it is launched

generate, evaluate, export and analyze open a checkpoint with `tools.checkpoints.open_checkpoint` (an HF
directory, a run directory, a checkpoints/ root or one step directory of any layout the trainer writes);
every tool reads a run's config.yaml with RunConfig. They import training code only through such small
public functions and never import DeepSpeed at module level (only zero_to_fp32 and the safe loader, when a
DeepSpeed checkpoint is read): a CPU laptop can evaluate a cluster's checkpoint.
"""
