"""torch.compile of the decoder blocks (model/compile.py) and the `run.compile` switch (CPU, fp32, debug preset).

- the compiled model is the eager model: same parameters and state_dict keys, same logits and gradients, dense
  and MoD (top-k and causal routing), rows of one document and packed rows, with activation checkpointing;
- no recompilation (`error_on_recompile`): one step of each batch structure (t2i, mmu, lm, mixed tasks, packed)
  compiles two graphs, and new data of those structures, other lengths included, runs on them;
- train/main.py with run.compile true trains to the losses of the eager run (run.compile null: off on CPU) under
  one-process ZeRO-3 and a 2-stage pipeline, without a graph break or a recompile.

Dynamo's cache lives on the one code object of `Block.block`, shared by every model of this process; the tests
that count compiles reset it first (Inductor's on-disk cache then makes a recompile ~1 s), and the module leaves
no compiled graph behind.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from model import ModelConfig, UnifiedTransformer
from model.compile import compile_blocks, is_compiled
from tests.model_helpers import LM, MMU, T2I, pack, sample
from tests.train_helpers import (DS_PIPELINE, DS_ZERO3, SMOKE, child_env, losses, overrides, run, settings,
                                 single_cmd, torchrun_cmd)
from train.config import RunConfig, RunSection

pytestmark = pytest.mark.usefixtures("one_thread")

CAPACITY = {"2-3": {"t2i": 0.25, "mmu": 0.5}}
MODELS = {"dense": None, "mod_topk": {"capacity": CAPACITY}, "mod_causal": {"capacity": CAPACITY, "routing": "causal"}}


@pytest.fixture(scope="module", autouse=True)
def fresh_dynamo():
    """Count this module's compiles from zero; leave no compiled graph (holding these models) to later modules."""
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def model_cfg(kind: str) -> ModelConfig:
    return ModelConfig.from_preset("debug", **({} if MODELS[kind] is None else {"mod": MODELS[kind]}))


def batch(cfg: ModelConfig, structure: str, seed: int = 0, S: int = 64):
    """(input_ids [B,S], task_ids [B], position_ids [B,S] or None) for a batch structure; the seed draws new
    tokens and, for packed rows, new sample lengths (so other documents and kept-token counts)."""
    g = torch.Generator().manual_seed(seed)
    if structure == "packed":
        a, b = S // 3 + seed, S // 4 + 2 * seed
        rows = [[sample(cfg, T2I, a, generator=g), sample(cfg, T2I, b, generator=g)],
                [sample(cfg, T2I, S // 2, generator=g), sample(cfg, MMU, S // 2 - seed, generator=g)]]
        ids, pos = pack(cfg, rows, S)
        return ids, torch.tensor([T2I, T2I]), pos
    tasks = {"t2i": [T2I, T2I], "mmu": [MMU, MMU], "lm": [LM, LM], "mixed": [T2I, MMU]}[structure]
    return torch.stack([sample(cfg, t, S, generator=g) for t in tasks]), torch.tensor(tasks), None


def forward_backward(net: UnifiedTransformer, ids, tasks, pos):
    out = net(ids, task_ids=tasks, position_ids=pos)
    # A loss that weights every logit differently, so every gradient path is exercised.
    weights = torch.linspace(-1, 1, out.logits.shape[-1], device=out.logits.device)
    (out.logits.float() @ weights).pow(2).mean().add(out.aux_loss).backward()
    return out


def assert_grad_close(got: torch.Tensor, want: torch.Tensor, name: str, rel: float = 1e-5) -> None:
    """fp32 round-off relative to the gradient's scale: Inductor fuses and reorders the sums, so an entry that is
    itself ~0 may differ by a larger relative amount."""
    torch.testing.assert_close(got, want, rtol=10 * rel, atol=rel * want.abs().max().item(),
                               msg=lambda m: f"{name}: {m}")


def test_compile_keeps_the_models_parameters_and_names():
    torch.manual_seed(0)
    net = UnifiedTransformer(model_cfg("mod_topk"))
    keys, params = list(net.state_dict()), list(net.parameters())
    net.compile_blocks()
    assert all(is_compiled(layer) for layer in net.model.layers)
    assert list(net.state_dict()) == keys  # no `_orig_mod.` prefix: the function is compiled, not the module
    assert all(a is b for a, b in zip(net.parameters(), params)) and len(list(net.parameters())) == len(params)
    installed = [layer.block for layer in net.model.layers]
    compile_blocks(net.model.layers)  # idempotent: the installed functions stay
    assert all(layer.block is b for layer, b in zip(net.model.layers, installed))
    with pytest.raises(TypeError, match="decoder layers"):
        compile_blocks([net.model.norm])


def test_no_recompile():
    """The first step of each structure compiles the two graphs (rows without a mask, packed rows with one), each
    the first compile of its own function; new data of the same structures, and other sequence lengths
    (data.pad_to: longest), then run on them. Dynamo's `error_on_recompile` holds throughout."""
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    cfg = model_cfg("mod_topk")
    net = UnifiedTransformer(cfg)
    compile_blocks(net.model.layers)
    structures = ["t2i", "mmu", "lm", "mixed", "packed"]
    with torch._dynamo.config.patch(error_on_recompile=True):
        for s in structures:
            forward_backward(net, *batch(cfg, s, seed=0))
        assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])
        for seed, S in ((1, 64), (2, 64), (3, 48), (4, 80)):
            for s in structures:
                forward_backward(net, *batch(cfg, s, seed=seed, S=S))
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])


