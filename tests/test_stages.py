"""The model under DeepSpeed (CPU, fp32, a world of one gloo process): pipeline stages built from the model's
ordered pieces (train/stages.py) and the ZeRO-3 module hooks on the model's output.

- Stage parameters are the model's, named `<piece index>.<the model's name inside the piece>`, and the
  stage<->HF key mapping covers every one of them.
- A stage builds the decoder layers' context (RoPE tables, row layout with its one device->host copy) once per
  micro-batch, not once per layer, with and without non-reentrant activation checkpointing, forward and backward;
  the gradients are the single-device model's.
- `ModelOutput` is a type ZeRO-3's hooks can walk: no "may not get triggered properly" warning, and the
  parameters are released after the forward.
"""

from __future__ import annotations

import logging
import os

import pytest
import torch

from model import ModelConfig, UnifiedTransformer
from model.transformer import ModelOutput, hf_key_to_stage, pieces, stage_key_to_hf
from tests.model_helpers import LM, MMU, T2I, pack, sample
from tests.train_helpers import free_port, release_process_group

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

S = 48
CAPACITY = {"1-3": {"t2i": 0.25, "mmu": 0.5, "lm": 0.3}}


@pytest.fixture(scope="module")
def world_of_one():
    """A gloo process group of one process (PipelineModule and deepspeed.initialize need one)."""
    import deepspeed

    saved = dict(os.environ)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0")
    deepspeed.init_distributed("gloo", auto_mpi_discovery=False, verbose=False)
    yield
    release_process_group()
    os.environ.clear()
    os.environ.update(saved)


def make_net(**mod) -> UnifiedTransformer:
    torch.manual_seed(0)
    net = UnifiedTransformer(ModelConfig.from_preset("debug", mod={"capacity": CAPACITY, **mod}))
    for layer in net.model.layers:
        if layer.mod_router is not None:  # gates far from 1, so a wrong context would show in the numbers
            torch.nn.init.normal_(layer.mod_router.weight, std=1.0)
    return net


def micro_batch(cfg: ModelConfig, seed: int):
    """Packed rows of one task each, so rows have several documents and MoD keeps different counts per row."""
    rows = [[sample(cfg, T2I, 20, seed), sample(cfg, T2I, 24, seed + 1)],
            [sample(cfg, MMU, 30, seed + 2), sample(cfg, MMU, 14, seed + 3)],
            [sample(cfg, LM, 17, seed + 4), sample(cfg, LM, 25, seed + 5)]]
    ids, pos = pack(cfg, rows, S)
    return ids, torch.tensor([T2I, MMU, LM]), pos


def stage_layers_loaded_from(net: UnifiedTransformer) -> list[torch.nn.Module]:
    """Every piece's pipeline layer (train/stages.py `stage_specs`), loaded from the model through the key
    mapping."""
    from train.stages import stage_specs

    cfg = net.config
    state = net.state_dict()
    layers = [spec.build() for spec in stage_specs(cfg)]
    for i, layer in enumerate(layers):
        layer.load_state_dict({k: state[stage_key_to_hf(f"{i}.{k}", cfg.num_hidden_layers)]
                               for k in layer.state_dict()})
    return layers


def test_stage_parameters_are_the_models_under_the_pieces_names():
    from train.stages import stage_specs

    net = make_net()
    cfg = net.config
    L = cfg.num_hidden_layers
    model_names = [n for n, _ in net.named_parameters()]
    stage_names = [f"{i}.{n}" for i, spec in enumerate(stage_specs(cfg)) for n, _ in spec.build().named_parameters()]
    assert len(pieces(L)) == L + 2 == len(stage_specs(cfg))
    as_hf = [stage_key_to_hf(k, L) for k in stage_names]
    assert as_hf == model_names  # the same parameters, and the pieces run in the model's order
    assert [hf_key_to_stage(k, L) for k in model_names] == stage_names
    for bad in ("model.vqmodel.encoder.weight", "lm_head_extra.weight"):
        with pytest.raises(ValueError, match="not a decoder tensor"):
            hf_key_to_stage(bad, L)
    with pytest.raises(ValueError, match="not a pipeline parameter"):
        stage_key_to_hf(f"{L + 2}.norm.weight", L)


def count_contexts(monkeypatch) -> dict[str, int]:
    """Counts of row_layout calls (the context's build) and of device->host copies (`tolist`, `item`)."""
    import model.transformer

    counts = {"row_layout": 0, "host": 0}
    real_layout = model.transformer.row_layout
    real_tolist, real_item = torch.Tensor.tolist, torch.Tensor.item

    def row_layout(*a, **k):
        counts["row_layout"] += 1
        return real_layout(*a, **k)

    def tolist(self):
        counts["host"] += 1
        return real_tolist(self)

    def item(self):
        counts["host"] += 1
        return real_item(self)

    monkeypatch.setattr(model.transformer, "row_layout", row_layout)
    monkeypatch.setattr(torch.Tensor, "tolist", tolist)
    monkeypatch.setattr(torch.Tensor, "item", item)
    return counts


