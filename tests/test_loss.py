"""The chunked LM head + loss (model/loss.py `linear_cross_entropy`) against the plain loss on full logits:
values and gradients, inside the model (dense and MoD, packed rows), on the pipeline's last stage and in the
evaluator's perplexity; and that no tensor as large as the logits is ever created."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import model.loss
from model import ModelConfig, UnifiedTransformer
from model.loss import (IGNORE_INDEX, causal_lm_loss, chunk_columns, chunk_rows, grads_in_forward,
                        head_loss_bytes, linear_cross_entropy)
from tests.model_helpers import LM, MMU, T2I, pack, sample

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _problem(dtype=torch.float32, n=50, d=16, v=37, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g).to(dtype).requires_grad_()
    w = torch.randn(v, d, generator=g).to(dtype).requires_grad_()
    t = torch.randint(0, v, (n,), generator=g)
    t[::7] = IGNORE_INDEX
    t[20:30] = IGNORE_INDEX  # a whole chunk of unsupervised rows for the small chunk sizes
    t[0], t[1] = 0, v - 1  # the first and last vocabulary columns are targets
    return x, w, t


@pytest.mark.parametrize("in_forward", [False, True], ids=["recompute", "grads_in_forward"])
@pytest.mark.parametrize("rows,cols", [(1, 1), (7, 5), (10, 36), (50, 37), (None, None)])
def test_values_and_gradients_equal_cross_entropy_on_full_logits(rows, cols, in_forward):
    x, w, t = _problem()
    got = linear_cross_entropy(x, w, t, rows, cols, in_forward)
    (got * 0.37).backward()  # a loss scale other than 1 reaches both gradients
    gx, gw = x.grad, w.grad
    x2, w2 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    want = F.cross_entropy(x2 @ w2.t(), t, ignore_index=IGNORE_INDEX, reduction="sum")
    (want * 0.37).backward()
    assert got.dtype == torch.float32 and got.shape == ()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(gx, x2.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gw, w2.grad, rtol=1e-5, atol=1e-6)
    assert gw[t[t >= 0]].abs().sum() > 0 and gx[t == IGNORE_INDEX].abs().max() == 0


@pytest.mark.parametrize("in_forward", [False, True], ids=["recompute", "grads_in_forward"])
def test_bf16_is_as_accurate_as_the_unchunked_bf16_head(in_forward):
    """In bf16 both the chunked head and the plain one (bf16 logits upcast for the loss) round; measured
    against an fp32 reference, the chunked one's error is no larger than the plain one's."""
    x, w, t = _problem(torch.bfloat16, n=64, d=32, v=300)
    got = linear_cross_entropy(x, w, t, 9, 40, in_forward)
    got.backward()
    xp, wp = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    plain = F.cross_entropy((xp @ wp.t()).float(), t, ignore_index=IGNORE_INDEX, reduction="sum")
    plain.backward()
    x32, w32 = x.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    ref = F.cross_entropy(x32 @ w32.t(), t, ignore_index=IGNORE_INDEX, reduction="sum")
    ref.backward()
    assert got.dtype == torch.float32 and x.grad.dtype == w.grad.dtype == torch.bfloat16

    def err(a, b):
        return float((a.detach().float() - b.detach()).abs().max())

    assert err(got, ref) <= 1.5 * err(plain, ref) + 1e-3
    assert err(x.grad, x32.grad) <= 1.5 * err(xp.grad, x32.grad) + 1e-3
    assert err(w.grad, w32.grad) <= 1.5 * err(wp.grad, w32.grad) + 1e-3


@pytest.mark.parametrize("in_forward", [False, True], ids=["by_columns", "by_rows"])
def test_without_gradients_the_value_is_the_same(in_forward):
    x, w, t = _problem()
    with torch.no_grad():
        got = linear_cross_entropy(x, w, t, 7, 5, in_forward)
    assert not got.requires_grad
    want = F.cross_entropy(x @ w.t(), t, ignore_index=IGNORE_INDEX, reduction="sum")
    torch.testing.assert_close(got, want.detach(), rtol=1e-6, atol=1e-5)


def test_mismatched_targets_are_an_error():
    x, w, t = _problem()
    with pytest.raises(ValueError, match="50 rows of hidden states but 49 targets"):
        linear_cross_entropy(x, w, t[:-1])


def test_chunk_sizes_follow_memory():
    # Emu3-8B, one 10,240-token bf16 micro-batch: chunks of fp32 logits no larger than the hidden states, and
    # the logits recomputed in the backward (an fp32 weight-gradient accumulator would be 3 GiB).
    assert chunk_rows(10240, 4096, 184622, 2) == 10240 * 4096 * 2 // (4 * 184622) == 113
    assert chunk_columns(10240, 4096, 184622, 2) == 2048
    assert not grads_in_forward(10240, 4096, 184622, 2)
    # A 4,096-id vocabulary at hidden 512 (the CPU benchmarks): the 8 MiB accumulator fits the 16 MiB budget.
    assert grads_in_forward(4096, 512, 4096, 4) and not grads_in_forward(4096, 512, 8193, 4)
    # The 16 MiB floor for small inputs; never more rows or columns than there are.
    assert chunk_rows(256, 64, 1000, 4) == 256 and chunk_columns(256, 64, 1000, 4) == 1000
    assert chunk_rows(4096, 512, 4096, 4) == (16 << 20) // (4 * 4096) == 1024
    # Transient bytes of the head at Emu3-8B: far below the full fp32 logits (7.04 GiB).
    full = 10240 * 184622 * 4
    assert full / 2**30 == pytest.approx(7.04, abs=0.01)
    assert head_loss_bytes(10240, 4096, 184622, 2) == (10240 * 2048 * (4 + 2) + 10240 * 4096 * 4
                                                       + 184622 * 4096 * 2)
    assert head_loss_bytes(10240, 4096, 184622, 2) < full / 4


# ----- in the model ---------------------------------------------------------------------------------------
def _batch(cfg: ModelConfig):
    """Packed rows of all three tasks with padding; labels: prompts unsupervised, padding unsupervised."""
    g = torch.Generator().manual_seed(3)
    rows = [[sample(cfg, T2I, 20, generator=g), sample(cfg, T2I, 17, generator=g)],
            [sample(cfg, MMU, 30, generator=g)], [sample(cfg, LM, 25, generator=g), sample(cfg, LM, 9, generator=g)]]
    ids, pos = pack(cfg, rows, 40)
    labels = ids.clone()
    labels[ids == cfg.vocab.pad_id] = IGNORE_INDEX
    labels[:, :4] = IGNORE_INDEX
    return ids, pos, torch.tensor([T2I, MMU, LM]), labels


@pytest.mark.parametrize("in_forward", [False, True], ids=["recompute", "grads_in_forward"])
@pytest.mark.parametrize("mod", [None, {"capacity": {"2-3": {"t2i": 0.25, "mmu": 0.5}}}], ids=["dense", "mod"])
def test_model_loss_and_gradients_equal_the_loss_on_full_logits(mod, in_forward, monkeypatch):
    monkeypatch.setattr(model.loss, "grads_in_forward", lambda *a: in_forward)
    monkeypatch.setattr(model.loss, "CHUNK_FLOOR_BYTES", 0)  # several chunks even at these tiny shapes
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("debug", **({"mod": mod} if mod else {}))
    a = UnifiedTransformer(cfg)
    b = UnifiedTransformer(cfg)
    b.load_state_dict(a.state_dict())
    ids, pos, tasks, labels = _batch(cfg)
    out = a(ids, task_ids=tasks, position_ids=pos, labels=labels)
    assert out.logits is None
    (out.loss + out.aux_loss).backward()
    ref = b(ids, task_ids=tasks, position_ids=pos)
    want = causal_lm_loss(ref.logits, labels)
    (want + ref.aux_loss).backward()
    torch.testing.assert_close(out.loss, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.aux_loss, ref.aux_loss)
    grads_b = dict(b.named_parameters())
    for name, p in a.named_parameters():
        torch.testing.assert_close(p.grad, grads_b[name].grad, rtol=1e-5, atol=1e-7, msg=name)


def test_nothing_supervised_gives_zero_not_nan():
    torch.manual_seed(0)
    net = UnifiedTransformer(ModelConfig.from_preset("debug"))
    ids = torch.randint(0, 256, (2, 12))
    out = net(ids, labels=torch.full_like(ids, IGNORE_INDEX))
    assert out.loss.item() == 0.0
    out.loss.backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in net.parameters())


class _LargestTensor(TorchDispatchMode):
    """Records the element count of the largest tensor any op produces."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("in_forward", [False, True], ids=["recompute", "grads_in_forward"])