@pytest.mark.parametrize("structure", ["mixed", "packed"])
@pytest.mark.parametrize("kind", list(MODELS))
def test_compiled_equals_eager(kind, structure):
    """Logits, MoD aux loss, routing counts and every parameter gradient of the compiled model are the eager
    model's to fp32 round-off."""
    torch.manual_seed(0)
    cfg = model_cfg(kind)
    eager = UnifiedTransformer(cfg)
    compiled = copy.deepcopy(eager)
    compiled.compile_blocks()
    ids, tasks, pos = batch(cfg, structure, seed=1)
    torch._dynamo.reset()  # so that the compile below shows that the compiled block ran
    counters.clear()
    a, b = forward_backward(eager, ids, tasks, pos), forward_backward(compiled, ids, tasks, pos)
    assert counters["stats"]["unique_graphs"] >= 1
    torch.testing.assert_close(b.logits, a.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b.aux_loss, a.aux_loss, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(b.routing, a.routing)
    if kind != "dense":
        assert (a.routing[2:, :, 1] < a.routing[2:, :, 0]).any()  # the MoD layers did skip tokens
    grads_a, grads_b = dict(eager.named_parameters()), dict(compiled.named_parameters())
    for name, p in grads_a.items():
        assert p.grad is not None and grads_b[name].grad is not None, name
        assert_grad_close(grads_b[name].grad, p.grad, name)


def test_gradient_checkpointing_recomputes_through_the_compiled_block():
    torch.manual_seed(0)
    cfg = model_cfg("mod_topk")
    eager = UnifiedTransformer(cfg)
    compiled = copy.deepcopy(eager)
    compiled.compile_blocks()
    compiled.gradient_checkpointing = True
    ids, tasks, pos = batch(cfg, "packed", seed=2)
    a, b = forward_backward(eager, ids, tasks, pos), forward_backward(compiled, ids, tasks, pos)
    torch.testing.assert_close(b.logits, a.logits, rtol=1e-5, atol=1e-5)
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
        assert_grad_close(q.grad, p.grad, name)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none visible)")
