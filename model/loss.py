"""The language-model loss, one definition for training, evaluation and analysis.

Labels are aligned with the inputs (data/layout.py `make_labels`): position t's label is the token at t, and
-100 marks a position that is not supervised (a prompt, padding, a document's first token). The model
predicts token t+1 from position t, so logits and labels are shifted by one here and nowhere else
(`next_token_targets`).

Emu3's vocabulary has 184,622 rows: full [B, S, V] logits, upcast to fp32 for the loss, are the largest
activation of a training step (7 GiB for one 10,240-token micro-batch, and their gradient as much again),
more than all decoder activations together. `linear_cross_entropy` computes the LM head and the loss
together in chunks of rows, so no more than one chunk of logits ever exists (the approach of Liger's fused
linear cross-entropy and Apple's cut-cross-entropy, in plain torch). Training, the pipeline's last stage and
the evaluator's perplexity use it; `causal_lm_loss` on full logits stays for callers that want the logits.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100

CHUNK_FLOOR_BYTES = 16 << 20
"""Smallest logits chunk worth a kernel launch (16 MiB of fp32 logits), whatever the hidden states' size."""


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


def next_token_targets(labels: torch.Tensor) -> torch.Tensor:
    """[B, S] labels aligned with the inputs -> [B, S] targets aligned with the logits: position t's target is
    the label at t+1; the last position of each row has none (IGNORE_INDEX)."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def chunk_budget(rows: int, hidden: int, itemsize: int) -> int:
    """Bytes of fp32 logits one chunk of `linear_cross_entropy` may hold: the size of its input hidden states
    (rows x hidden x itemsize), at least 16 MiB, so the head never needs more transient memory than one more
    copy of its input."""
    return max(rows * hidden * itemsize, CHUNK_FLOOR_BYTES)


def chunk_rows(rows: int, hidden: int, vocab: int, itemsize: int) -> int:
    """Rows per forward chunk (all vocabulary columns) under `chunk_budget`. At Emu3-8B shapes (10,240 bf16
    rows of 4,096, vocabulary 184,622): 113 rows, 91 chunks of 80 MiB instead of 7 GiB of logits."""
    return max(1, min(rows, chunk_budget(rows, hidden, itemsize) // (4 * vocab)))


def chunk_columns(rows: int, hidden: int, vocab: int, itemsize: int) -> int:
    """Vocabulary columns per backward chunk (all rows) under `chunk_budget`: hidden x itemsize / 4 columns
    (2,048 for bf16 at 4,096 wide), or more when the floor allows."""
    return max(1, min(vocab, chunk_budget(rows, hidden, itemsize) // (4 * rows)))


def head_loss_bytes(rows: int, hidden: int, vocab: int, itemsize: int, weight_grad: bool = True) -> int:
    """Peak transient bytes of `linear_cross_entropy`'s backward beyond its inputs, for the capacity planner:
    one column chunk of fp32 logits and its cast to the weight's dtype, the fp32 input-gradient accumulator
    and, with `weight_grad`, the weight's whole gradient (an unchunked head allocates it as well; leave it out
    where the gradients are counted whole anyway, as on a pipeline stage)."""
    cols = chunk_columns(rows, hidden, vocab, itemsize)
    cast = rows * cols * itemsize if itemsize < 4 else 0
    return rows * cols * 4 + cast + rows * hidden * 4 + (vocab * hidden * itemsize if weight_grad else 0)


class _LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(x_i @ weight.T, target_i) over rows whose target is not IGNORE_INDEX, in chunks.

    Forward: chunks of rows over the whole vocabulary give each row's log-sum-exp and the loss; only the
    log-sum-exp [N] is kept. Backward (the way Apple's cut-cross-entropy does it): chunks of vocabulary columns
    over all rows recompute their logits, turn them into softmax - one_hot, write that slice of the weight's
    gradient exactly once (one rounding, no accumulation over chunks in the weight's dtype) and add their share
    of the input's gradient into an fp32 [N, D] accumulator. That is one more head matmul than an unfused
    forward + backward (about 3% of an Emu3-8B step's FLOPs) for no [N, V] tensor and no second [V, D] one:
    accumulating the weight gradient over row chunks instead would need an fp32 [V, D] accumulator (3 GiB at
    Emu3-8B) read and written once per chunk."""

    @staticmethod
    def forward(ctx, x, weight, target, rows_per_chunk, cols_per_chunk):  # noqa: D401
        n = x.shape[0]
        lse = torch.empty(n, dtype=torch.float32, device=x.device)
        total = torch.zeros((), dtype=torch.float32, device=x.device)
        for start in range(0, n, rows_per_chunk):
            end = start + rows_per_chunk
            logits = (x[start:end] @ weight.t()).float()  # [C, V], the only logits that exist
            tc = target[start:end]
            valid = tc != IGNORE_INDEX
            lse[start:end] = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(1, torch.where(valid, tc, 0)[:, None]).squeeze(1)
            total += torch.where(valid, lse[start:end] - picked, 0.0).sum()
        ctx.save_for_backward(x, weight, target, lse)
        ctx.cols_per_chunk = cols_per_chunk
        return total

    @staticmethod
    def backward(ctx, grad_total):
        x, weight, target, lse = ctx.saved_tensors
        want_x, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        # d(sum CE)/d logits = softmax - one_hot(target), zero on unsupervised rows; times the incoming scale.
        scale = (target != IGNORE_INDEX).to(torch.float32) * grad_total.to(torch.float32)  # [N]
        grad_x = torch.zeros(x.shape, dtype=torch.float32, device=x.device) if want_x else None
        grad_w = torch.empty_like(weight) if want_w else None
        V, cols = weight.shape[0], ctx.cols_per_chunk
        for start in range(0, V, cols):
            end = min(start + cols, V)
            w = weight[start:end]
            g = (x @ w.t()).float().sub_(lse[:, None]).exp_()  # [N, Vc] softmax slice
            hit = (target >= start) & (target < end)  # rows whose target column is in this slice
            g.scatter_add_(1, (target - start).clamp(0, end - start - 1)[:, None], -hit.to(g.dtype)[:, None])
            g = g.mul_(scale[:, None]).to(x.dtype)
            if want_w:
                torch.mm(g.t(), x, out=grad_w[start:end])
            if want_x:
                grad_x += g @ w
        return (None if grad_x is None else grad_x.to(x.dtype), grad_w, None, None, None)


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                         rows_per_chunk: int | None = None, cols_per_chunk: int | None = None) -> torch.Tensor:
    """Summed cross-entropy (fp32 scalar) of the logits `x @ weight.T` against `target`, IGNORE_INDEX rows
    excluded, without materialising the logits: x [N, D] (or [..., D]), weight [V, D], target [N] (or [...]).

    Exact to fp32 rounding against `F.cross_entropy(x @ weight.T, target, reduction="sum")`, values and
    gradients. Chunk sizes default to what memory allows (`chunk_rows`, `chunk_columns`)."""
    x, target = x.reshape(-1, x.shape[-1]), target.reshape(-1)
    if target.shape[0] != x.shape[0]:
        raise ValueError(f"linear_cross_entropy: {x.shape[0]} rows of hidden states but {target.shape[0]} targets")
    n, d, v, size = x.shape[0], x.shape[1], weight.shape[0], x.element_size()
    rows_per_chunk = rows_per_chunk or chunk_rows(n, d, v, size)
    cols_per_chunk = cols_per_chunk or chunk_columns(n, d, v, size)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(x, weight, target, rows_per_chunk, cols_per_chunk)
    total = torch.zeros((), dtype=torch.float32, device=x.device)
    for start in range(0, n, rows_per_chunk):
        logits = (x[start:start + rows_per_chunk] @ weight.t()).float()
        total += F.cross_entropy(logits, target[start:start + rows_per_chunk], ignore_index=IGNORE_INDEX,
                                 reduction="sum")
    return total


def causal_lm_nll_per_row(hidden: torch.Tensor, labels: torch.Tensor,
                          head: Callable[[torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(NLL summed per row [B] in fp32, supervised targets per row [B]) from final hidden states [B, S, D].
    Only supervised positions go through `head` (norm + LM head), a chunk of rows at a time (`chunk_rows`):
    logits never exist for more than one chunk, which matters at Emu3's 184k vocabulary."""
    target = labels[:, 1:]
    sel = target != IGNORE_INDEX  # [B, S-1]
    x, tgt = hidden[:, :-1][sel], target[sel]
    rows = sel.nonzero(as_tuple=True)[0]
    total = torch.zeros(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    if x.shape[0] == 0:
        return total, sel.sum(1)
    first = head(x[:1])
    chunk = chunk_rows(x.shape[0], x.shape[1], first.shape[-1], x.element_size())
    for start in range(0, x.shape[0], chunk):
        logits = head(x[start:start + chunk]).float()
        nll = F.cross_entropy(logits, tgt[start:start + chunk], reduction="none")
        total.index_add_(0, rows[start:start + chunk], nll)
    return total, sel.sum(1)
