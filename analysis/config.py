"""AnalysisConfig: every knob of the redundancy analysis, the MoD planner and the pruning probes."""

from __future__ import annotations

import math
from dataclasses import dataclass, field


def _positive_int(name: str, v: object, allow_none: bool = False) -> None:
    if v is None and allow_none:
        return
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ValueError(f"analysis.{name} must be a positive integer, got {v!r}")


@dataclass
class AnalysisConfig:
    """Settings of `python -m tools.analyze`; each CLI flag maps to one field."""

    tasks: list[str] | None = None
    """Tasks to analyse (None: every task of the model that the dataset's train split holds)."""
    calib_samples: int = 50
    """Calibration samples per task, read from the TRAIN split (UniMoD computes ARank on ~50)."""
    eval_samples: int = 50
    """Validation samples per task on which the pruning probes measure quality."""
    batch_size: int = 8
    """Samples per forward pass (right-padded; causal attention keeps padding invisible)."""
    arank_max_tokens: int = 256
    """Longest attention map whose rank is taken: a longer sequence is subsampled to this many evenly
    spaced positions (first and last included) and the rank is that of the principal submatrix of the
    full-sequence softmax map at those positions (rows and columns), diagonal zeroed."""
    rank_rtol: float | None = None
    """Relative singular-value tolerance of the rank (None: torch.linalg.matrix_rank's eps * max(m, n)).
    The ARank of a causal map with its diagonal zeroed is n-1 in exact arithmetic, so this tolerance sets
    the number; it is recorded with every plan made from ARank."""
    measure: str = "token_skip"
    """What the planner ranks layers and sets capacities by (analysis/plan.py): token_skip (the measured loss
    increase when a layer keeps only part of a task's routable tokens, under a FLOPs target) | arank
    (UniMoD's published rule: lowest-ARank half of the layers, capacity = ARank ratio)."""
    flops_target: float = 0.4
    """token_skip: fraction of each planned task's dense forward FLOPs the plan removes (UniMoD reports -40%
    on Emu3); a task whose routable tokens cannot give that much gets the most its grid allows."""
    capacity_grid: list[float] = field(default_factory=lambda: [0.1, 0.125, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5,
                                                                0.6, 0.7, 0.8, 0.9])
    """token_skip: the capacities measured and planned from (ascending, in (0, 1))."""
    mod_fraction: float = 0.5
    """arank: fraction of the layers that become each task's MoD layers (those with the lowest ARank)."""
    capacity_min: float = 0.125
    """arank: lower clip of a planned capacity (the MoD paper's best setting is 12.5%)."""
    capacity_max: float = 0.9
    """arank: upper clip of a planned capacity."""
    plan_tasks: list[str] | None = None
    """Tasks that get MoD layers (None: every analysed task)."""
    prune_max_layers: int | None = None
    """Depth-pruning probe: drop up to this many blocks / sublayers (None: half the layers)."""
    width_fractions: list[float] = field(default_factory=lambda: [0.125, 0.25, 0.5])
    """Width-pruning probe: fractions of each MLP's neurons removed (lowest scores first)."""
    interaction_layers: int | None = None
    """Task interaction: how many of task A's most redundant blocks are skipped (None: a quarter of
    the layers, at least 1)."""
    interaction_width: float = 0.25
    """Task interaction: fraction of MLP neurons pruned by task A's neuron scores."""
    moe_experts: int = 4
    """MoE probe: experts per converted MLP (snake partition of the neurons)."""
    moe_top_k: list[int] | None = None
    """MoE probe: active experts per token evaluated (zero-initialised router, no training);
    None: 1, half and all of `moe_experts`."""
    moe_layers: list[int] | None = None
    """MoE probe: layers whose MLP is converted (None: all)."""
    probes: bool = True
    """Run the pruning probes (depth, width, MoE) on the validation split; False: only the measurements
    (ARank, cosine, loss when skipped, task interaction) and the plan."""
    probe_accuracy: bool = True
    """Score every probe row of mmu and t2i also by the evaluator (tools/evaluate.py: understanding accuracy on
    `eval_samples` validation questions, generation accuracy of `accuracy_images_per_digit` images per digit by
    the independent judge), beside the loss; only on data with the demo's labels (otherwise loss only)."""
    accuracy_images_per_digit: int = 3
    """Images per digit for a probe row's generation accuracy (30 images: about +-0.08 at 0.8)."""

    def __post_init__(self) -> None:
        for name in ("calib_samples", "eval_samples", "batch_size", "moe_experts", "accuracy_images_per_digit"):
            _positive_int(name, getattr(self, name))
        _positive_int("prune_max_layers", self.prune_max_layers, allow_none=True)
        _positive_int("interaction_layers", self.interaction_layers, allow_none=True)
        if isinstance(self.arank_max_tokens, bool) or not isinstance(self.arank_max_tokens, int) \
                or self.arank_max_tokens < 2:
            raise ValueError(f"analysis.arank_max_tokens must be an integer >= 2, got {self.arank_max_tokens!r}")
        if self.rank_rtol is not None and not (0 < self.rank_rtol < 1):
            raise ValueError(f"analysis.rank_rtol must be in (0, 1) or None, got {self.rank_rtol!r}")
        if self.measure not in ("token_skip", "arank"):
            raise ValueError(f"analysis.measure must be token_skip or arank, got {self.measure!r}")
        if not (isinstance(self.flops_target, (int, float)) and 0 < self.flops_target < 1):
            raise ValueError(f"analysis.flops_target must be in (0, 1), got {self.flops_target!r}")
        grid = self.capacity_grid
        if not grid or not all(isinstance(c, (int, float)) and not isinstance(c, bool) and 0 < c < 1 for c in grid) \
                or list(grid) != sorted(set(grid)):
            raise ValueError(f"analysis.capacity_grid must be distinct ascending capacities in (0, 1), got {grid!r}")
        if not 0 < self.mod_fraction <= 1:
            raise ValueError(f"analysis.mod_fraction must be in (0, 1], got {self.mod_fraction!r}")
        if not 0 < self.capacity_min <= self.capacity_max < 1:
            raise ValueError(f"analysis.capacity_min/capacity_max must satisfy 0 < min <= max < 1, "
                             f"got {self.capacity_min!r}, {self.capacity_max!r}")
        if not self.width_fractions or not all(isinstance(f, (int, float)) and 0 < f < 1
                                               for f in self.width_fractions):
            raise ValueError(f"analysis.width_fractions must be fractions in (0, 1), got {self.width_fractions!r}")
        if not (0 < self.interaction_width < 1 and math.isfinite(self.interaction_width)):
            raise ValueError(f"analysis.interaction_width must be in (0, 1), got {self.interaction_width!r}")
        if self.moe_top_k is None:
            self.moe_top_k = sorted({1, max(1, self.moe_experts // 2), self.moe_experts})
        if not self.moe_top_k or not all(isinstance(k, int) and not isinstance(k, bool) and 1 <= k <= self.moe_experts
                                         for k in self.moe_top_k):
            raise ValueError(f"analysis.moe_top_k must list integers in [1, moe_experts={self.moe_experts}], "
                             f"got {self.moe_top_k!r}")
        if self.moe_layers is not None and (not self.moe_layers or not all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in self.moe_layers)):
            raise ValueError(f"analysis.moe_layers must be a non-empty list of layer indices, got {self.moe_layers!r}")
        if self.tasks is not None and not self.tasks:
            raise ValueError("analysis.tasks must name at least one task (or be None for all)")
        if self.plan_tasks is not None and not self.plan_tasks:
            raise ValueError("analysis.plan_tasks must name at least one task (or be None for all)")

    def check_model(self, num_layers: int, tasks: list[str]) -> None:
        """Checks that need the model: layer indices and task names."""
        bad = [i for i in (self.moe_layers or []) if i >= num_layers]
        if bad:
            raise ValueError(f"analysis.moe_layers names layer {bad[0]} but the model has {num_layers} layers")
        unknown = [t for t in (self.tasks or []) if t not in tasks]
        if unknown:
            raise ValueError(f"analysis.tasks names {unknown[0]!r}, not one of the model's tasks {tasks}")
        unknown = [t for t in (self.plan_tasks or []) if t not in (self.tasks or tasks)]
        if unknown:
            raise ValueError(f"analysis.plan_tasks names {unknown[0]!r}, not one of the analysed tasks {tasks}")