def test_compiled_equals_eager_on_cuda_without_recompiles():
    """run.compile's default on CUDA: Inductor's GPU kernels give the eager logits and gradients (fp32), and the
    structures compile two graphs, never recompiling. Unrun where the project has no GPU."""
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    cfg = model_cfg("mod_topk")
    eager = UnifiedTransformer(cfg).cuda()
    compiled = copy.deepcopy(eager)
    compiled.compile_blocks()
    with torch._dynamo.config.patch(error_on_recompile=True):
        for seed, structure in enumerate(["mixed", "packed", "t2i", "lm", "packed"]):
            ids, tasks, pos = (None if t is None else t.cuda() for t in batch(cfg, structure, seed=seed))
            eager.zero_grad(set_to_none=True)
            compiled.zero_grad(set_to_none=True)
            a, b = forward_backward(eager, ids, tasks, pos), forward_backward(compiled, ids, tasks, pos)
            torch.testing.assert_close(b.logits, a.logits, rtol=1e-4, atol=1e-4)
            for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
                assert_grad_close(q.grad, p.grad, f"{structure}: {name}", rel=1e-4)
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])


def test_run_compile_config():
    assert RunSection().compile is None
    assert RunSection().compile_on("cuda")[0] and not RunSection().compile_on("cpu")[0]
    assert RunSection(compile=True).compile_on("cpu") == (True, "run.compile: true")
    assert RunSection(compile=False).compile_on("cuda") == (False, "run.compile: false")
    with pytest.raises(ValueError, match="run.compile must be true, false or null"):
        RunSection(compile="yes")


# ----- train/main.py ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def runs(demo_dataset, tmp_path_factory):
    """The reference: 6 steps of the smoke config, one process, ZeRO-0, run.compile left at null (off on CPU). It
    starts from saved HF weights, as the compiled runs do: the pipeline builds its layers with other seeds."""
    root = tmp_path_factory.mktemp("compile_runs")
    init = root / "init_hf"
    torch.manual_seed(1234)
    UnifiedTransformer(RunConfig.load(SMOKE, settings(demo_dataset, root)).model).save_hf(init)
    common = dict(checkpoint__init_from_hf=init, optim__lr=2e-3, optim__warmup_steps=2)
    eager = run(single_cmd(overrides(demo_dataset, root / "eager", **common)), child_env(), root / "eager.log")
    assert eager.rc == 0, eager.explain()
    assert "torch.compile of the decoder blocks: off (run.compile: null, off by default on cpu" in eager.output
    return {"root": root, "common": common, "eager": losses(root / "eager" / "metrics.jsonl")}


def _assert_compiled_run(result, metrics, want: dict[int, float], tol: float) -> None:
    assert result.rc == 0, result.explain()
    assert "torch.compile of the decoder blocks: on (run.compile: true)" in result.output, result.explain()
    assert "Graph break" not in result.output and "Recompiling" not in result.output, result.explain()
    got = losses(metrics)
    assert sorted(got) == sorted(want) == list(range(1, 7))
    for step in want:
        assert abs(got[step] - want[step]) <= tol, (step, got, want)


def test_zero3_training_with_compile_has_the_eager_losses(runs, demo_dataset, tmp_path):
    """One process, ZeRO-3: the decoder layers become ZeRO-3 leaf modules, so the compiled block holds no DeepSpeed
    hook (TORCH_LOGS would show a graph break or a recompile) and trains to the eager losses."""
    out = tmp_path / "run"
    result = run(single_cmd(overrides(demo_dataset, out, run__compile="true", **runs["common"]), ds_config=DS_ZERO3),
                 child_env(TORCH_LOGS="graph_breaks,recompiles"), tmp_path / "log")
    _assert_compiled_run(result, out / "metrics.jsonl", runs["eager"], tol=1e-5)


@pytest.mark.slow
def test_pipeline_training_with_compile_has_the_eager_losses(runs, demo_dataset, tmp_path):
    """2 stages through torchrun, compiled (DeepSpeed's pipeline backward retains the graph between a stage's
    outputs, so the compiled backward must not donate buffers)."""
    out = tmp_path / "pipe"
    result = run(lambda port: torchrun_cmd(overrides(demo_dataset, out, run__compile="true", parallel__mode="pipeline",
                                                     parallel__pipeline_stages=2, **runs["common"]),
                                           port=port, ds_config=DS_PIPELINE),
                 child_env(TORCH_LOGS="graph_breaks,recompiles"), tmp_path / "log")
    _assert_compiled_run(result, out / "metrics.jsonl", runs["eager"], tol=1e-4)  # test_train_distributed's tolerance
