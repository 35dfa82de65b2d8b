"""Model tests (CPU, fp32): HF key names and parity, MoD semantics, causal routing, config validation."""

from __future__ import annotations

import ast
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from model import ModelConfig, UnifiedTransformer
from model.mod import routable_kept
from tests.model_helpers import layer_io, sample

REPO = Path(__file__).resolve().parents[1]
T2I, MMU, LM = 0, 1, 2


def mod_cfg(capacity, **kw) -> ModelConfig:
    return ModelConfig.from_preset("debug", mod={"capacity": capacity, **kw})


def make_batch(cfg: ModelConfig, tasks: list[int], S: int = 64, n_text: int = 6, seed: int = 0):
    """Sequences shaped like the tasks: BOS + text prompt + image-ish block for t2i/mmu, text for lm."""
    g = torch.Generator().manual_seed(seed)  # one stream for the whole batch
    rows = [sample(cfg, t, S, n_text=n_text, generator=g) for t in tasks]
    return torch.stack(rows), torch.tensor(tasks)


def test_state_dict_keys_are_hf_emu3_names():
    cfg = mod_cfg({"3": {"t2i": 0.5}})
    keys = list(UnifiedTransformer(cfg).state_dict())
    layer0 = [k for k in keys if k.startswith("model.layers.0.")]
    assert keys[0] == "model.embed_tokens.weight"
    assert keys[-2:] == ["model.norm.weight", "lm_head.weight"]
    assert sorted(layer0) == sorted(
        f"model.layers.0.{n}.weight"
        for n in ("input_layernorm", "post_attention_layernorm", "self_attn.q_proj", "self_attn.k_proj",
                  "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    )
    assert [k for k in keys if "mod_router" in k] == ["model.layers.3.mod_router.weight"]
    assert len(keys) == 1 + 4 * 9 + 1 + 2


def _tiny_hf(tmp_path, conditional: bool):
    from transformers import (Emu3Config, Emu3ForCausalLM, Emu3ForConditionalGeneration, Emu3TextConfig,
                              Emu3VQVAEConfig)

    torch.manual_seed(0)
    v = ModelConfig.from_preset("debug").vocab
    text = Emu3TextConfig(vocab_size=v.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, pad_token_id=v.pad_id,
                          bos_token_id=v.bos_id, eos_token_id=v.eos_id,
                          rope_parameters={"rope_theta": 1e4, "rope_type": "default"})
    if not conditional:
        hf = Emu3ForCausalLM(text).eval()
    else:
        vq = Emu3VQVAEConfig(codebook_size=v.visual_size, embed_dim=4, latent_channels=4, base_channels=32,
                             channel_multiplier=[1, 2], num_res_blocks=1, attn_resolutions=[],
                             temporal_downsample_factor=4)
        names = {"pad_id": "<|endoftext|>", "bos_id": "<|extra_203|>", "eos_id": "<|extra_204|>",
                 "boi_id": "<|image start|>", "eoi_id": "<|image end|>", "img_id": "<|image token|>",
                 "eol_id": "<|extra_200|>", "eof_id": "<|extra_201|>"}
        vmap = {f"t{i}": i for i in range(v.text_size)}
        vmap.update({tok: getattr(v, name) for name, tok in names.items()})
        vmap.update({f"<|visual token {k:06d}|>": v.visual_start + k for k in range(v.visual_size)})
        hf = Emu3ForConditionalGeneration(Emu3Config(vq_config=vq.to_dict(), text_config=text.to_dict(),
                                                     vocabulary_map=vmap)).eval()
    path = tmp_path / ("cond" if conditional else "causal")
    hf.save_pretrained(path)
    return hf, path, v


@pytest.mark.parametrize("conditional", [False, True], ids=["Emu3ForCausalLM", "Emu3ForConditionalGeneration"])
def test_from_hf_logits_match_transformers(tmp_path, conditional):
    hf, path, v = _tiny_hf(tmp_path, conditional)
    net = UnifiedTransformer.from_hf(path, vocab=v if not conditional else None).eval()
    assert net.config.vocab == v  # the conditional checkpoint's layout comes from its vocabulary_map
    ids = torch.randint(0, v.vocab_size, (2, 37), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf.model.text_model(ids).last_hidden_state if conditional else None
        ref_logits = hf.lm_head(ref) if conditional else hf(ids).logits
        ours = net(ids).logits
    torch.testing.assert_close(ours, ref_logits, atol=1e-5, rtol=1e-5)


def test_save_hf_loads_in_transformers_and_round_trips_routers(tmp_path):
    from transformers import Emu3ForCausalLM

    hf, path, v = _tiny_hf(tmp_path, conditional=False)
    net = UnifiedTransformer.from_hf(path, vocab=v, mod={"capacity": {"1": {"t2i": 0.5}}}).eval()
    out = tmp_path / "export"
    net.save_hf(out)
    reloaded = Emu3ForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, v.vocab_size, (2, 29), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, hf(ids).logits, atol=1e-5, rtol=1e-5)
    # Our own loader restores the MoD plan and the trained routers from the side files.
    back = UnifiedTransformer.from_hf(out)
    assert back.config.mod.capacity == {1: {"t2i": 0.5}}
    torch.testing.assert_close(back.model.layers[1].mod_router.weight, net.model.layers[1].mod_router.weight)


def test_from_hf_rejects_a_mismatched_checkpoint(tmp_path):
    _, path, v = _tiny_hf(tmp_path, conditional=False)
    with pytest.raises(ValueError, match="vocabulary layout"):
        UnifiedTransformer.from_hf(path)  # vocab 776 is not Emu3's and nothing says how it is laid out
    with pytest.raises(ValueError, match="num_hidden_layers=2 but the model config num_hidden_layers=3"):
        UnifiedTransformer.from_hf(path, vocab=v, num_hidden_layers=3)


@pytest.mark.parametrize("edit", ["drop", "stray", "reshape"])
def test_from_hf_refuses_missing_stray_and_misshapen_tensors(tmp_path, edit):
    from safetensors.torch import load_file, save_file

    _, path, v = _tiny_hf(tmp_path, conditional=False)
    file = path / "model.safetensors"
    state = load_file(str(file))
    if edit == "drop":
        del state["model.layers.1.mlp.up_proj.weight"]
    elif edit == "stray":
        state["model.layers.1.mlp.extra.weight"] = torch.zeros(2)
    else:
        state["model.norm.weight"] = torch.ones(3)
    save_file(state, str(file), metadata={"format": "pt"})
    want = {"drop": r"missing tensors \['model.layers.1.mlp.up_proj.weight'\]",
            "stray": "model.layers.1.mlp.extra.weight has no place in the model",
            "reshape": r"model.norm.weight has shape \(3,\)"}[edit]
    with pytest.raises(ValueError, match=want):
        UnifiedTransformer.from_hf(path, vocab=v)


def test_from_hf_router_policy(tmp_path):
    """One policy with training's loader (model/hf.py iter_hf_weights): trained routers are kept for the same
    tasks and the same MoD layers, whether or not `mod` is passed again; other MoD layers and another task list
    start from a fresh init."""
    _, path, v = _tiny_hf(tmp_path, conditional=False)
    plan = {"capacity": {"1": {"t2i": 0.5}}}
    net = UnifiedTransformer.from_hf(path, vocab=v, mod=plan)
    with torch.no_grad():
        net.model.layers[1].mod_router.weight.fill_(0.25)  # "trained": far from the fresh init
    out = tmp_path / "export"
    net.save_hf(out)
    trained = net.model.layers[1].mod_router.weight
    for again in (None, plan):
        back = UnifiedTransformer.from_hf(out, mod=again)
        assert torch.equal(back.model.layers[1].mod_router.weight, trained)
    moved = UnifiedTransformer.from_hf(out, mod={"capacity": {"0": {"t2i": 0.5}}})
    assert moved.model.layers[1].mod_router is None
    assert (moved.model.layers[0].mod_router.weight != 0.25).all()
    both = UnifiedTransformer.from_hf(out, mod={"capacity": {"0-1": {"t2i": 0.5}}})
    assert torch.equal(both.model.layers[1].mod_router.weight, trained)
    assert (both.model.layers[0].mod_router.weight != 0.25).all()
    # the same number of tasks in another order: the bank has the same shape but its columns mean other tasks
    other_tasks = UnifiedTransformer.from_hf(out, mod={"tasks": ["mmu", "t2i", "lm"], "capacity": {"1": {"t2i": 0.5}}})
    assert (other_tasks.model.layers[1].mod_router.weight != 0.25).all()


def test_all_full_capacities_equal_the_dense_model():
    torch.manual_seed(0)
    dense = UnifiedTransformer(ModelConfig.from_preset("debug")).eval()
    full = UnifiedTransformer(mod_cfg({"0-3": {"t2i": 1.0, "mmu": 1.0, "lm": 1.0}})).eval()
    full.load_state_dict(dense.state_dict())
    ids, tasks = make_batch(dense.config, [T2I, MMU, LM])
    with torch.no_grad():
        assert torch.equal(full(ids, task_ids=tasks).logits, dense(ids).logits)
        assert float(full(ids, task_ids=tasks).aux_loss) == 0.0


@pytest.mark.parametrize("task,cap", [(T2I, 0.25), (MMU, 0.5), (LM, 0.3)])
def test_exactly_k_tokens_and_only_routable_ones_are_skipped(task, cap):
    """Per sample: every non-routable token plus ceil(cap * n_routable) routable ones go through the layer."""
    cfg = mod_cfg({"2-3": {"t2i": 0.25, "mmu": 0.5, "lm": 0.3}})
    net = UnifiedTransformer(cfg).eval()
    S = 64
    ids, tasks = make_batch(cfg, [task] * 3, S=S, seed=task)
    ids[1, 50:] = cfg.vocab.pad_id  # a padded row keeps fewer tokens than the others
    from model.mod import KIND_IMAGE, KIND_PAD, KIND_TEXT, token_kinds

    kinds = token_kinds(ids, cfg.vocab)
    routable = (kinds == KIND_IMAGE) if task != LM else ((kinds == KIND_IMAGE) | (kinds == KIND_TEXT))
    n_routable = routable.sum(1).tolist()
    k = [math.ceil(cap * n) for n in n_routable]
    n_fixed = ((kinds != KIND_PAD) & ~routable).sum(1).tolist()
    assert routable_kept(cap, n_routable[0]) == k[0] and routable_kept(1.0, 7) == 7 and routable_kept(cap, 0) == 0
    for layer in (2, 3):
        seen, out = layer_io(net, ids, tasks, layer)
        assert seen["P"] == max(f + kk for f, kk in zip(n_fixed, k))
        changed = (seen["y"] != seen["x"]).any(-1)  # [B,S]: the positions that went through the layer
        assert (changed & routable).sum(1).tolist() == k
        assert not (~changed & ~routable & (kinds != KIND_PAD)).any(), "a non-routable token was skipped"
        assert not changed[1, 50:].any(), "padding was processed"
        n_rout, n_selected = out.routing[layer, task, :2].tolist()
        assert n_rout == sum(n_routable) and n_selected == sum(k)
    # dense layers process everything
    seen, _ = layer_io(net, ids, tasks, 0)
    assert seen["P"] == S


@pytest.mark.parametrize("routing", ["topk", "causal"])
def test_router_columns_count_causal_decisions_and_their_agreement_with_topk(routing):
    """out.routing's router_on / agree columns, recomputed from outside the layer: the router logit read
    from the layer's input and the top-k membership read from which positions the layer changed."""
    from model.mod import KIND_IMAGE, ROUTING_STATS, token_kinds

    assert ROUTING_STATS == ("routable", "selected", "router_on", "agree")
    cfg = mod_cfg({"2-3": {"t2i": 0.25}}, routing=routing)
    torch.manual_seed(0)
    net = UnifiedTransformer(cfg).eval()
    for layer in (2, 3):  # logits spread around 0, so both decisions occur
        torch.nn.init.normal_(net.model.layers[layer].mod_router.weight, std=0.5)
    ids, tasks = make_batch(cfg, [T2I, T2I, MMU, LM])
    routable = (token_kinds(ids, cfg.vocab) == KIND_IMAGE) & (tasks == T2I)[:, None]
    for layer in (2, 3):
        seen, out = layer_io(net, ids, tasks, layer)
        r = net.model.layers[layer].mod_router(seen["x"])[..., T2I]
        on, kept = (r > 0) & routable, (seen["y"] != seen["x"]).any(-1) & routable
        n_routable, n_selected, n_on, n_agree = out.routing[layer, T2I].tolist()
        assert (n_routable, n_selected, n_on) == (routable.sum(), kept.sum(), on.sum())
        assert n_agree == ((on == kept) & routable).sum()
        assert 0 < n_on < n_routable
        if routing == "topk":
            assert n_agree < n_routable  # random routers disagree with top-k somewhere
        else:
            assert n_selected == n_on and n_agree == n_routable  # causal routing keeps exactly r > 0
        for task in (MMU, LM):  # full layer: every column is the routable count
            n = out.routing[layer, task].tolist()
            assert n[0] > 0 and n == [n[0]] * 4


@pytest.mark.parametrize("routing", ["topk", "causal"])
@pytest.mark.parametrize("tasks", [[T2I, MMU, LM], [MMU, LM]], ids=["with-a-routed-task", "all-full"])
def test_full_capacity_tasks_report_every_routable_token_selected(routing, tasks):
    """In a MoD layer, a task with capacity 1 (mmu, listed at 1.0) or not listed at all (lm) processes every
    token, and out.routing says so: selected == routable, beside a routed task (t2i) in the same micro-batch or
    in a micro-batch of full-capacity tasks only (the layer's plain path)."""
    cfg = mod_cfg({"1-2": {"t2i": 0.25, "mmu": 1.0}}, routing=routing)
    torch.manual_seed(0)
    net = UnifiedTransformer(cfg).eval()
    ids, task_ids = make_batch(cfg, tasks)
    with torch.no_grad():
        out = net(ids, task_ids=task_ids)
    for layer in (1, 2):
        for task in (MMU, LM):
            n_routable, n_selected = out.routing[layer, task, :2].tolist()
            assert n_routable > 0 and n_selected == n_routable, (layer, task, n_routable, n_selected)
        if T2I in tasks and routing == "topk":
            n_routable, n_selected = out.routing[layer, T2I, :2].tolist()
            assert n_selected == math.ceil(0.25 * n_routable)


def test_padding_is_skipped_first():
    cfg = mod_cfg({"1": {"lm": 0.5}})
    net = UnifiedTransformer(cfg).eval()
    ids, tasks = make_batch(cfg, [LM, LM], S=32)
    ids[:, 20:] = cfg.vocab.pad_id
    seen, _ = layer_io(net, ids, tasks, 1)
    changed = (seen["y"] != seen["x"]).any(-1)
    assert not changed[:, 20:].any()


def test_mixed_task_batch_matches_each_sequence_alone():
    """A micro-batch mixing tasks (different k per sequence) gives each sequence the result it gets alone."""
    cfg = mod_cfg({"1-3": {"t2i": 0.25, "mmu": 0.5}})
    net = UnifiedTransformer(cfg).eval()
    ids, tasks = make_batch(cfg, [T2I, MMU, LM], S=64)
    with torch.no_grad():
        mixed = net(ids, task_ids=tasks)
        for b in range(3):
            alone = net(ids[b : b + 1], task_ids=tasks[b : b + 1])
            torch.testing.assert_close(mixed.logits[b : b + 1], alone.logits, atol=1e-5, rtol=1e-5)


def test_router_gradients_reach_the_columns_of_tasks_present():
    cfg = mod_cfg({"2-3": {"t2i": 0.25, "mmu": 0.5}}, aux_loss_weight=0.0)
    net = UnifiedTransformer(cfg)
    ids, tasks = make_batch(cfg, [T2I, T2I, LM])  # mmu absent; lm present but full-capacity here
    out = net(ids, task_ids=tasks)
    torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
    for layer in (2, 3):
        g = net.model.layers[layer].mod_router.weight.grad  # [num_tasks, D]
        assert g[T2I].abs().sum() > 0, "the gate puts the router of a routed task on the gradient path"
        assert g[MMU].abs().sum() == 0 and g[LM].abs().sum() == 0


def test_aux_loss_teaches_router_to_predict_topk():
    cfg = mod_cfg({"2-3": {"t2i": 0.5}}, aux_loss_weight=1.0)
    torch.manual_seed(0)
    net = UnifiedTransformer(cfg)
    ids, tasks = make_batch(cfg, [T2I] * 4)
    routers = [p for n, p in net.named_parameters() if "mod_router" in n]
    opt = torch.optim.Adam(routers, lr=3e-1)
    first = None
    for _ in range(30):
        aux = net(ids, task_ids=tasks).aux_loss
        first = first if first is not None else aux.item()
        opt.zero_grad()
        aux.backward()
        opt.step()
    assert aux.item() < 0.5 * first
    # the trained causal decisions now mostly agree with top-k on this batch
    for layer in (2, 3):
        topk_sel = net(ids, task_ids=tasks).routing[layer, T2I, 1]
        causal_sel = net(ids, task_ids=tasks, routing="causal").routing[layer, T2I, 1]
        assert abs(float(causal_sel - topk_sel)) < 0.2 * float(topk_sel)


def test_causal_routing_never_looks_ahead():
    cfg = mod_cfg({"1-3": {"t2i": 0.3, "mmu": 0.3, "lm": 0.3}})
    torch.manual_seed(0)
    net = UnifiedTransformer(cfg).eval()
    # routers with real magnitude so that decisions differ between tokens
    for layer in net.model.layers:
        if layer.mod_router is not None:
            torch.nn.init.normal_(layer.mod_router.weight, std=0.5)
    ids, tasks = make_batch(cfg, [T2I, LM], S=40)
    t = 25
    changed = ids.clone()
    changed[:, t + 1 :] = torch.flip(changed[:, t + 1 :], dims=[1])
    with torch.no_grad():
        a = net(ids, task_ids=tasks, routing="causal")
        b = net(changed, task_ids=tasks, routing="causal")
        assert 0 < a.routing[1:, T2I, 1].sum() < a.routing[1:, T2I, 0].sum()  # some tokens really skipped
        torch.testing.assert_close(a.logits[:, : t + 1], b.logits[:, : t + 1], atol=1e-6, rtol=1e-6)
        # top-k routing does look ahead: padding the tail changes each sample's k, hence earlier logits
        padded = ids.clone()
        padded[:, t + 1 :] = cfg.vocab.pad_id
        torch.testing.assert_close(net(padded, task_ids=tasks, routing="causal").logits[:, : t + 1],
                                   a.logits[:, : t + 1], atol=1e-6, rtol=1e-6)
        c, d = net(ids, task_ids=tasks), net(padded, task_ids=tasks)
        for b in range(2):
            assert not torch.allclose(c.logits[b, : t + 1], d.logits[b, : t + 1])


def test_gradient_checkpointing_gives_the_same_gradients():
    cfg = mod_cfg({"2-3": {"t2i": 0.25}})
    torch.manual_seed(0)
    net = UnifiedTransformer(cfg)
    ids, tasks = make_batch(cfg, [T2I, T2I])
    grads = []
    for ckpt in (False, True):
        net.zero_grad()
        net.gradient_checkpointing = ckpt
        out = net(ids, task_ids=tasks)
        (out.logits.square().mean() + out.aux_loss).backward()
        grads.append([p.grad.clone() for p in net.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_emu3_8b_on_meta_matches_transformers_parameter_count():
    from transformers import Emu3ForCausalLM, Emu3TextConfig

    with torch.device("meta"):
        ours = UnifiedTransformer(ModelConfig.from_preset("emu3-8b"))
        theirs = Emu3ForCausalLM(Emu3TextConfig())
    n = ours.num_parameters()
    assert n == sum(p.numel() for p in theirs.parameters())
    assert abs(n - 8.49e9) < 0.01e9
    assert ours.config.vocab.vocab_size == Emu3TextConfig().vocab_size


def test_yaml_schema_and_presets():
    doc = yaml.safe_load("""
model:
  preset: emu3-8b
  num_hidden_layers: 32
  mod:
    tasks: [t2i, mmu, lm]
    capacity:
      "16-31": {t2i: 0.2, mmu: 0.2}
    routable: {t2i: image, mmu: image, lm: all}
    aux_loss_weight: 0.01
    routing: topk
""")
    cfg = ModelConfig.from_dict(doc["model"])
    assert cfg.mod.mod_layers() == list(range(16, 32))
    assert cfg.mod.capacity_of(20, "t2i") == 0.2 and cfg.mod.capacity_of(20, "lm") == 1.0
    assert cfg.mod.capacity_of(3, "t2i") == 1.0
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg  # resolved config round-trips
    small = ModelConfig.from_preset("emu3-8b", num_hidden_layers=2)
    assert small.hidden_size == 4096 and small.num_hidden_layers == 2


@pytest.mark.parametrize("override,field", [
    ({"num_attention_heads": 3}, "hidden_size"),
    ({"num_key_value_heads": 3}, "num_key_value_heads"),
    ({"hidden_size": -1}, "hidden_size"),
    ({"bogus": 1}, "bogus"),
    ({"mod": {"capacity": {"2": {"t2i": 1.5}}}}, "capacity"),
    ({"mod": {"capacity": {"9": {"t2i": 0.5}}}}, "capacity names layer 9"),
    ({"mod": {"capacity": {"x-y": {"t2i": 0.5}}}}, "capacity key"),
    ({"mod": {"capacity": {"1": {"video": 0.5}}}}, "video"),
    ({"mod": {"routable": {"t2i": "pixels"}}}, "routable.t2i"),
    ({"mod": {"routing": "random"}}, "routing"),
    ({"vocab": {"eol_id": 5}}, "eol_id"),
    ({"vocab": {"vocab_size": 100}}, "vocab_size"),
])
def test_config_validation_names_the_field(override, field):
    with pytest.raises(ValueError, match=field):
        ModelConfig.from_preset("debug", **override)


def test_task_ids_are_checked():
    net = UnifiedTransformer(mod_cfg({"1": {"t2i": 0.5}}))
    ids, _ = make_batch(net.config, [T2I])
    with pytest.raises(ValueError, match="task_ids is required"):
        net(ids)
    with pytest.raises(ValueError, match=r"task_ids must lie in"):
        net(ids, task_ids=torch.tensor([7]))


def test_model_package_does_not_import_deepspeed_or_torch_distributed():
    for path in (REPO / "model").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            for name in names:
                assert not name.startswith(("deepspeed", "torch.distributed")), f"{path.name} imports {name}"
    code = "import sys, model, model.hf, model.mod; assert 'deepspeed' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_shared_router_ablation_scores_every_task_with_one_column():
    cfg = mod_cfg({"2-3": {"t2i": 0.25, "mmu": 0.5}}, shared_router=True)
    net = UnifiedTransformer(cfg)
    assert net.model.layers[2].mod_router.weight.shape == (1, cfg.hidden_size)
    ids, tasks = make_batch(cfg, [T2I, MMU])
    out = net(ids, task_ids=tasks)
    (out.logits.square().mean() + out.aux_loss).backward()
    assert net.model.layers[2].mod_router.weight.grad.abs().sum() > 0
    assert out.routing[2, MMU, 1] > out.routing[2, T2I, 1]  # capacities stay per task