def pipe_loss(out, head) -> torch.Tensor:
    """The last layer passes the hidden states on (its head runs in the loss function, train/pipeline.py)."""
    h, aux, _, _ = out
    return head.logits(h).square().mean() + aux.sum()


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
def test_pipeline_module_builds_one_context_per_micro_batch(world_of_one, monkeypatch, checkpointing):
    """A one-stage DeepSpeed PipelineModule over the whole model (DeepSpeed's own layer loop, each layer in its
    own non-reentrant checkpoint when checkpointing): two micro-batches forward, then both backward (as the
    pipeline schedule keeps several in flight). One context per micro-batch in all, recomputation included,
    and the model's gradients."""
    from deepspeed.pipe import PipelineModule

    from train.stages import checkpoint_fn, stage_specs

    net = make_net()
    cfg = net.config
    module = PipelineModule(layers=stage_specs(cfg), num_stages=1, partition_method="uniform",
                            activation_checkpoint_interval=1 if checkpointing else 0,
                            activation_checkpoint_func=checkpoint_fn)
    module._precompute_checkpointable_values()  # the pipeline engine's __init__ does this
    state = net.state_dict()
    module.load_state_dict({k: state[stage_key_to_hf(k, cfg.num_hidden_layers)] for k in module.state_dict()})
    batches = [micro_batch(cfg, seed) for seed in (0, 10)]

    counts = count_contexts(monkeypatch)
    outs = [module(tuple(t.clone() for t in b)) for b in batches]  # the engine hands each forward clones
    assert counts == {"row_layout": 2, "host": 2}
    sum(pipe_loss(o, module.forward_funcs[-1]) for o in reversed(outs)).backward()
    assert counts == {"row_layout": 2, "host": 2}, "the backward (recompute) rebuilt a context"
    monkeypatch.undo()

    for ids, tasks, pos in batches:
        out = net(ids, task_ids=tasks, position_ids=pos)
        (out.logits.square().mean() + out.aux_loss).backward()
    stage_grads = {stage_key_to_hf(k, cfg.num_hidden_layers): p.grad for k, p in module.named_parameters()}
    for name, p in net.named_parameters():
        torch.testing.assert_close(stage_grads[name], p.grad, rtol=1e-6, atol=1e-7, msg=name)


