"""The evaluator measures something: real validation digits score 100% generation accuracy and noise scores
chance; answers are judged by the digit they name; router agreement and perplexity are the model's."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from model import ModelConfig, UnifiedTransformer
from tools.evaluate import EvalConfig, Evaluator, names_digits


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def evaluator(demo_dataset) -> Evaluator:
    return Evaluator(demo_dataset, EvalConfig(max_samples=8, images_per_digit=2, batch_size=20))


def demo_model(demo_dataset, seed: int = 0) -> UnifiedTransformer:
    """A random debug model in the demo's vocabulary with the smoke config's MoD plan."""
    vocab = json.loads((demo_dataset / "manifest.json").read_text())["vocab"]
    torch.manual_seed(seed)
    cfg = ModelConfig.from_preset("debug", vocab=vocab, mod={"capacity": {"2-3": {"t2i": 0.25, "mmu": 0.25}}})
    return UnifiedTransformer(cfg)


def test_real_validation_images_score_100_percent(evaluator):
    metrics, images = evaluator.generation("real")
    assert metrics["generation/accuracy"] == 1.0
    assert all(metrics[f"generation/accuracy_digit_{d}"] == 1.0 for d in range(10))
    assert images.shape == (20, 8, 8)  # the demo's native grey8 grid
    # The whole validation split through the tokenizer round trip: the judge is good, not just lucky.
    tok = evaluator.image_tokenizer
    pred = evaluator.classifier.predict(tok.decode(tok.encode(evaluator.val_images)))
    assert (pred == evaluator.val_labels).mean() >= 0.97


def test_noise_scores_chance(demo_dataset):
    ev = Evaluator(demo_dataset, EvalConfig(max_samples=1, images_per_digit=30))
    metrics, images = ev.generation("noise")
    assert images.shape == (300, 8, 8)
    # Prompts are balanced over digits, so a judge that reads nothing scores 1/10 in expectation.
    assert abs(metrics["generation/accuracy"] - 0.1) <= 0.06


def test_names_digits():
    assert names_digits("It is seven, an odd number.") == {7}
    assert names_digits("The image shows a handwritten 4.") == {4}
    assert names_digits("Zero.") == {0}
    assert names_digits("someone wrote 12 or three") == {3}  # "12" is not a digit, "one" inside a word neither
    assert names_digits("nine 9") == {9}
    assert names_digits("It is two, an even number. Or 5.") == {2, 5}


def test_run_on_a_model_reports_every_metric(evaluator, demo_dataset):
    model = demo_model(demo_dataset).train()
    result = evaluator.run(model)
    m = result.metrics
    assert model.training  # mode restored
    assert 0.0 <= m["understanding/accuracy"] <= 1.0
    assert 0.0 <= m["generation/accuracy"] <= 1.0
    # An untrained model is about uniform over the 776 ids: perplexity near the vocabulary size.
    assert 300 < m["text/perplexity"] < 2000 and math.isfinite(m["text/perplexity_topk"])
    for task in ("t2i", "mmu"):
        for layer in (2, 3):
            assert 0.0 <= m[f"router/agreement/{task}/layer_{layer}"] <= 1.0
    assert "router/agreement/lm/layer_2" not in m  # lm is not routed in this plan
    assert result.images.shape == (20, 8, 8)
    grid = result.grid()
    assert grid.dtype == np.uint8 and grid.shape == (2 + 10 * 34, 2 + 2 * 34, 3)


def test_router_agreement_is_one_minus_the_topk_keep_rate_for_zero_routers(evaluator, demo_dataset):
    """With every router logit 0 the causal rule keeps nothing, so agreement must equal the fraction of
    routable tokens top-k skipped, which the forward itself reports in `out.routing`."""
    model = demo_model(demo_dataset).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            if layer.mod_router is not None:
                layer.mod_router.weight.zero_()
    m = evaluator.router_agreement(model)
    for task in ("t2i", "mmu"):
        t = model.config.mod.tasks.index(task)
        stats = torch.zeros(4, 2)
        with torch.no_grad():
            for ids, batch in evaluator._batches(task):
                stats += model(ids, task_ids=torch.full((len(batch),), t), routing="topk").routing[:, t, :2]
        for layer in (2, 3):
            routable, selected = stats[layer].tolist()
            assert m[f"router/causal_keep/{task}/layer_{layer}"] == 0.0
            assert m[f"router/agreement/{task}/layer_{layer}"] == pytest.approx(1 - selected / routable)
            assert 0 < selected < routable


def test_evaluate_cli(demo_dataset, tmp_path):
    from tools import evaluate

    out = tmp_path / "real.json"
    assert evaluate.main(["--data", str(demo_dataset), "--images", "real", "--out", str(out)]) == 0
    # Real held-out digits through the judge: its own accuracy bounds what a model's images can score (99 of
    # the 100 images of the default 10 per digit).
    assert json.loads(out.read_text())["generation/accuracy"] >= 0.97

    hf = tmp_path / "hf"
    demo_model(demo_dataset).save_hf(hf)
    out = tmp_path / "eval.json"
    grid = tmp_path / "grid.png"
    assert evaluate.main(["--checkpoint", str(hf), "--data", str(demo_dataset), "--out", str(out), "--grid", str(grid),
                          "--max-samples", "4", "--images-per-digit", "1"]) == 0
    metrics = json.loads(out.read_text())
    for key in ("understanding/accuracy", "generation/accuracy", "text/perplexity", "router/agreement/layer_2"):
        assert key in metrics
    assert grid.is_file()
    assert evaluate.main(["--data", str(demo_dataset), "--out", str(out)]) == 2  # model images need a model


def test_expert_use_counts_each_tasks_top_k_choices(evaluator, demo_dataset):
    """`experts/max_load` and `experts/overlap` recomputed from hooks on the MoE routers' inputs: each real
    token's own task block of the router logits, its top-k, counted per task (padding left out by length)."""
    vocab = json.loads((demo_dataset / "manifest.json").read_text())["vocab"]
    torch.manual_seed(5)
    E, k = 4, 2
    cfg = ModelConfig.from_preset("debug", vocab=vocab,
                                  moe={"layers": [1, 3], "num_experts": E, "top_k": k, "router": "task"})
    model = UnifiedTransformer(cfg).eval()
    with torch.no_grad():
        for i in (1, 3):
            model.model.layers[i].mlp.router.weight.normal_(0.0, 0.5)  # tasks and tokens route apart
    m = evaluator.expert_use(model)

    seen = {}
    hooks = [model.model.layers[i].mlp.router.register_forward_hook(
        lambda mod, args, out, i=i: seen.__setitem__(i, out.detach().clone())) for i in (1, 3)]
    counts = torch.zeros(4, 3, E)
    try:
        with torch.no_grad():
            for t, task in enumerate(cfg.mod.tasks):
                for ids, batch in evaluator._batches(task):
                    model(ids, task_ids=torch.full((len(batch),), t), routing="topk")
                    lengths = torch.tensor([len(x) for _, x, _, _ in batch])
                    valid = (torch.arange(ids.shape[1])[None, :] < lengths[:, None]).reshape(-1)
                    for i, logits in seen.items():  # [B*S, E*T]: task t's block is columns t*E..(t+1)*E
                        top = logits.reshape(-1, 3, E)[valid, t].topk(k, dim=-1).indices
                        counts[i, t] += torch.bincount(top.reshape(-1), minlength=E).float()
    finally:
        for h in hooks:
            h.remove()
    for i in (1, 3):
        shares = counts[i] / counts[i].sum(-1, keepdim=True)
        for t, task in enumerate(cfg.mod.tasks):
            assert m[f"experts/max_load/{task}/layer_{i}"] == pytest.approx(float(shares[t].max() * E), rel=1e-6)
        overlap = float(torch.minimum(shares[0], shares[1]).sum())
        assert m[f"experts/overlap/t2i_mmu/layer_{i}"] == pytest.approx(overlap, rel=1e-6)
        assert 0.0 < overlap < 1.0
    assert not any(key.startswith("experts/") and "layer_0" in key for key in m)
    assert evaluator.expert_use(demo_model(demo_dataset)) == {}  # no MoE layer, no metric
