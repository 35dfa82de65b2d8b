"""Sampling: the KV cache is exact under causal MoD routing, image blocks are always well-formed, and a model
trained for a few steps samples the same from its DeepSpeed checkpoint and from its HF export."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from data.layout import parse_image_block
from model import ModelConfig, UnifiedTransformer
from model.generation import CachedDecoder, generate_image_tokens, generate_text, left_pad, sample_token

REPO = Path(__file__).resolve().parents[1]
MOD_PLAN = {"capacity": {"1-3": {"t2i": 0.5, "mmu": 0.5, "lm": 0.5}}, "routable": {"lm": "all"}}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def mod_model(dtype=torch.float64, router_scale: float = 300.0, seed: int = 0) -> UnifiedTransformer:
    """Debug model whose routers are scaled up so causal decisions are far from 0 and really differ."""
    torch.manual_seed(seed)
    model = UnifiedTransformer(ModelConfig.from_preset("debug", mod=MOD_PLAN)).to(dtype).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            if layer.mod_router is not None:
                layer.mod_router.weight.mul_(router_scale)
    return model


def greedy_no_cache(model, prompt: list[int], task: int, n: int) -> tuple[list[int], list[torch.Tensor]]:
    """Reference: re-run the full causal-routing forward on the whole sequence for every new token."""
    ids, logits = list(prompt), []
    for _ in range(n):
        with torch.no_grad():
            out = model(torch.tensor([ids]), task_ids=torch.tensor([task]), routing="causal").logits[0, -1]
        logits.append(out)
        ids.append(int(out.argmax()))
    return ids[len(prompt):], logits


def test_greedy_with_cache_equals_without_under_mod():
    model = mod_model()
    cfg = model.config
    g = torch.Generator().manual_seed(1)
    # Two prompts of different lengths and tasks in one left-padded batch; no pad ids inside them.
    prompts = [torch.randint(0, cfg.vocab.pad_id, (23,), generator=g).tolist(),
               torch.randint(cfg.vocab.visual_start, cfg.vocab.visual_end, (11,), generator=g).tolist()]
    tasks = [cfg.mod.tasks.index("lm"), cfg.mod.tasks.index("t2i")]
    n_new = 24

    ids, valid = left_pad(prompts, cfg.vocab.pad_id, "cpu")
    dec = CachedDecoder(model, torch.tensor(tasks), initial_capacity=4)  # forces the caches to grow
    logits = dec.step(ids, valid)
    got = [[], []]
    got_logits = []
    for _ in range(n_new):
        tok = logits.argmax(-1)
        got_logits.append(logits)
        for b in range(2):
            got[b].append(int(tok[b]))
        logits = dec.step(tok[:, None])

    for b in range(2):
        want, want_logits = greedy_no_cache(model, prompts[b], tasks[b], n_new)
        assert got[b] == want
        torch.testing.assert_close(torch.stack([lg[b] for lg in got_logits]), torch.stack(want_logits))

    # The routers really decided both ways, and each MoD layer's cache lacks exactly the skipped tokens.
    seen = dec.tokens_seen
    assert seen.tolist() == [len(p) + n_new for p in prompts]
    for i, layer in enumerate(model.model.layers):
        lengths = dec.caches[i].length
        if layer.is_mod:
            assert 0 < dec.routed_kept[i] < dec.routable_seen[i], f"layer {i} routed all-or-nothing"
            skipped = dec.routable_seen[i] - dec.routed_kept[i]
            assert int(lengths.sum()) == int(seen.sum()) - int(skipped)
            assert (lengths < seen).all()
        else:
            assert lengths.tolist() == seen.tolist()


def test_chunked_prefill_matches_forward_logits():
    model = mod_model()
    cfg = model.config
    ids = torch.randint(0, cfg.vocab.pad_id, (1, 40), generator=torch.Generator().manual_seed(2))
    task = torch.tensor([cfg.mod.tasks.index("lm")])
    with torch.no_grad():
        want = model(ids, task_ids=task, routing="causal").logits
    dec = CachedDecoder(model, task)
    got = torch.cat([dec.step(ids[:, :17], all_logits=True), dec.step(ids[:, 17:30], all_logits=True),
                     *[dec.step(ids[:, i:i + 1], all_logits=True) for i in range(30, 40)]], dim=1)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("top_k", [1, 2, 5, 49, 50, 0])
def test_top_k_samples_exactly_the_k_most_likely_ids(top_k):
    """With top_k = k the draws cover exactly the k largest logits (found here by a plain sort), none else."""
    V, draws = 50, 4000
    logits = torch.from_numpy(np.random.default_rng(0).permutation(V).astype(np.float64))  # distinct, shuffled
    # A high temperature makes the kept ids near equally likely, so each shows up hundreds of times.
    ids = sample_token(logits.expand(draws, V), temperature=1000.0, top_k=top_k,
                       generator=torch.Generator().manual_seed(0))
    k = top_k if 0 < top_k < V else V
    expected = set(np.argsort(-logits.numpy())[:k].tolist())
    assert set(ids.tolist()) == expected


def _image_prompts(cfg, n: int) -> tuple[list[list[int]], list[int], list[int]]:
    lay = cfg.vocab
    header = [lay.boi_id, 7, 42, 9, lay.img_id]  # any text ids stand in for "h*w"
    prompts = [[lay.bos_id, 10 + i, 20 + i, *header] for i in range(n)]
    return prompts, [lay.bos_id, *header], header


@pytest.mark.parametrize("cfg_scale,temperature,top_k", [(3.0, 1.0, 0), (1.0, 0.0, 0), (2.0, 0.7, 5)])
def test_constrained_decoding_always_gives_a_well_formed_block(cfg_scale, temperature, top_k):
    model = mod_model(dtype=torch.float32, router_scale=1.0)
    lay = model.config.vocab
    # Adversarial head: every visual id scores 0, every other id scores far above it, so unconstrained
    # decoding would never emit a visual code; the constraint alone makes the block.
    bias = torch.full((lay.vocab_size,), 100.0)
    bias[lay.visual_start:lay.visual_end] = 0.0
    model.lm_head.register_forward_hook(lambda module, args, out: out + bias)
    prompts, uncond, header = _image_prompts(model.config, 3)
    h, w_ = 5, 7
    body = generate_image_tokens(model, prompts, uncond, 0, h, w_, cfg_scale=cfg_scale, temperature=temperature,
                                 top_k=top_k, num_codes=100, generator=torch.Generator().manual_seed(0))
    assert body.shape == (3, h * (w_ + 1) + 2)
    for row in body.numpy():
        codes, (start, end) = parse_image_block(np.concatenate([header, row]), lay)
        assert codes.shape == (h, w_) and start == 0 and end == len(header) + len(row)
        assert codes.min() >= 0 and codes.max() < 100
    if temperature > 0:
        assert len(np.unique(body[:, :w_].numpy())) > 1  # sampled, not a constant fill


def test_generate_text_stops_at_eos_and_batches_like_single_prompts():
    model = mod_model(dtype=torch.float64)
    lay = model.config.vocab
    allowed = torch.zeros(lay.vocab_size, dtype=torch.bool)
    allowed[:lay.text_size] = True
    allowed[lay.eos_id] = True
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, lay.text_size, (n,), generator=g).tolist() for n in (5, 12, 8)]
    mmu = model.config.mod.tasks.index("mmu")
    batched = generate_text(model, prompts, mmu, max_new_tokens=10, allowed=allowed)
    single = [generate_text(model, [p], mmu, max_new_tokens=10, allowed=allowed)[0] for p in prompts]
    assert batched == single
    assert all(len(o) <= 10 and all(t < lay.text_size for t in o) for o in batched)

    # Make EOS the certain next token: decoding stops before emitting anything.
    bias = torch.zeros(lay.vocab_size, dtype=torch.float64)
    bias[lay.eos_id] = 1e4
    model.lm_head.register_forward_hook(lambda module, args, out: out + bias)
    out = generate_text(model, prompts, mmu, max_new_tokens=10, allowed=allowed)
    assert out == [[], [], []]


# ----- a model trained for a few steps, sampled from both checkpoint kinds --------------------------------
def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
            "MASTER_PORT": str(29500 + os.getpid() % 1000)}


@pytest.fixture(scope="module")
def trained_run(demo_dataset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gen") / "run"
    sets = {"data.dataset_dir": demo_dataset, "run.output_dir": out, "run.max_steps": 3, "run.device": "cpu",
            "parallel.precision": "fp32", "data.micro_batch_size": 2, "data.num_workers": 0,
            "logging.progress_bar": "false", "checkpoint.save_every": 0, "checkpoint.export_hf": "true"}
    cmd = [sys.executable, str(REPO / "train" / "main.py"), "--config", str(REPO / "train/configs/smoke.yaml")]
    for k, v in sets.items():
        cmd += ["--set", f"{k}={v}"]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert (out / "hf" / "config.json").is_file() and (out / "checkpoints" / "latest").is_file()
    return out


def test_trained_model_samples_from_deepspeed_and_hf_dirs(trained_run, demo_dataset, tmp_path, capsys):
    from PIL import Image

    from data.demo import load_digit_images
    from data.imagetok import PatchVQ
    from tools import generate

    # DeepSpeed checkpoint (the run directory), through the real command line.
    ds_png = tmp_path / "ds.png"
    proc = subprocess.run(
        [sys.executable, "-m", "tools.generate", "--checkpoint", str(trained_run), "--task", "t2i",
         "--prompt", "a handwritten digit seven", "--num-samples", "4", "--out", str(ds_png)],
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "deepspeed checkpoint" in proc.stdout

    # HF export, in-process; the dataset comes from the run's config.yaml beside hf/.
    hf_png = tmp_path / "hf.png"
    assert generate.main(["--checkpoint", str(trained_run / "hf"), "--task", "t2i", "--prompt",
                          "a handwritten digit seven", "--num-samples", "4", "--out", str(hf_png)]) == 0
    ds_img, hf_img = np.asarray(Image.open(ds_png)), np.asarray(Image.open(hf_png))
    assert ds_img.shape == (2 + 2 * 34, 2 + 2 * 34, 3)  # 2x2 grid of 8x8 digits shown 4x (--scale), 2 px gaps
    # Same weights, same seed: the two entry points sample the very same images.
    np.testing.assert_array_equal(ds_img, hf_img)

    # Understanding from both: the same answer (text only) for a real validation digit.
    images, _ = load_digit_images(8)  # the demo's native grey8 grid
    vq = PatchVQ.load(demo_dataset / "image_tokenizer")
    digit = tmp_path / "digit.png"
    vq.to_pil(vq.encode(images[:1])[0]).save(digit)
    answers = []
    for ckpt in (trained_run / "checkpoints", trained_run / "hf"):
        capsys.readouterr()
        assert generate.main(["--checkpoint", str(ckpt), "--data", str(demo_dataset), "--task", "mmu",
                              "--image", str(digit), "--prompt", "Which digit is this?", "--max-new-tokens", "6"]) == 0
        answers.append(capsys.readouterr().out)
    assert answers[0] == answers[1]


def test_generate_cli_errors_name_the_problem(tmp_path, capsys):
    from tools import generate

    assert generate.main(["--checkpoint", str(tmp_path / "nope"), "--task", "t2i", "--prompt", "x",
                          "--out", str(tmp_path / "g.png")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert generate.main(["--checkpoint", str(tmp_path), "--task", "mmu", "--prompt", "x"]) == 2
    assert "--image is required" in capsys.readouterr().err
    with pytest.raises(ValueError, match="sampling.cfg_scale"):
        generate.SamplingConfig(cfg_scale=float("nan"))


def test_mod_and_moe_model_trains_and_samples_with_the_cache():
    """MoD layers and task-aware MoE MLPs together (layer 2 is both): a few AdamW steps lower the loss, and
    greedy decoding with the cache equals re-running the full causal-routing forward, each decoded token going
    through its own task's experts."""
    torch.manual_seed(0)
    moe = {"layers": ["1-2"], "num_experts": 4, "top_k": 2, "router": "task", "capacity_factor": 1.0}
    cfg = ModelConfig.from_preset("debug", mod=MOD_PLAN, moe=moe)
    model = UnifiedTransformer(cfg)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, cfg.vocab.pad_id, (4, 16), generator=g)
    tasks = torch.tensor([2, 2, 1, 0])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        out = model(ids, task_ids=tasks, labels=ids)
        opt.zero_grad()
        (out.loss + out.aux_loss).backward()
        assert all(model.model.layers[i].mlp.router.weight.grad.abs().sum() > 0 for i in (1, 2))
        opt.step()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0] - 0.5
    assert out.experts.shape == (4, 3, 4, 2)

    model = model.double().eval()
    with torch.no_grad():  # causal MoD decisions far from 0, and routers that really choose between experts
        for layer in model.model.layers:
            if layer.mod_router is not None:
                layer.mod_router.weight.mul_(300.0)
            if layer.is_moe:
                torch.nn.init.normal_(layer.mlp.router.weight, std=1.0)
    prompts = [torch.randint(0, cfg.vocab.pad_id, (9,), generator=g).tolist(),
               torch.randint(0, cfg.vocab.pad_id, (5,), generator=g).tolist()]
    task_list = [2, 1]
    ids, valid = left_pad(prompts, cfg.vocab.pad_id, "cpu")
    dec = CachedDecoder(model, torch.tensor(task_list), initial_capacity=4)
    logits = dec.step(ids, valid)
    got = [[], []]
    for _ in range(10):
        tok = logits.argmax(-1)
        for b in range(2):
            got[b].append(int(tok[b]))
        logits = dec.step(tok[:, None])
    for b in range(2):
        want, _ = greedy_no_cache(model, prompts[b], task_list[b], 10)
        assert got[b] == want