def test_two_stages_build_one_context_each_per_micro_batch(monkeypatch):
    """Layers split over two stages as the engine runs them (the second stage receives clones of the first's
    outputs): each stage builds its own context once per micro-batch; the logits are the model's, bit for bit."""
    from train.stages import checkpoint_fn

    net = make_net().eval()
    cfg = net.config
    first, second = stage_layers_loaded_from(net), stage_layers_loaded_from(net)  # one StageContext per stage
    L = cfg.num_hidden_layers
    stage0, stage1 = first[: 1 + L // 2], second[1 + L // 2:]

    def run(stage, x):
        for layer in stage:
            x = checkpoint_fn(layer, x)
        return x

    counts = count_contexts(monkeypatch)
    batches = [micro_batch(cfg, seed) for seed in (0, 10, 20)]
    with torch.no_grad():
        outs = [run(stage1, tuple(t.clone() for t in run(stage0, b))) for b in batches]
    assert counts == {"row_layout": 2 * len(batches), "host": 2 * len(batches)}
    monkeypatch.undo()
    with torch.no_grad():
        for (ids, tasks, pos), out in zip(batches, outs):
            want = net(ids, task_ids=tasks, position_ids=pos)
            assert torch.equal(stage1[-1].logits(out[0]), want.logits) and torch.equal(out[1][0], want.aux_loss)
            assert torch.equal(out[2], want.routing.round().long())


def test_a_new_micro_batch_gets_a_new_context():
    """Same shapes, other tokens: the context is found by the identity of the id tensors, never reused for
    another micro-batch (the logits equal the model's for each); an entry goes when its tensors go."""
    import gc

    net = make_net().eval()
    layers = stage_layers_loaded_from(net)
    contexts = layers[1].contexts
    with torch.no_grad():
        for seed in (0, 10):
            ids, tasks, pos = micro_batch(net.config, seed)
            x = (ids, tasks, pos)
            for layer in layers:
                x = layer(x)
            assert torch.equal(layers[-1].logits(x[0]), net(ids, task_ids=tasks, position_ids=pos).logits)
    assert contexts.builds == 2
    del x, ids, tasks, pos
    gc.collect()
    assert not contexts._entries


def test_zero3_hooks_walk_the_model_output(world_of_one):
    """A 1-process ZeRO-3 engine: forward + backward + step without DeepSpeed's warning about outputs its hooks
    cannot see (it warns for a dataclass output), parameters released after the forward."""
    import deepspeed
    import deepspeed.runtime.zero.utils as zero_utils
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
    from deepspeed.utils import logger

    net = make_net()
    cfg = net.config
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    ds = {"train_micro_batch_size_per_gpu": 3, "gradient_accumulation_steps": 1, "train_batch_size": 3,
          "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0, "overlap_comm": False},
          "zero_allow_untested_optimizer": True, "steps_per_print": 1 << 30}
    engine, _, _, _ = deepspeed.initialize(model=net, optimizer=opt, config=ds)
    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger.addHandler(handler)
    was_warned = zero_utils.warned
    zero_utils.warned = False  # DeepSpeed warns once per process: make sure an earlier test did not use it up
    try:
        ids, tasks, pos = micro_batch(cfg, 0)
        out = engine(ids, task_ids=tasks, position_ids=pos)
        assert isinstance(out, ModelOutput) and out.logits.shape == (3, S, cfg.vocab_size)
        assert all(p.ds_status == ZeroParamStatus.NOT_AVAILABLE for p in net.parameters())
        engine.backward(out.logits.square().mean() + out.aux_loss)
        engine.step()
    finally:
        logger.removeHandler(handler)
        zero_utils.warned = was_warned or zero_utils.warned
    assert not [m for m in seen if "may not get triggered properly" in m], seen
    assert all(p.ds_status == ZeroParamStatus.NOT_AVAILABLE for p in net.parameters())
    engine.destroy()


def test_load_hf_into_stages_fills_every_stage_parameter(world_of_one, tmp_path, monkeypatch):
    """An HF export loads into the stages through the one HF reader: every parameter, trained routers included
    (same tasks, same MoD layers); a stage parameter that no checkpoint tensor reaches is an error."""
    from deepspeed.pipe import PipelineModule

    import train.stages
    from train.stages import load_hf_into_stages, stage_specs

    net = make_net()
    cfg = net.config
    net.save_hf(tmp_path / "hf")
    torch.manual_seed(1)  # stages start from other weights
    module = PipelineModule(layers=stage_specs(cfg), num_stages=1, partition_method="uniform")
    load_hf_into_stages(module, cfg, str(tmp_path / "hf"))
    state = net.state_dict()
    for k, v in module.state_dict().items():
        assert torch.equal(v, state[stage_key_to_hf(k, cfg.num_hidden_layers)]), k

    real = train.stages.hf_key_to_stage
    monkeypatch.setattr(train.stages, "hf_key_to_stage",
                        lambda key, L: "elsewhere" if key == "model.norm.weight" else real(key, L))
    with pytest.raises(ValueError, match=r"no checkpoint tensor for stage parameters \['5.norm.weight'\]"):
        load_hf_into_stages(module, cfg, str(tmp_path / "hf"))


def test_load_hf_into_stages_cuts_a_dense_checkpoint_by_importance(world_of_one, tmp_path):
    """A pipeline run that converts a dense checkpoint (checkpoint.init_from_hf + model.moe) cuts the same
    experts into its stages as `from_hf(path, moe=..., importance=...)` does for one device."""
    from deepspeed.pipe import PipelineModule

    from model.moe import snake_partition
    from train.stages import load_hf_into_stages, stage_specs

    dense = make_net()
    dense.save_hf(tmp_path / "hf")
    moe = {"layers": [1, 3], "num_experts": 4, "top_k": 2, "router": "task"}
    cfg = dense.config.replace(moe=moe)
    F_ = cfg.intermediate_size
    importance = {1: torch.rand(F_), 3: torch.rand(F_)}
    want = UnifiedTransformer.from_hf(tmp_path / "hf", moe=moe, importance=importance).state_dict()
    torch.manual_seed(1)
    module = PipelineModule(layers=stage_specs(cfg), num_stages=1, partition_method="uniform")
    load_hf_into_stages(module, cfg, str(tmp_path / "hf"), importance)
    got = {stage_key_to_hf(k, cfg.num_hidden_layers): v for k, v in module.state_dict().items()}
    assert got.keys() == want.keys()
    for k, v in got.items():
        assert torch.equal(v, want[k]), k
    groups = snake_partition(importance[3], 4)
    dense_gate = dense.model.layers[3].mlp.gate_proj.weight
    assert torch.equal(got["model.layers.3.mlp.experts.2.gate_proj.weight"], dense_gate[groups[2]])
