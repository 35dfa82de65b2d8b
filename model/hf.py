"""HF Emu3 checkpoint interop: read `Emu3ForCausalLM` / `Emu3ForConditionalGeneration` directories, write
directories that `transformers.Emu3ForCausalLM.from_pretrained` loads.

Our parameter names already are `Emu3ForCausalLM`'s, so reading is a key-prefix mapping:
  Emu3ForCausalLM                 model.* , lm_head.weight
  Emu3ForConditionalGeneration    model.text_model.* , lm_head.weight          (in-memory names)
                                  text_model.model.* , text_model.lm_head.weight (as saved on disk)
The vision tokenizer (`vqmodel.*`) is not part of the decoder and is skipped.

What HF's config cannot express (the vocabulary layout beyond bos/eos/pad, the MoD plan, the MoE plan) is
written beside it as `unimod_config.json`, MoD router banks as `mod_routers.safetensors` and the MoE side
tensors as `moe.safetensors`, so the HF directory stays a clean Emu3ForCausalLM checkpoint. Weights load with
safetensors (or `torch.load(weights_only=True)` for legacy .bin files): nothing from a checkpoint is executed.

MoE layers (`model.moe.layers`, model/moe.py). An MoE layer has no dense MLP; the Emu3 side holds its dense
equivalent, so `Emu3ForCausalLM.from_pretrained` loads the directory unchanged:
  model.safetensors   model.layers.N.mlp.{gate,up,down}_proj.weight  [F,D] [F,D] [D,F]: the experts' neurons
                      merged (`model.moe.merge_experts`): expert e's rows sit at dense neurons expert_neurons[e]
  moe.safetensors     model.layers.N.mlp.router.weight    [E*T or E, D]  the trained router
                      model.layers.N.mlp.expert_neurons   [E, F/E] int64 dense neuron index of each expert row
  unimod_config.json  "moe": the MoEConfig (layers, num_experts, top_k, router, capacity_factor, ...)
Experts cut from a dense MLP (`MoEMLP.from_dense`, or `load_hf(..., moe=...)`) go back to the dense order
they came from, so the dense MLP is the original one; fresh experts sit side by side in expert order. Either
way the dense SwiGLU MLP equals the sum of all E experts with gate 1: HF's model computes the MoE layer at
k = E with a zero router (the dense equivalent), not the top-k MoE with its trained gates; padding tokens
also get an MLP update there (an MoE layer gives them none). Our loader cuts the experts back out of the
dense MLP by expert_neurons (copies: bit for bit), so the expert weights are stored once.
"""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch

from model.config import ModelConfig, MoDConfig, MoEConfig, VocabLayout
from model.moe import cut_experts, expert_neuron_groups, merge_experts, partition

UNIMOD_CONFIG = "unimod_config.json"
ROUTERS_FILE = "mod_routers.safetensors"
MOE_FILE = "moe.safetensors"
_MLP_PROJ = (("gate_proj", 0), ("up_proj", 0), ("down_proj", 1))  # (name, the neurons' dim of its weight)

# Emu3's token names for the structural ids (the tokenizer's vocabulary_map uses these strings).
_EMU3_TOKEN_NAMES = {
    "pad_id": "<|endoftext|>",
    "bos_id": "<|extra_203|>",
    "eos_id": "<|extra_204|>",
    "boi_id": "<|image start|>",
    "eoi_id": "<|image end|>",
    "img_id": "<|image token|>",
    "eol_id": "<|extra_200|>",
    "eof_id": "<|extra_201|>",
}
_VISUAL_PREFIX = "<|visual token "


def _read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise ValueError(f"{path}: not found; expected an HF Emu3 checkpoint directory") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def layout_from_vocabulary_map(vmap: Mapping[str, int], vocab_size: int) -> VocabLayout:
    """Emu3ForConditionalGeneration stores the tokenizer's vocabulary; derive our layout from it."""
    missing = [tok for tok in _EMU3_TOKEN_NAMES.values() if tok not in vmap]
    if missing:
        raise ValueError(f"vocabulary_map lacks Emu3 structural token(s) {missing}")
    visual = sorted(i for tok, i in vmap.items() if tok.startswith(_VISUAL_PREFIX))
    if not visual or visual != list(range(visual[0], visual[0] + len(visual))):
        raise ValueError("vocabulary_map: visual tokens '<|visual token NNNNNN|>' are missing or not contiguous")
    ids = {name: int(vmap[tok]) for name, tok in _EMU3_TOKEN_NAMES.items()}
    return VocabLayout(text_size=ids["pad_id"], visual_start=visual[0], visual_size=len(visual),
                       vocab_size=vocab_size, **ids)


