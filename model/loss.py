"""The language-model loss, one definition for training, evaluation and analysis.

Labels are aligned with the inputs (data/layout.py `make_labels`): position t's label is the token at t, and
-100 marks a position that is not supervised (a prompt, padding, a document's first token). The model
predicts token t+1 from position t, so logits and labels are shifted by one here and nowhere else.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def causal_lm_nll_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed next-token NLL in fp32, number of supervised targets) over a [B, S, V] batch."""
    logits = logits[:, :-1].flatten(0, 1).float()
    target = labels[:, 1:].flatten()
    total = F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX, reduction="sum")
    return total, (target != IGNORE_INDEX).sum()


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over supervised positions. A micro-batch with nothing supervised gives 0,
    not NaN (its rows were all prompt or padding)."""
    total, count = causal_lm_nll_sum(logits, labels)
    return total / count.clamp_min(1)


def causal_lm_nll_per_row(hidden: torch.Tensor, labels: torch.Tensor,
                          head: Callable[[torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(NLL summed per row [B] in fp32, supervised targets per row [B]) from final hidden states [B, S, D].
    Only supervised positions go through `head` (norm + LM head): [N, V] logits instead of [B, S, V], which
    matters at Emu3's 184k vocabulary."""
    target = labels[:, 1:]
    sel = target != IGNORE_INDEX  # [B, S-1]
    logits = head(hidden[:, :-1][sel]).float()
    nll = F.cross_entropy(logits, target[sel], reduction="none")
    rows = sel.nonzero(as_tuple=True)[0]
    total = torch.zeros(hidden.shape[0], dtype=torch.float32, device=nll.device).index_add(0, rows, nll)
    return total, sel.sum(1)