def test_no_tensor_as_large_as_the_logits(monkeypatch, in_forward):
    """Forward + backward with labels never creates a tensor of B x S x V elements (or anything near it);
    the same step through the full logits does (so the probe sees them when they exist)."""
    monkeypatch.setattr(model.loss, "CHUNK_FLOOR_BYTES", 0)  # chunks sized by the hidden states alone
    monkeypatch.setattr(model.loss, "grads_in_forward", lambda *a: in_forward)
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("debug", vocab={"visual_size": 3000, "vocab_size": 3264})
    net = UnifiedTransformer(cfg)
    B, S = 2, 256
    ids = torch.randint(0, cfg.vocab_size, (B, S))
    logits_numel = B * S * cfg.vocab_size
    with _LargestTensor() as chunked:
        net(ids, labels=ids).loss.backward()
    with _LargestTensor() as full:
        causal_lm_loss(net(ids).logits, ids).backward()
    assert full.largest >= logits_numel
    # The embedding / head weights and their gradients (V x D) are the largest tensors left: 1/8 of the logits.
    assert chunked.largest == cfg.vocab_size * cfg.hidden_size <= logits_numel / 8, (chunked.largest, logits_numel)


# ----- pipeline last stage and evaluator ------------------------------------------------------------------
def test_pipeline_loss_runs_the_head_on_the_last_stage_hidden_states():
    """train/pipeline.py PipelineLoss over the stages' output equals the model's loss on full logits + aux."""
    from model.transformer import stage_key_to_hf
    from train.pipeline import PipelineLoss
    from train.stages import HeadPipe, stage_specs

    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("debug", mod={"capacity": {"2-3": {"t2i": 0.25}}})
    net = UnifiedTransformer(cfg)
    layers = [spec.build() for spec in stage_specs(cfg)]
    state = net.state_dict()
    for i, layer in enumerate(layers):
        layer.load_state_dict({k: state[stage_key_to_hf(f"{i}.{k}", cfg.num_hidden_layers)]
                               for k in layer.state_dict()})
    ids, pos, tasks, labels = _batch(cfg)
    x = (ids, tasks, pos)
    for layer in layers:
        x = layer(x)
    loss_fn = PipelineLoss()
    assert isinstance(layers[-1], HeadPipe)
    loss_fn.head = layers[-1]
    got = loss_fn(x, labels)
    ref = net(ids, task_ids=tasks, position_ids=pos)
    torch.testing.assert_close(got, causal_lm_loss(ref.logits, labels) + ref.aux_loss, rtol=1e-6, atol=1e-6)


