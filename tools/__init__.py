"""The tools around training: they read what a run wrote and never take part in one.

    python -m tools.generate   sample images or text from a checkpoint
    python -m tools.evaluate   understanding / generation accuracy and perplexity on a validation split
    python -m tools.export     any training checkpoint -> an HF Emu3 directory
    python -m tools.analyze    measure a dense checkpoint and write a MoD plan (library: analysis/)
    python -m tools.capacity   memory and FLOPs of a run configuration before it is launched

They import training code only through small public functions (RunConfig, the checkpoint reader) and
never import DeepSpeed at module level: a CPU laptop can evaluate a cluster's checkpoint.
"""
