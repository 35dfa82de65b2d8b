"""The language-model loss, one definition for training, evaluation and analysis.

Labels are aligned with the inputs (data/layout.py `make_labels`): position t's label is the token at t, and
-100 marks a position that is not supervised (a prompt, padding, a document's first token). The model
predicts token t+1 from position t, so logits and labels are shifted by one here and nowhere else
(`next_token_targets`).

Emu3's vocabulary has 184,622 rows: full [B, S, V] logits, upcast to fp32 for the loss, are the largest
activation of a training step (7 GiB for one 10,240-token micro-batch, and their gradient as much again),
more than all decoder activations together. `linear_cross_entropy` computes the LM head and the loss
together in chunks, so no more than one chunk of logits ever exists (the approach of Liger's fused
linear cross-entropy and Apple's cut-cross-entropy, in plain torch). Training, the pipeline's last stage and
the evaluator's perplexity use it; `causal_lm_loss` on full logits stays for callers that want the logits.
"""

from __future__ import annotations

import math
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
    """Rows per chunk (all vocabulary columns) under `chunk_budget`, where `linear_cross_entropy` goes by rows
    (small vocabularies, `grads_in_forward`): 1,024 rows of 4,096 ids at hidden 512 in fp32."""
    return max(1, min(rows, chunk_budget(rows, hidden, itemsize) // (4 * vocab)))


def chunk_columns(rows: int, hidden: int, vocab: int, itemsize: int) -> int:
    """Vocabulary columns per chunk (all rows) under `chunk_budget`, where `linear_cross_entropy` goes by
    columns (large vocabularies): hidden x itemsize / 4 columns, or more when the floor allows. At Emu3-8B
    shapes (10,240 bf16 rows of 4,096, vocabulary 184,622): 2,048 columns, 91 chunks of 80 MiB of fp32 logits
    instead of 7 GiB."""
    return max(1, min(vocab, chunk_budget(rows, hidden, itemsize) // (4 * max(rows, 1))))


def grads_in_forward(rows: int, hidden: int, vocab: int, itemsize: int) -> bool:
    """Whether `linear_cross_entropy` computes its gradients during the forward (three head matmuls, as an
    unfused head) rather than recomputing the logits in the backward (four): when an fp32 accumulator of the
    weight's gradient fits the chunk budget, i.e. for small vocabularies (the demo's, the CPU benchmarks');
    never at Emu3's 184k vocabulary, where that accumulator would be 3 GiB."""
    return vocab * hidden * 4 <= chunk_budget(rows, hidden, itemsize)


def head_loss_bytes(rows: int, hidden: int, vocab: int, itemsize: int, weight_grad: bool = True) -> int:
    """Peak transient bytes of `linear_cross_entropy` beyond its inputs, for the capacity planner: one chunk of
    fp32 logits and its cast to the weight's dtype, the input's gradient (an fp32 accumulator when the backward
    recomputes the logits), and, with `weight_grad`, the weight's whole gradient (an unchunked head allocates it
    as well; leave it out where the gradients are counted whole anyway, as on a pipeline stage) plus its fp32
    accumulator when the gradients are computed in the forward."""
    weight = vocab * hidden * itemsize if weight_grad else 0
    if grads_in_forward(rows, hidden, vocab, itemsize):
        chunk = chunk_rows(rows, hidden, vocab, itemsize) * vocab
        cast = chunk * itemsize if itemsize < 4 else 0
        return chunk * 4 + cast + rows * hidden * itemsize + vocab * hidden * 4 + weight
    cols = chunk_columns(rows, hidden, vocab, itemsize)
    cast = rows * cols * itemsize if itemsize < 4 else 0
    return rows * cols * 4 + cast + rows * hidden * 4 + weight


def _softmax_minus_one_hot_(logits: torch.Tensor, lse: torch.Tensor, target: torch.Tensor, first: int,
                            scale: torch.Tensor) -> torch.Tensor:
    """In place on fp32 logits [N, C] of vocabulary columns first..first+C: (softmax - one_hot(target)) * scale
    [N] = d(sum of scaled CE) / d logits. Rows whose target is outside these columns get no one-hot entry."""
    g = logits.sub_(lse[:, None]).exp_()
    cols = g.shape[1]
    hit = (target >= first) & (target < first + cols)
    # scatter_add, not boolean indexing: no device->host sync per chunk on a GPU.
    g.scatter_add_(1, (target - first).clamp(0, cols - 1)[:, None], -hit.to(g.dtype)[:, None])
    return g.mul_(scale[:, None])


def _lse_by_columns(x: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                    cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-sum-exp of every row's logits [N] fp32, summed CE of the supervised rows []) over chunks of
    vocabulary columns for all rows at once, with a running max (the online softmax): [N, cols] logits at a
    time, in matmuls as wide as the batch (chunks of rows would make them as thin as 22 rows at emu3-1b's
    widths, slow on CPUs and below tensor-core tile sizes on GPUs)."""
    n = x.shape[0]
    run_max = torch.full((n,), -math.inf, dtype=torch.float32, device=x.device)
    run_sum = torch.zeros(n, dtype=torch.float32, device=x.device)
    picked = torch.zeros(n, dtype=torch.float32, device=x.device)
    V = weight.shape[0]
    for start in range(0, V, cols):
        end = min(start + cols, V)
        logits = (x @ weight[start:end].t()).float()  # [N, Vc]
        new_max = torch.maximum(run_max, logits.max(dim=1).values)
        run_sum = run_sum * torch.exp(run_max - new_max) + torch.exp(logits - new_max[:, None]).sum(dim=1)
        run_max = new_max
        hit = (target >= start) & (target < end)
        col = (target - start).clamp(0, end - start - 1)[:, None]
        picked += torch.where(hit, logits.gather(1, col).squeeze(1), 0.0)
    lse = run_max + torch.log(run_sum)
    return lse, torch.where(target != IGNORE_INDEX, lse - picked, 0.0).sum()


class _LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(x_i @ weight.T, target_i) over rows whose target is not IGNORE_INDEX, in chunks.

    Two ways, by memory (`grads_in_forward`):
    - gradients in the forward (small vocabularies): chunks of rows over the whole vocabulary give each row's
      log-sum-exp and loss, and their softmax - one_hot gives those rows of the input's gradient and adds into
      an fp32 accumulator of the weight's gradient while the logits are at hand (as Liger's fused kernel does);
      the backward only scales them. Three head matmuls, as an unfused head.
    - recomputation (large vocabularies, the way Apple's cut-cross-entropy does it): the forward runs chunks of
      vocabulary columns over all rows with an online log-sum-exp and keeps only that [N]; the backward's
      chunks of vocabulary columns recompute their logits, write that slice of the weight's gradient exactly
      once and add their share of the input's gradient into an fp32 [N, D] accumulator. One head matmul more
      (about 3% of an Emu3-8B step's FLOPs), for no [N, V] tensor and no [V, D] fp32 accumulator read and
      written once per chunk (3 GiB at Emu3-8B)."""

    @staticmethod
    def forward(ctx, x, weight, target, rows_per_chunk, cols_per_chunk, in_forward):  # noqa: D401
        ctx.in_forward, ctx.cols_per_chunk = in_forward, cols_per_chunk
        if not in_forward:
            lse, total = _lse_by_columns(x, weight, target, cols_per_chunk)
            ctx.save_for_backward(x, weight, target, lse)
            return total
        n = x.shape[0]
        want_x, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        total = torch.zeros((), dtype=torch.float32, device=x.device)
        grad_x = torch.empty_like(x) if want_x else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=x.device) if want_w else None
        for start in range(0, n, rows_per_chunk):
            end = start + rows_per_chunk
            xc, tc = x[start:end], target[start:end]
            logits = (xc @ weight.t()).float()  # [C, V], the only logits that exist
            valid = tc != IGNORE_INDEX
            lse = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(1, torch.where(valid, tc, 0)[:, None]).squeeze(1)
            total += torch.where(valid, lse - picked, 0.0).sum()
            g = _softmax_minus_one_hot_(logits, lse, tc, 0, valid.to(torch.float32))
            if want_w and g.dtype == xc.dtype:
                grad_w.addmm_(g.t(), xc)
            elif want_w:  # a low-precision product per chunk, summed in fp32
                grad_w += g.to(xc.dtype).t() @ xc
            if want_x:
                torch.mm(g.to(x.dtype), weight, out=grad_x[start:end])
        ctx.save_for_backward(grad_x, None if grad_w is None else grad_w.to(weight.dtype))
        return total

    @staticmethod
    def backward(ctx, grad_total):
        if ctx.in_forward:
            grad_x, grad_w = ctx.saved_tensors
            return (None if grad_x is None else grad_x * grad_total.to(grad_x.dtype),
                    None if grad_w is None else grad_w * grad_total.to(grad_w.dtype), None, None, None, None)
        x, weight, target, lse = ctx.saved_tensors
        want_x, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        scale = (target != IGNORE_INDEX).to(torch.float32) * grad_total.to(torch.float32)  # [N]
        grad_x = torch.zeros(x.shape, dtype=torch.float32, device=x.device) if want_x else None
        grad_w = torch.empty_like(weight) if want_w else None
        V, cols = weight.shape[0], ctx.cols_per_chunk
        for start in range(0, V, cols):
            end = min(start + cols, V)
            w = weight[start:end]
            g = _softmax_minus_one_hot_((x @ w.t()).float(), lse, target, start, scale).to(x.dtype)  # [N, Vc]
            if want_w:
                torch.mm(g.t(), x, out=grad_w[start:end])
            if want_x:
                grad_x += g @ w
        return (None if grad_x is None else grad_x.to(x.dtype), grad_w, None, None, None, None)


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                         rows_per_chunk: int | None = None, cols_per_chunk: int | None = None,
                         in_forward: bool | None = None) -> torch.Tensor:
    """Summed cross-entropy (fp32 scalar) of the logits `x @ weight.T` against `target`, IGNORE_INDEX rows
    excluded, without materialising the logits: x [N, D] (or [..., D]), weight [V, D], target [N] (or [...]).

    Exact to fp32 rounding against `F.cross_entropy(x @ weight.T, target, reduction="sum")`, values and
    gradients. Chunk sizes, and whether the gradients are computed in the forward, default to what memory
    allows (`chunk_rows`, `chunk_columns`, `grads_in_forward`)."""
    x, target = x.reshape(-1, x.shape[-1]), target.reshape(-1)
    if target.shape[0] != x.shape[0]:
        raise ValueError(f"linear_cross_entropy: {x.shape[0]} rows of hidden states but {target.shape[0]} targets")
    n, d, v, size = x.shape[0], x.shape[1], weight.shape[0], x.element_size()
    rows_per_chunk = rows_per_chunk or chunk_rows(n, d, v, size)
    cols_per_chunk = cols_per_chunk or chunk_columns(n, d, v, size)
    if in_forward is None:
        in_forward = grads_in_forward(n, d, v, size)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(x, weight, target, rows_per_chunk, cols_per_chunk, in_forward)
    if not in_forward:  # no gradients wanted: the same chunks as the forward with gradients
        return _lse_by_columns(x, weight, target, cols_per_chunk)[1]
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
    vocab = head(x[:1]).shape[-1]  # `head` is opaque: one row through it tells the vocabulary size
    chunk = chunk_rows(x.shape[0], x.shape[1], vocab, x.element_size())
    for start in range(0, x.shape[0], chunk):
        logits = head(x[start:start + chunk]).float()
        nll = F.cross_entropy(logits, tgt[start:start + chunk], reduction="none")
        total.index_add_(0, rows[start:start + chunk], nll)
    return total, sel.sum(1)
