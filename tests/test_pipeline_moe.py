"""MoE layers under the pipeline (train/stages.py, train/pipeline.py): the stage tuple carries the expert slot
counts and the balance loss, so a pipeline step trains and records what a ZeRO step does.

- Stages run one after the other in this process, split in two as the engine splits them (the second stage gets
  detached copies, the first backpropagates the gradients those copies received): the loss, the aux loss with its
  balance part, the expert counts, what the last stage's loss records (the StepRecord fields and FLOPs slots ZeRO
  fills from the model's output) and every parameter's gradient, routers and experts included, are the model's
  `forward(labels=...)`, for an MoE model and an MoD+MoE model, with and without activation checkpointing.
- `torchrun` with 2 pipeline stages trains a tiny MoE model whose MoE layers sit on both stages: step 1's loss,
  aux and balance losses, expert loads and FLOPs equal a one-process ZeRO-0 run's on the same weights and data,
  and the moe/ tags reach TensorBoard.
"""

from __future__ import annotations

import pytest
import torch

from model import ModelConfig, UnifiedTransformer
from model.loss import IGNORE_INDEX
from model.transformer import stage_key_to_hf
from tests.test_stages import CAPACITY, micro_batch, stage_layers_loaded_from

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

# A capacity factor under 1, so some slots drop; a balance weight large enough that its gradient shows.
MOE = {"layers": "1-2", "num_experts": 4, "top_k": 2, "router": "task", "capacity_factor": 0.75,
       "balance_loss_weight": 0.1}


def make_net(mod: bool) -> UnifiedTransformer:
    """The MoE model; with MoD layers also a shared expert (every token runs expert 0, the router picks 1 of 3)."""
    torch.manual_seed(0)
    moe = {**MOE, "top_k": 1, "shared_experts": 1} if mod else MOE
    net = UnifiedTransformer(ModelConfig.from_preset("debug", mod={"capacity": CAPACITY} if mod else {}, moe=moe))
    for layer in net.model.layers:
        if layer.mod_router is not None:  # gates far from 1, so a wrong context would show in the numbers
            torch.nn.init.normal_(layer.mod_router.weight, std=1.0)
        if layer.is_moe:  # zero-init routers tie every expert: random ones route tokens apart
            torch.nn.init.normal_(layer.mlp.router.weight, std=0.5)
    return net


def labelled(cfg: ModelConfig, seed: int):
    ids, tasks, pos = micro_batch(cfg, seed)
    labels = ids.clone()
    labels[ids == cfg.vocab.pad_id] = IGNORE_INDEX
    return ids, tasks, pos, labels