def test_evaluator_perplexity_is_the_full_logits_perplexity(demo_dataset):
    """tools/evaluate.py's perplexity (chunked loss) equals exp of the token-weighted CE computed here from
    full logits on the same batches."""
    import json

    from data.layout import make_labels
    from tools.evaluate import EvalConfig, Evaluator

    ev = Evaluator(demo_dataset, EvalConfig(max_samples=6, images_per_digit=1, batch_size=4))
    vocab = json.loads((demo_dataset / "manifest.json").read_text())["vocab"]
    torch.manual_seed(0)
    net = UnifiedTransformer(ModelConfig.from_preset("debug", vocab=vocab)).eval()
    got = ev.perplexity(net)["text/perplexity_topk"]
    lm = torch.tensor(net.config.mod.tasks.index("lm"))
    nll, count = 0.0, 0
    with torch.no_grad():
        for ids, batch in ev._batches("lm"):
            labels = torch.full_like(ids, IGNORE_INDEX)
            for b, (key, x, meta, _) in enumerate(batch):
                labels[b, :len(x)] = torch.as_tensor(make_labels(x, "lm", meta, ev.vocab.layout, key=key))
            logits = net(ids, task_ids=lm.expand(len(batch))).logits[:, :-1].flatten(0, 1)
            target = labels[:, 1:].flatten()
            nll += float(F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX, reduction="sum"))
            count += int((target != IGNORE_INDEX).sum())
    assert count > 0
    assert got == pytest.approx(math.exp(nll / count), rel=1e-5)