def config_from_hf(path: str | os.PathLike) -> tuple[dict[str, Any], str]:
    """Read `config.json` (+ `unimod_config.json` if present) -> (ModelConfig kwargs, architecture)."""
    path = Path(path)
    raw = _read_json(path / "config.json")
    model_type = raw.get("model_type")
    if model_type == "emu3":
        text = raw.get("text_config") or {}
        arch = "Emu3ForConditionalGeneration"
    elif model_type in ("emu3_text_model", "llama"):
        text, arch = raw, "Emu3ForCausalLM"
    else:
        raise ValueError(f"{path}/config.json: model_type {model_type!r} is not an Emu3 checkpoint "
                         "(expected 'emu3' or 'emu3_text_model')")
    if text.get("tie_word_embeddings", raw.get("tie_word_embeddings", False)):
        raise ValueError(f"{path}/config.json: tie_word_embeddings=true, but Emu3 (and this model) uses an untied lm_head")
    if text.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{path}/config.json: hidden_act {text.get('hidden_act')!r} is not supported (SwiGLU/silu only)")
    rope = text.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"{path}/config.json: rope_parameters.rope_type {rope['rope_type']!r} is not supported")
    theta = rope.get("rope_theta", text.get("rope_theta", 1e6))
    kwargs: dict[str, Any] = dict(
        hidden_size=text.get("hidden_size", 4096),
        intermediate_size=text.get("intermediate_size", 14336),
        num_hidden_layers=text.get("num_hidden_layers", 32),
        num_attention_heads=text.get("num_attention_heads", 32),
        num_key_value_heads=text.get("num_key_value_heads") or text.get("num_attention_heads", 32),
        rms_norm_eps=text.get("rms_norm_eps", 1e-5),
        rope_theta=float(theta),
        max_position_embeddings=text.get("max_position_embeddings", 9216),
        initializer_range=text.get("initializer_range", 0.02),
    )
    vocab_size = text.get("vocab_size", 184622)
    extra = path / UNIMOD_CONFIG
    if extra.exists():
        ours = _read_json(extra)
        kwargs["vocab"] = ours["vocab"]
        if ours.get("mod"):
            kwargs["mod"] = ours["mod"]
        if (ours.get("moe") or {}).get("layers"):
            kwargs["moe"] = ours["moe"]
    elif raw.get("vocabulary_map"):
        kwargs["vocab"] = layout_from_vocabulary_map(raw["vocabulary_map"], vocab_size).to_dict()
    elif vocab_size == VocabLayout().vocab_size:
        kwargs["vocab"] = VocabLayout().to_dict()  # the released Emu3 vocabulary
    if "vocab" in kwargs and kwargs["vocab"]["vocab_size"] != vocab_size:
        raise ValueError(f"{path}: vocabulary layout has vocab_size {kwargs['vocab']['vocab_size']} "
                         f"but config.json says {vocab_size}")
    kwargs["_vocab_size"] = vocab_size
    return kwargs, arch


def _weight_files(path: Path) -> list[Path]:
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (path / index).exists():
            weight_map = _read_json(path / index)["weight_map"]
            return [path / f for f in sorted(set(weight_map.values()))]
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (path / single).exists():
            return [path / single]
    raise ValueError(f"{path}: no model.safetensors, sharded index or pytorch_model.bin found")