def run_two_stages(net: UnifiedTransformer, ids, tasks, pos, labels, checkpointing: bool):
    """The model's pieces as two pipeline stages, forward, loss (`PipelineLoss` recording into a fresh StepRecord)
    and backward as the engine runs them. -> (loss, the last stage's outputs, the record, gradients by HF name)."""
    from train.engine import StepRecord
    from train.pipeline import PipelineLoss
    from train.stages import checkpoint_fn

    cfg = net.config
    L, T, E = cfg.num_hidden_layers, cfg.num_tasks, cfg.moe.num_experts
    layers = stage_layers_loaded_from(net)
    split = 1 + L // 2  # embed, layers 0-1 | layers 2-3, head: an MoE layer on each stage

    def run(stage, x):
        for layer in stage:
            x = checkpoint_fn(layer, x) if checkpointing else layer(x)
        return x

    sent = run(layers[:split], (ids, tasks, pos))
    # The engine's receive: detached copies, the floats requiring grad (it asserts each gets a gradient back).
    received = tuple(t.detach().clone().requires_grad_(t.is_floating_point()) for t in sent)
    outputs = run(layers[split:], received)
    loss_fn = PipelineLoss()
    loss_fn.head, loss_fn.model_cfg = layers[-1], cfg
    zeros = torch.zeros
    rec = loss_fn.record = StepRecord(zeros(T), zeros(T), zeros(()), zeros(L, T, 4), experts=zeros(L, T, E, 2),
                                      balance_sum=zeros(()))
    loss = loss_fn(outputs, labels)
    loss.backward()
    floats = [(s, r) for s, r in zip(sent, received) if s.is_floating_point()]
    assert [tuple(s.shape) for s, _ in floats] == [tuple(ids.shape) + (cfg.hidden_size,), (2,)]  # hidden, aux
    assert all(r.grad is not None for _, r in floats)
    for i, (s, r) in enumerate(floats):
        s.backward(r.grad, retain_graph=i < len(floats) - 1)
    grads = {stage_key_to_hf(f"{i}.{k}", L): p.grad for i, layer in enumerate(layers)
             for k, p in layer.named_parameters()}
    return loss, outputs, rec, grads


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
@pytest.mark.parametrize("mod", [False, True], ids=["moe", "mod+moe"])
def test_stages_compute_the_models_loss_aux_expert_counts_and_gradients(mod, checkpointing):
    from model.flops import expert_slots

    net = make_net(mod)
    cfg = net.config
    assert cfg.moe.layers == [1, 2] and bool(cfg.mod.mod_layers()) == mod
    ids, tasks, pos, labels = labelled(cfg, 0)
    loss, (h, aux, routing, task_ids, experts), rec, stage_grads = run_two_stages(net, ids, tasks, pos, labels,
                                                                                  checkpointing)

    out = net(ids, task_ids=tasks, position_ids=pos, labels=labels)
    routers = [layer.mlp.router.weight for layer in net.model.layers if layer.is_moe]
    # The balance loss's own gradient on the routers is far above the tolerance below: a stage tuple that dropped
    # it from the gradient path could not pass.
    balance_grads = torch.autograd.grad(out.balance_loss, routers, retain_graph=True)
    assert min(float(g.abs().max()) for g in balance_grads) > 1e-4
    (out.loss + out.aux_loss).backward()

    assert out.experts[..., 1].sum() > 0, "capacity_factor 0.75 drops slots: the test would not see them"
    assert out.balance_loss > 0 and (not mod or out.aux_loss > out.balance_loss)
    torch.testing.assert_close(loss, out.loss + out.aux_loss, rtol=1e-6, atol=0)
    assert aux.shape == (2,)
    torch.testing.assert_close(aux[0], out.aux_loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(aux[1], out.balance_loss, rtol=1e-6, atol=0)
    assert experts.dtype == torch.long
    torch.testing.assert_close(experts, out.experts.round().long(), rtol=0, atol=0)
    assert torch.equal(routing, out.routing.round().long()) and torch.equal(task_ids, tasks)

    # What the last stage records is what a ZeRO step records from the model's output (train/zero.py).
    torch.testing.assert_close(rec.aux_sum, out.aux_loss.detach(), rtol=1e-6, atol=0)
    torch.testing.assert_close(rec.balance_sum, out.balance_loss.detach(), rtol=1e-6, atol=0)
    torch.testing.assert_close(rec.experts, out.experts, rtol=0, atol=0)
    assert torch.equal(rec.routing, out.routing)
    assert rec.expert_slots == [expert_slots(out.experts, cfg)]
    torch.testing.assert_close(rec.loss_sum.sum(), out.loss.detach(), rtol=1e-6, atol=0)

    for name, p in net.named_parameters():
        torch.testing.assert_close(stage_grads[name], p.grad, rtol=1e-5, atol=1e-7, msg=name)
    for layer in cfg.moe.layers:
        assert stage_grads[f"model.layers.{layer}.mlp.router.weight"].abs().max() > 0


# ----- 2-stage pipeline through torchrun vs one ZeRO-0 process ---------------------------------------------------
# MoE layers on both stages (the stages split embed, layers 0-1 | layers 2-3, head); layers 2-3 are MoD layers of
# the smoke config too.
RUN_MOE = '{layers: "1-3", num_experts: 4, top_k: 2, router: task, capacity_factor: 1.0, balance_loss_weight: 0.05}'
STEPS = 3


@pytest.fixture(scope="module")
def pipeline_moe(demo_dataset, tmp_path_factory):
    """One random MoE model saved as HF; a 2-stage pipeline run and a one-process ZeRO-0 run start from it with
    the same seed and data-parallel size 1."""
    from tests.train_helpers import (SMOKE, child_env, finish, overrides, run, settings, single_cmd, start,
                                     torchrun_cmd)
    from train.config import RunConfig

    root = tmp_path_factory.mktemp("pipeline_moe")
    init = root / "init_hf"
    model_cfg = RunConfig.load(SMOKE, settings(demo_dataset, root, model__moe=RUN_MOE)).model
    torch.manual_seed(1234)
    net = UnifiedTransformer(model_cfg)
    for layer in net.model.layers:
        if layer.is_moe:
            torch.nn.init.normal_(layer.mlp.router.weight, std=0.5)
    net.save_hf(init)
    common = dict(model__moe=RUN_MOE, checkpoint__init_from_hf=init, run__max_steps=STEPS, logging__log_every=1,
                  logging__eval_at_end="false", optim__lr=2e-3, optim__warmup_steps=0, checkpoint__export_hf="true",
                  optim__eps=1.0)  # AdamW's update ~ lr * g, not lr * sign(g): float-order noise stays small in the weights
    # Side by side: most of each run is start-up, which overlaps well.
    single = start(single_cmd(overrides(demo_dataset, root / "single", **common)), child_env(), root / "single.log")
    piped = run(lambda port: torchrun_cmd(overrides(demo_dataset, root / "pipe", parallel__mode="pipeline",
                                                    parallel__pipeline_stages=2, **common), port=port),
                child_env(), root / "pipe.log")
    return {"root": root, "pipe": piped, "single": finish(single, timeout=240), "layers": model_cfg.moe.layers}


def test_pipeline_trains_moe_like_zero(pipeline_moe):
    from tests.train_helpers import read_metrics, summary

    piped, single = pipeline_moe["pipe"], pipeline_moe["single"]
    assert piped.rc == 0, piped.explain()
    assert single.rc == 0, single.explain()
    assert "2 process(es) via torchrun" in piped.output and "mode pipeline" in piped.output, piped.explain()
    assert "stage 0: embed..layer1, stage 1: layer2..norm+head" in piped.output, piped.explain()
    out = pipeline_moe["root"] / "pipe"
    s = summary(out)
    assert s["status"] == "completed" and s["steps"] == STEPS and s["mode"] == "pipeline", s

    p = {r["step"]: r for r in read_metrics(out / "metrics.jsonl")}
    z = {r["step"]: r for r in read_metrics(pipeline_moe["root"] / "single" / "metrics.jsonl")}
    assert sorted(p) == sorted(z) == list(range(1, STEPS + 1))
    first, want = p[1], z[1]
    assert abs(first["loss/total"] - want["loss/total"]) <= 1e-5, (first["loss/total"], want["loss/total"])
    # The same tokens went to the same experts: the moe/ scalars and the FLOPs of the slots each expert ran.
    moe_tags = sorted(k for k in want if k.startswith("moe/"))
    assert sorted(k for k in first if k.startswith("moe/")) == moe_tags
    assert {f"moe/max_load/{task}/layer_{layer}" for layer in pipeline_moe["layers"]
            for task in ("t2i", "mmu", "lm") if f"loss/{task}" in want} <= set(moe_tags)
    for tag in moe_tags + ["mod/aux_loss"]:
        assert first[tag] == pytest.approx(want[tag], rel=1e-5, abs=1e-9), tag
    assert first["moe/balance_loss"] > 0
    assert first["flops/actual_per_step"] == want["flops/actual_per_step"]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    tb = set(acc.Tags()["scalars"])
    assert "moe/balance_loss" in tb and {k for r in p.values() for k in r if k.startswith("moe/")} <= tb

    # The stages' HF export rebuilds the MoE model the ZeRO run exports after the same steps.
    from model.moe import MoEMLP

    piped_net = UnifiedTransformer.from_hf(out / "hf")
    zero_net = UnifiedTransformer.from_hf(pipeline_moe["root"] / "single" / "hf")
    assert [i for i, layer in enumerate(piped_net.model.layers) if isinstance(layer.mlp, MoEMLP)] == \
        pipeline_moe["layers"]
    want_state = zero_net.state_dict()
    for key, value in piped_net.state_dict().items():
        torch.testing.assert_close(value, want_state[key], rtol=1e-4, atol=1e-6, msg=key)
