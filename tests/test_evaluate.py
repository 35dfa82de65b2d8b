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