def iter_hf_tensors(path: str | os.PathLike) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (our key, tensor) for every decoder tensor of an HF Emu3 checkpoint, one file at a time
    (so a ZeRO-3 loader can copy tensor by tensor without holding the whole model)."""
    from safetensors import safe_open

    for file in _weight_files(Path(path)):
        if file.suffix == ".safetensors":
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    ours = map_hf_key(key)
                    if ours is not None:
                        yield ours, f.get_tensor(key)
        else:
            state = torch.load(file, map_location="cpu", weights_only=True)
            for key, tensor in state.items():
                ours = map_hf_key(key)
                if ours is not None:
                    yield ours, tensor


def map_hf_key(key: str) -> str | None:
    """HF Emu3 key -> our key (None for tensors that are not part of the decoder)."""
    for prefix, repl in (("model.text_model.", "model."), ("text_model.model.", "model."),
                         ("text_model.lm_head.", "lm_head.")):
        if key.startswith(prefix):
            return repl + key[len(prefix):]
    if key.startswith(("model.vqmodel.", "vqmodel.")) or key.endswith("rotary_emb.inv_freq"):
        return None
    return key


def check_hf_matches(model_cfg: ModelConfig, path: str | os.PathLike) -> None:
    theirs, _ = config_from_hf(path)
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads"):
        if theirs[key] != getattr(model_cfg, key):
            raise ValueError(f"{path}: the checkpoint has {key}={theirs[key]} but the model config "
                             f"{key}={getattr(model_cfg, key)}")
    if theirs["_vocab_size"] != model_cfg.vocab_size:
        raise ValueError(f"{path}: the checkpoint has vocab_size={theirs['_vocab_size']} but the model's "
                         f"vocabulary layout has {model_cfg.vocab_size}")


def iter_hf_routers(model_cfg: ModelConfig, path: str | os.PathLike):
    """Yield (key, tensor) of the MoD router banks `save_hf` writes beside the HF weights
    (mod_routers.safetensors), when the checkpoint's task list is this model's: a UniMoD checkpoint (e.g. a
    previous run's hf/ export) then keeps its trained routers. A plain Emu3 checkpoint has none, and a
    different task list would score the wrong tasks, so routers then start fresh."""
    from safetensors import safe_open

    file = Path(path) / ROUTERS_FILE
    theirs, _ = config_from_hf(path)
    if not file.exists() or (theirs.get("mod") or {}).get("tasks") != list(model_cfg.mod.tasks):
        return
    with safe_open(str(file), framework="pt") as f:
        for key in f.keys():
            yield key, f.get_tensor(key)


def moe_layers_to_convert(cfg: ModelConfig, path: str | os.PathLike) -> list[int]:
    """The MoE layers of `cfg` that `moe_layout` converts from the checkpoint's dense MLP when given no importance:
    every one the checkpoint does not hold as an MoE layer with the same number of experts."""
    theirs, _ = config_from_hf(path)
    their_moe = MoEConfig(**theirs["moe"]) if theirs.get("moe") else MoEConfig()
    same = (their_moe.num_experts, their_moe.shared_experts) == (cfg.moe.num_experts, cfg.moe.shared_experts)
    held = set(their_moe.layers) if (Path(path) / MOE_FILE).exists() and same else set()
    return [layer for layer in cfg.moe.layers if layer not in held]


def moe_layout(cfg: ModelConfig, path: str | os.PathLike,
               importance: Mapping[int, torch.Tensor] | None = None
               ) -> tuple[dict[int, torch.Tensor], dict[str, torch.Tensor]]:
    """Where the experts of each MoE layer of `cfg` come from -> ({layer: [E, F/E] dense neuron indices of each
    expert}, {router parameter name: the checkpoint's trained router}).

    A layer the checkpoint holds as an MoE layer with the same E and shared experts is cut as it was saved (its
    expert_neurons), and keeps its router when the router kind is the same and, for a task router, the task
    list too. Every other MoE layer is converted from the checkpoint's dense MLP (a dense checkpoint, a dense
    layer there, another E or number of shared experts, or a layer named in `importance`): neurons dealt by
    `model.moe.partition` of `importance[layer]` ([F] scores, the trainer supplies calibration importance; the
    most important to the shared experts, snake order), by default of equal importance, i.e. in neuron index
    order; its router starts fresh (zero). Either way all experts active reproduce the dense MLP."""
    importance = dict(importance or {})
    F_, E, S = cfg.intermediate_size, cfg.moe.num_experts, cfg.moe.shared_experts
    for layer, scores in importance.items():
        if layer not in cfg.moe.layers:
            raise ValueError(f"importance names layer {layer}, which is not an MoE layer (moe.layers={cfg.moe.layers})")
        if tuple(scores.shape) != (F_,):
            raise ValueError(f"importance[{layer}] has shape {tuple(scores.shape)}, expected ({F_},): one score "
                             "per MLP neuron")
    # One decision of which layers the checkpoint holds as this model's experts (`moe_layers_to_convert`, which
    # the trainer asks before computing importance); `importance` converts a held layer anew.
    convert = set(moe_layers_to_convert(cfg, path)) | set(importance)
    saved: dict[str, torch.Tensor] = {}
    if any(layer not in convert for layer in cfg.moe.layers):
        from safetensors.torch import load_file

        saved = load_file(str(Path(path) / MOE_FILE))
    theirs, _ = config_from_hf(path)
    their_moe = MoEConfig(**theirs["moe"]) if theirs.get("moe") else MoEConfig()
    same_router = their_moe.router == cfg.moe.router and (
        cfg.moe.router == "shared" or (theirs.get("mod") or {}).get("tasks") == list(cfg.mod.tasks))
    groups, routers = {}, {}
    for layer in cfg.moe.layers:
        prefix = f"model.layers.{layer}.mlp."
        neurons = saved.get(prefix + "expert_neurons")
        if layer not in convert and neurons is not None:
            if tuple(neurons.shape) != (E, F_ // E) or not torch.equal(neurons.flatten().sort().values,
                                                                       torch.arange(F_)):
                raise ValueError(f"{path}/{MOE_FILE}: {prefix}expert_neurons is not a partition of the {F_} "
                                 f"neurons into {E} experts of {F_ // E}")
            groups[layer] = neurons.long()
            router = saved.get(prefix + "router.weight")
            if same_router and router is not None:
                routers[prefix + "router.weight"] = router
        else:
            scores = importance.get(layer, torch.zeros(F_))
            groups[layer] = torch.stack(partition(scores, E, S))
    return groups, routers


def parameter_shapes(net: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """{name: full shape} of a model's parameters (a ZeRO-3 partitioned parameter's full shape is `ds_shape`)."""
    return {k: tuple(getattr(p, "ds_shape", p.shape)) for k, p in net.named_parameters()}


def iter_hf_weights(cfg: ModelConfig, path: str | os.PathLike, expected: Mapping[str, tuple[int, ...]],
                    importance: Mapping[int, torch.Tensor] | None = None,
                    layout: tuple[dict[int, torch.Tensor], dict[str, torch.Tensor]] | None = None
                    ) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (parameter name, tensor) for every weight of a model shaped by `cfg` from an HF Emu3 directory,
    streaming (a ZeRO-3 or pipeline loader copies tensor by tensor). The one reader of HF weights: training
    (ZeRO, pipeline stages) and `load_hf` (`UnifiedTransformer.from_hf`) all load through it.

    Router policy: a MoD layer's router bank comes from the directory's mod_routers.safetensors when its task
    list is cfg's and the bank's shape matches (the same tasks, a MoD layer there too), else it is not
    yielded and keeps its fresh init; banks of layers that are not MoD layers in cfg are left out.

    MoE policy (`moe_layout`): an MoE layer of cfg gets its experts cut from the checkpoint's dense MLP of that
    layer (as saved, or converted by `importance` / equal importance), and its router from moe.safetensors
    when it fits, else a zero router (the fresh init, yielded, so every loader fills it). A checkpoint's MoE
    layer that is dense in cfg loads as its dense equivalent (k = E) and its router is left out, as MoD banks
    are. Raises
    ValueError for a config that differs from cfg, a tensor of the wrong shape or with no place in the model,
    or (after the last tensor) a missing one. `expected`: the whole model's `parameter_shapes` (given by the
    caller, who holds the model: this module builds none, so the model can import it)."""
    check_hf_matches(cfg, path)
    seen = set()
    # `layout`: `moe_layout(cfg, path, importance)` when the caller has it already (load_hf keeps the groups).
    groups, moe_routers = layout if layout is not None else moe_layout(cfg, path, importance)
    F_, D = cfg.intermediate_size, cfg.hidden_size
    # an MoE layer's dense MLP tensor -> (layer, projection, the neurons' dim)
    dense_of_moe = {f"model.layers.{i}.mlp.{name}.weight": (i, name, dim) for i in groups for name, dim in _MLP_PROJ}

    def pieces(key: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        if key not in dense_of_moe:
            yield key, tensor
            return
        i, name, dim = dense_of_moe[key]
        want = (F_, D) if dim == 0 else (D, F_)
        if tuple(tensor.shape) != want:
            raise ValueError(f"{path}: {key} has shape {tuple(tensor.shape)}, the model expects {want}")
        seen.add(key)
        for e, w in enumerate(cut_experts(tensor, groups[i], dim)):
            yield f"model.layers.{i}.mlp.experts.{e}.{name}.weight", w

    mod_routers = ((k, t) for k, t in iter_hf_routers(cfg, path) if expected.get(k) == tuple(t.shape))
    # Every MoE router is yielded: the checkpoint's, or zeros (MoEMLP's init) when it starts fresh.
    routers = ((k, moe_routers.get(k, torch.zeros(expected.get(k, ()))))
               for k in (f"model.layers.{i}.mlp.router.weight" for i in groups))
    for hf_key, hf_tensor in itertools.chain(iter_hf_tensors(path), mod_routers, routers):
        for key, tensor in pieces(hf_key, hf_tensor):
            if key not in expected:
                raise ValueError(f"{path}: tensor {key} has no place in the model")
            if tuple(tensor.shape) != expected[key]:
                raise ValueError(f"{path}: {key} has shape {tuple(tensor.shape)}, the model expects {expected[key]}")
            seen.add(key)
            yield key, tensor
    missing = sorted(k for k in itertools.chain(expected, dense_of_moe) if k not in seen and ".mod_router." not in k)
    if missing:
        raise ValueError(f"{path}: missing tensors {missing[:5]}{'...' if len(missing) > 5 else ''}")


def load_hf(cls, path, mod: Mapping[str, Any] | MoDConfig | None = None,
            moe: Mapping[str, Any] | MoEConfig | None = None, importance: Mapping[int, torch.Tensor] | None = None,
            dtype: torch.dtype | None = None, **overrides: Any):
    """Build `cls` (UnifiedTransformer) from an HF Emu3 directory, through `iter_hf_weights` (its router
    and MoE policies included).

    `mod` adds (or replaces) the MoD plan: a dense checkpoint gets freshly initialised router banks
    (UniMoD's fine-tuning setting); a UniMoD checkpoint keeps its trained banks for the plan's MoD layers
    that were MoD layers there with the same tasks, and the plan's other MoD layers start fresh.

    `moe` adds (or replaces) the MoE plan the same way: a dense checkpoint's MLPs of `moe["layers"]` are cut
    into experts (snake partition of `importance[layer]`, [F] neuron scores, default equal importance: index
    order; calibration importance from the training split is the trainer's to supply) with a zero router, so
    the converted model at k = E computes the dense checkpoint; an MoE checkpoint keeps its experts and trained
    routers where `moe_layout` says they fit; `moe={"layers": []}` loads its dense equivalent. `dtype`
    casts everything (default: the checkpoint's dtype). Other keyword overrides go to ModelConfig (e.g.
    `vocab=` for a checkpoint whose layout is unknown).
    """
    path = Path(path)
    kwargs, _ = config_from_hf(path)
    vocab_size = kwargs.pop("_vocab_size")
    if mod is not None:
        kwargs["mod"] = mod.to_dict() if isinstance(mod, MoDConfig) else dict(mod)
    if moe is not None:
        kwargs["moe"] = moe.to_dict() if isinstance(moe, MoEConfig) else dict(moe)
    kwargs.update({k: v for k, v in overrides.items() if v is not None})
    if "vocab" not in kwargs:
        raise ValueError(f"{path}: cannot tell the vocabulary layout (vocab_size {vocab_size} is not Emu3's and "
                         "there is no vocabulary_map or unimod_config.json); pass vocab=VocabLayout(...)")
    if isinstance(kwargs["vocab"], VocabLayout):
        kwargs["vocab"] = kwargs["vocab"].to_dict()
    cfg = ModelConfig(**kwargs)

    with torch.device("meta"):
        net = cls(cfg)
    layout = moe_layout(cfg, path, importance)
    state = dict(iter_hf_weights(cfg, path, parameter_shapes(net), layout=layout))
    dtype = dtype or state["model.embed_tokens.weight"].dtype
    # MoD routers the checkpoint does not provide are initialised on CPU exactly as a fresh model would.
    std = cfg.mod.router_init_std
    for key, p in net.named_parameters():
        if key not in state:
            state[key] = torch.empty(p.shape).normal_(0.0, std)
    net.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
    for i, g in layout[0].items():  # a later save_hf writes the dense MLP in this neuron order again
        net.model.layers[i].mlp.neuron_groups = g.tolist()
    return net


def hf_text_config(cfg: ModelConfig, dtype: torch.dtype | None = None):
    """The transformers `Emu3TextConfig` with our shapes (what `save_hf` writes as config.json)."""
    from transformers import Emu3TextConfig

    v = cfg.vocab
    return Emu3TextConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps, rope_parameters={"rope_theta": cfg.rope_theta, "rope_type": "default"},
        initializer_range=cfg.initializer_range, pad_token_id=v.pad_id, bos_token_id=v.bos_id,
        eos_token_id=v.eos_id, tie_word_embeddings=False, attention_dropout=0.0,
        architectures=["Emu3ForCausalLM"], dtype=str(dtype).removeprefix("torch.") if dtype else None,
    )


def save_hf(net, path, state_dict: Mapping[str, torch.Tensor] | None = None, dtype: torch.dtype | None = None,
            max_shard_size: str = "5GB") -> None:
    """Write an Emu3ForCausalLM directory (safetensors, sharded above `max_shard_size`).

    `state_dict` lets the trainer pass consolidated ZeRO-3 weights instead of `net`'s own (which may be
    partitioned). MoE layers are written as their dense equivalent plus moe.safetensors (module docstring);
    the neuron order comes from `net`'s MoE modules (`expert_neuron_groups`: fresh modules, as a config-only
    shell has, give expert order, which is as valid a dense MLP). Writes to a temporary sibling and renames,
    so a crash never leaves a half directory.
    """
    import shutil

    from huggingface_hub import save_torch_state_dict
    from safetensors.torch import save_file

    cfg: ModelConfig = net.config
    state = dict(state_dict if state_dict is not None else net.state_dict())
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    routers = {k: state.pop(k).contiguous() for k in list(state) if ".mod_router." in k}
    moe_side = {}
    for i in cfg.moe.layers:
        prefix = f"model.layers.{i}.mlp."
        groups = expert_neuron_groups(net.model.layers[i].mlp)
        for name, dim in _MLP_PROJ:
            experts = [state.pop(f"{prefix}experts.{e}.{name}.weight") for e in range(len(groups))]
            state[f"{prefix}{name}.weight"] = merge_experts(experts, groups, dim)
        moe_side[prefix + "router.weight"] = state.pop(prefix + "router.weight").contiguous()
        moe_side[prefix + "expert_neurons"] = groups
    stray = [k for k in state if ".mlp.experts." in k or ".mlp.router." in k]
    if stray:
        raise ValueError(f"{stray[0]}: an MoE layer outside model.moe.layers={cfg.moe.layers} (converted in place "
                         "by convert_mlps?) has no HF layout; convert through the config: "
                         "UnifiedTransformer.from_hf(path, moe={...}, importance={...})")
    state = {k: v.contiguous() for k, v in state.items()}
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_torch_state_dict(state, tmp, max_shard_size=max_shard_size)
    hf_text_config(cfg, next(iter(state.values())).dtype).save_pretrained(tmp)
    with open(tmp / UNIMOD_CONFIG, "w") as f:
        json.dump({"vocab": cfg.vocab.to_dict(), "mod": cfg.mod.to_dict(), "moe": cfg.moe.to_dict()}, f, indent=2)
    if routers:
        save_file(routers, str(tmp / ROUTERS_FILE))
    if moe_side:
        save_file(moe_side, str(tmp / MOE_FILE))
    if path.exists():
        old = path.with_name(path.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old)
    else:
        tmp.rename(path)
