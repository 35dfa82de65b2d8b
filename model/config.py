"""Typed model configuration: architecture shapes, the unified vocabulary layout, task-aware MoD, MoE MLPs.

One dataclass per concern (`VocabLayout`, `MoDConfig`, `MoEConfig`, `ModelConfig`), validated in `__post_init__`
with a `ValueError` that names the bad field. Presets follow litgpt's `Config.from_name`: a named
size plus keyword overrides (`ModelConfig.from_preset("emu3-8b", num_hidden_layers=2)`).

The checks every config dataclass of the project shares live here too, since model/, data/ and train/ all
import this module: `known_fields` (a section's keys against its dataclass: a typo is an error, not
ignored), `check_int` and `check_number` (a field's type and range, with the message naming the field).

YAML schema (also accepted as a plain dict):

    model:
      preset: emu3-8b          # any field of the preset can be overridden here
      mod:
        tasks: [t2i, mmu, lm]  # task id = index in this list
        capacity:              # layer index or inclusive range -> capacity per task in (0, 1]:
          "16-31": {t2i: 0.2, mmu: 0.2}   # keep 20% of each sample's routable (image) tokens + all others
        routable: {t2i: image, mmu: image, lm: all}
        aux_loss_weight: 0.01
        routing: topk          # topk | causal
      moe:                     # Mixture-of-Experts MLPs (model/moe.py); absent or layers: [] = dense MLPs
        layers: ["16-31"]      # same keys as mod.capacity: "7", "16-31", or ints
        num_experts: 8
        top_k: 2               # routed experts per token
        shared_experts: 0      # experts every token runs besides its top_k (the most important neurons)
        router: task           # task (one block of E - shared logits per task) | shared
        balance_loss_weight: 0.01
        capacity_factor: 1.25  # null = no limit
        overflow: drop
      mod_plan: runs/analysis/mod_plan.yaml   # optional: a plan written by `python -m tools.analyze`;
                                              # its fields override those of mod: above
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

ROUTABLE_KINDS = ("image", "text", "all")
ROUTING_MODES = ("topk", "causal")
MOE_ROUTERS = ("task", "shared")
MOE_OVERFLOW = ("drop",)


# ----- validation shared by the config dataclasses (model/, data/, train/) --------------------------------
def known_fields(cls: type, d: Mapping[str, Any], where: str) -> dict[str, Any]:
    """`d` as keyword arguments for the dataclass `cls`. A key that is none of its fields raises a ValueError
    naming `<where>.<key>` and the known fields: a misspelt setting must stop the run, not be ignored."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"{where}.{unknown[0]} is not a known field; known fields: {sorted(names)}")
    return dict(d)


def check_int(where: str, v: Any, lo: int) -> None:
    """`v` is an int (not a bool) >= lo; else a ValueError naming `where`."""
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"{where} must be an integer >= {lo}, got {v!r}")


def check_number(where: str, v: Any, lo: float, hi: float = math.inf, lo_open: bool = False) -> None:
    """`v` is a finite int or float (not a bool) in [lo, hi], or (lo, hi] with `lo_open`; else a ValueError
    naming `where`."""
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    ok = ok and (v > lo if lo_open else v >= lo) and v <= hi
    if not ok:
        bound = (f"{'>' if lo_open else '>='} {lo:g}" if hi == math.inf
                 else f"in {'(' if lo_open else '['}{lo:g}, {hi:g}]")
        raise ValueError(f"{where} must be a number {bound}, got {v!r}")


@dataclass
class VocabLayout:
    """Where each kind of token lives in the one vocabulary shared by text and images.

    Ids below `text_size` are text (from sentencepiece or an HF tokenizer); the structural tokens sit
    between the text ids and `visual_start`; visual code k has id `visual_start + k`. The model uses
    this to tell image tokens from text tokens by id alone (MoD routability, FLOPs per kind).
    Defaults are Emu3's released vocabulary (151643 text ids, visual token 0 at id 151854).
    """

    text_size: int = 151643
    """Number of text ids: ids [0, text_size) are text."""
    pad_id: int = 151643
    """Padding (Emu3: `<|endoftext|>`); never trained on, skipped first by MoD."""
    bos_id: int = 151849
    """Beginning of sequence (Emu3: `<|extra_203|>`)."""
    eos_id: int = 151850
    """End of sequence (Emu3: `<|extra_204|>`)."""
    boi_id: int = 151851
    """`<|image start|>`."""
    eoi_id: int = 151852
    """`<|image end|>`."""
    img_id: int = 151853
    """`<|image token|>`: separates the "h*w" size text from the code rows."""
    eol_id: int = 151846
    """End of a row of visual codes (Emu3: `<|extra_200|>`)."""
    eof_id: int = 151847
    """End of the last row / frame (Emu3: `<|extra_201|>`)."""
    visual_start: int = 151854
    """Id of visual code 0."""
    visual_size: int = 32768
    """Codebook size of the image tokenizer."""
    vocab_size: int = 184622
    """Rows of the embedding and the LM head (>= visual_start + visual_size)."""

    STRUCTURAL = ("pad_id", "bos_id", "eos_id", "boi_id", "eoi_id", "img_id", "eol_id", "eof_id")

    def __post_init__(self) -> None:
        for name in ("text_size", "visual_start", "visual_size", "vocab_size"):
            check_int(f"vocab.{name}", getattr(self, name), 1)
        if self.visual_start < self.text_size:
            raise ValueError(
                f"vocab.visual_start ({self.visual_start}) must not overlap the text ids [0, {self.text_size})"
            )
        if self.vocab_size < self.visual_start + self.visual_size:
            raise ValueError(
                f"vocab.vocab_size ({self.vocab_size}) is smaller than visual_start + visual_size "
                f"({self.visual_start + self.visual_size})"
            )
        seen: dict[int, str] = {}
        for name in self.STRUCTURAL:
            tid = getattr(self, name)
            if not self.text_size <= tid < self.visual_start:
                raise ValueError(
                    f"vocab.{name} = {tid} must lie between the text ids and the visual ids "
                    f"[{self.text_size}, {self.visual_start})"
                )
            if tid in seen:
                raise ValueError(f"vocab.{name} = {tid} is the same id as vocab.{seen[tid]}")
            seen[tid] = name

    @property
    def visual_end(self) -> int:
        """One past the last visual id."""
        return self.visual_start + self.visual_size

    def structural_ids(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.STRUCTURAL}

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


@dataclass
class MoDConfig:
    """Task-aware Mixture-of-Depths (UniMoD).

    `capacity[layer][task]` in (0, 1] is the fraction of each sample's *routable* tokens that go
    through `layer` for samples of `task`: `{t2i: 0.2}` means "keep 20% of each t2i sample's routable
    (image) tokens, plus all its non-routable tokens" (prompt, structural tokens), i.e.
    ceil(0.2 * n_routable) per sample (`model.mod.routable_kept`), whatever the row length, padding
    or packing (a packed row's samples are counted one by one). A capacity < 1 therefore keeps at least
    one routable token of every sample that has any. A missing entry is 1.0, which makes the layer an
    ordinary full layer for that task (no router, no gate). Only layers with some capacity < 1 get a
    router bank. Semantics in full: the docstring of model/mod.py.
    """

    tasks: list[str] = field(default_factory=lambda: ["t2i", "mmu", "lm"])
    """Task names; a sequence's task id is its index in this list."""
    capacity: dict[int, dict[str, float]] = field(default_factory=dict)
    """Layer index -> {task: fraction of each sample's routable tokens kept, in (0, 1]}. YAML keys may be
    ints, "7" or inclusive ranges "16-31"."""
    routable: dict[str, str] = field(default_factory=dict)
    """Task -> which tokens may be skipped (the tokens a capacity is a fraction of): image | text | all.
    Missing tasks default to UniMoD's choice: t2i and mmu route image tokens, everything else routes all
    (non-structural) tokens. Structural tokens and padding are never routable."""
    aux_loss_weight: float = 0.01
    """Weight of the BCE loss that teaches router logits to predict top-k membership."""
    routing: str = "topk"
    """topk (training: top ceil(capacity * n_routable) per sample by router logit) | causal (sampling:
    route when the logit > 0)."""
    router_init_std: float = 1e-3
    """Small init keeps the gate 2*sigmoid(r) at ~1 so a dense checkpoint starts unchanged."""
    shared_router: bool = False
    """Ablation (UniMoD's "one shared router"): one score per token for every task instead of one per task.
    Capacities and routable tokens stay per task."""

    def __post_init__(self) -> None:
        if not self.tasks or len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"mod.tasks must be a non-empty list of distinct names, got {self.tasks}")
        if self.routing not in ROUTING_MODES:
            raise ValueError(f"mod.routing must be one of {ROUTING_MODES}, got {self.routing!r}")
        check_number("mod.aux_loss_weight", self.aux_loss_weight, 0.0)
        check_number("mod.router_init_std", self.router_init_std, 0.0, lo_open=True)
        self.capacity = _expand_capacity(self.capacity, self.tasks)
        routable = {t: ("image" if t in ("t2i", "mmu") else "all") for t in self.tasks}
        for task, kind in dict(self.routable).items():
            if task not in self.tasks:
                raise ValueError(f"mod.routable names task {task!r} which is not in mod.tasks {self.tasks}")
            if kind not in ROUTABLE_KINDS:
                raise ValueError(f"mod.routable.{task} must be one of {ROUTABLE_KINDS}, got {kind!r}")
            routable[task] = kind
        self.routable = routable

    def capacity_of(self, layer: int, task: str | int) -> float:
        name = self.tasks[task] if isinstance(task, int) else task
        return self.capacity.get(layer, {}).get(name, 1.0)

    def is_mod_layer(self, layer: int) -> bool:
        return any(c < 1.0 for c in self.capacity.get(layer, {}).values())

    def mod_layers(self) -> list[int]:
        return sorted(i for i in self.capacity if self.is_mod_layer(i))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["capacity"] = {str(k): dict(v) for k, v in sorted(self.capacity.items())}
        return d


def _expand_capacity(raw: Mapping[Any, Mapping[str, float]], tasks: list[str]) -> dict[int, dict[str, float]]:
    """Turn {"16-31": {...}, 3: {...}} into {layer: {task: capacity}}; later keys override earlier."""
    out: dict[int, dict[str, float]] = {}
    for key, per_task in dict(raw).items():
        layers = _parse_layer_key(key)
        if not isinstance(per_task, Mapping):
            raise ValueError(f"mod.capacity[{key!r}] must map task -> capacity, got {per_task!r}")
        for task, cap in per_task.items():
            if task not in tasks:
                raise ValueError(f"mod.capacity[{key!r}] names task {task!r} which is not in mod.tasks {tasks}")
            check_number(f"mod.capacity[{key!r}].{task}", cap, 0.0, 1.0, lo_open=True)
            for layer in layers:
                out.setdefault(layer, {})[task] = float(cap)
    return out


def _parse_layer_key(key: Any, where: str = "mod.capacity key") -> list[int]:
    if isinstance(key, bool):
        raise ValueError(f"{where} {key!r} is not a layer index or range")
    if isinstance(key, int):
        layers = [key]
    else:
        text = str(key).strip()
        try:
            if "-" in text:
                lo, hi = (int(p) for p in text.split("-", 1))
                if hi < lo:
                    raise ValueError
                layers = list(range(lo, hi + 1))
            else:
                layers = [int(text)]
        except ValueError:
            raise ValueError(
                f"{where} {key!r} is not a layer index (\"7\") or inclusive range (\"16-31\")"
            ) from None
    if layers[0] < 0:
        raise ValueError(f"{where} {key!r} names a negative layer")
    return layers


@dataclass
class MoEConfig:
    """Mixture-of-Experts MLPs (model/moe.py; the sparsity study's MoE adaptation of the dense MLPs).

    In each layer of `layers` the SwiGLU MLP of width F becomes `num_experts` experts of width F / E; every
    non-padding token runs the `shared_experts` (if any) and its `top_k` routed experts, each routed one weighted
    by the gate 2*sigmoid(logit). A config without
    layers (the default) builds no expert and behaves exactly as a dense model.
    """

    layers: list[int] = field(default_factory=list)
    """Decoder layers whose MLP is an MoE: layer indices or the mod.capacity key syntax ("7", "16-31"); a
    single key or a list of keys. Empty = no MoE layer."""
    num_experts: int = 8
    """E: experts per MoE layer; intermediate_size must be divisible by it (each expert is F / E wide)."""
    top_k: int = 2
    """k: routed experts each token runs (chosen by the router), in [1, num_experts - shared_experts]."""
    shared_experts: int = 0
    """S: of the E experts, this many run on every token (weight 1, no router logit: the sparsity study's
    shared experts); the router picks top_k of the other E - S. A token runs S + k experts. A dense checkpoint's
    most important neurons go to the shared experts (train/moe_init.py, model/moe.py `partition`)."""
    router: str = "task"
    """task: one block of E router logits per task of mod.tasks, each token reads its sequence's task's block
    (as the MoD router bank does) | shared: one block of E logits for every task."""
    balance_loss_weight: float = 0.01
    """Weight of the Switch/Mixtral load-balancing loss E_r * sum_e f_e * P_e over the E_r = E - S routed
    experts (f_e: fraction of routed token-slots sent to expert e, P_e: mean softmax router probability of e,
    over the layer's non-padding tokens), added to the forward's aux_loss. 0 = off."""
    capacity_factor: float | None = None
    """Token-slots a routed expert may run per layer call: ceil(capacity_factor * k * N / (E - S)) with N the layer's
    non-padding tokens; applies to training (routing "topk"); sampling (routing "causal") never drops, so
    cached decoding equals the full forward. None or 0 = no limit."""
    overflow: str = "drop"
    """What happens to a token-slot over its expert's capacity. drop (Switch Transformer): the token gets
    nothing from that expert; its other experts and the residual still apply."""

    def __post_init__(self) -> None:
        self.layers = _expand_moe_layers(self.layers)
        check_int("moe.num_experts", self.num_experts, 1)
        check_int("moe.top_k", self.top_k, 1)
        check_int("moe.shared_experts", self.shared_experts, 0)
        if self.shared_experts >= self.num_experts:
            raise ValueError(f"moe.shared_experts ({self.shared_experts}) must be below moe.num_experts "
                             f"({self.num_experts}): the router needs experts to choose from")
        if self.top_k > self.routed_experts:
            raise ValueError(f"moe.top_k ({self.top_k}) must not exceed moe.num_experts - moe.shared_experts "
                             f"({self.routed_experts}): the experts the router chooses from")
        if self.router not in MOE_ROUTERS:
            raise ValueError(f"moe.router must be one of {MOE_ROUTERS}, got {self.router!r}")
        check_number("moe.balance_loss_weight", self.balance_loss_weight, 0.0)
        if self.capacity_factor is not None:
            check_number("moe.capacity_factor", self.capacity_factor, 0.0)
            if self.capacity_factor == 0:
                self.capacity_factor = None  # 0 means "no limit", spelt one way from here on
        if self.overflow not in MOE_OVERFLOW:
            raise ValueError(f"moe.overflow must be one of {MOE_OVERFLOW}, got {self.overflow!r}")

    @property
    def routed_experts(self) -> int:
        """E - S: the experts the router chooses among (the router's logits per block)."""
        return self.num_experts - self.shared_experts

    @property
    def active_experts(self) -> int:
        """S + k: the experts one token runs."""
        return self.shared_experts + self.top_k

    def is_moe_layer(self, layer: int) -> bool:
        return layer in self.layers

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _expand_moe_layers(raw: Any) -> list[int]:
    """[3, "16-18"] or "16-18" -> [3, 16, 17, 18] (sorted, distinct)."""
    keys = [] if raw is None else raw if isinstance(raw, (list, tuple)) else [raw]
    out: set[int] = set()
    for key in keys:
        out.update(_parse_layer_key(key, "moe.layers entry"))
    return sorted(out)


@dataclass
class ModelConfig:
    """Shapes of an Emu3/Llama decoder plus its vocabulary layout and MoD plan."""

    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    rms_norm_eps: float = 1e-5
    rope_theta: float = 1e6
    max_position_embeddings: int = 9216
    initializer_range: float = 0.02
    vocab: VocabLayout = field(default_factory=VocabLayout)
    mod: MoDConfig = field(default_factory=MoDConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    """Mixture-of-Experts MLPs; the default has no MoE layer."""
    preset: str | None = None
    """Name of the preset this config came from (informational)."""

    def __post_init__(self) -> None:
        if isinstance(self.vocab, Mapping):
            self.vocab = VocabLayout(**known_fields(VocabLayout, self.vocab, "model.vocab"))
        if isinstance(self.mod, Mapping):
            self.mod = MoDConfig(**known_fields(MoDConfig, self.mod, "model.mod"))
        if isinstance(self.moe, Mapping):
            self.moe = MoEConfig(**known_fields(MoEConfig, self.moe, "model.moe"))
        for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "max_position_embeddings"):
            check_int(f"model.{name}", getattr(self, name), 1)
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"model.hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads})"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"model.num_key_value_heads ({self.num_key_value_heads}) must divide num_attention_heads "
                f"({self.num_attention_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"model.hidden_size / num_attention_heads = {self.head_dim} must be even for RoPE")
        check_number("model.rms_norm_eps", self.rms_norm_eps, 0.0, lo_open=True)
        check_number("model.rope_theta", self.rope_theta, 0.0, lo_open=True)
        bad = [i for i in self.mod.capacity if i >= self.num_hidden_layers]
        if bad:
            raise ValueError(
                f"model.mod.capacity names layer {bad[0]} but the model has {self.num_hidden_layers} layers"
            )
        bad = [i for i in self.moe.layers if i >= self.num_hidden_layers]
        if bad:
            raise ValueError(f"model.moe.layers names layer {bad[0]} but the model has {self.num_hidden_layers} layers")
        if self.moe.layers and self.intermediate_size % self.moe.num_experts:
            raise ValueError(
                f"model.moe.num_experts ({self.moe.num_experts}) must divide model.intermediate_size "
                f"({self.intermediate_size}): every expert is intermediate_size / num_experts neurons wide"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def vocab_size(self) -> int:
        return self.vocab.vocab_size

    @property
    def num_tasks(self) -> int:
        return len(self.mod.tasks)

    # ----- construction -------------------------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "ModelConfig":
        if name not in PRESETS:
            raise ValueError(f"model.preset {name!r} is unknown; choose one of {sorted(PRESETS)}")
        base = dict(PRESETS[name])
        base["preset"] = name
        for key, value in overrides.items():
            # Nested sections merge field by field, so `vocab: {visual_size: 512}` keeps the rest.
            if key in ("vocab", "mod", "moe") and isinstance(value, Mapping) and isinstance(base.get(key), Mapping):
                base[key] = {**base[key], **value}
            else:
                base[key] = value
        return cls(**known_fields(cls, base, "model"))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
        """Build from the `model:` section of a YAML config: a `preset` key plus overrides, and optionally a
        `mod_plan` file whose `mod:` fields override the section's own (`read_mod_plan`)."""
        if not isinstance(d, Mapping):
            raise ValueError(f"model config must be a mapping, got {type(d).__name__}")
        d = dict(d)
        if "mod_plan" in d:
            plan_path = d.pop("mod_plan")
            try:
                plan = read_mod_plan(plan_path)
            except FileNotFoundError:
                raise ValueError(f"model.mod_plan: {plan_path} does not exist") from None
            d["mod"] = {**(d.get("mod") or {}), **plan}
        preset = d.pop("preset", None)
        if preset is not None:
            return cls.from_preset(preset, **d)
        return cls(**known_fields(cls, d, "model"))

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["vocab"] = self.vocab.to_dict()
        d["mod"] = self.mod.to_dict()
        d["moe"] = self.moe.to_dict()
        return d

    def replace(self, **changes: Any) -> "ModelConfig":
        d = self.to_dict()
        d.pop("preset")
        for key, value in changes.items():
            if key in ("vocab", "mod", "moe") and isinstance(value, Mapping):
                d[key] = {**d[key], **value}
            else:
                d[key] = value
        return ModelConfig(**d, preset=self.preset)


def read_mod_plan(path: str | Path) -> dict[str, Any]:
    """The `mod:` mapping of a MoD plan file (`mod_plan.yaml`, written by `python -m tools.analyze`), checked:
    the file holds exactly `{model: {mod: {...}}}` and optionally `plan: {...}` (how the plan was measured,
    a record for people; never read back), and MoDConfig accepts it. FileNotFoundError when missing."""
    import yaml

    doc = yaml.safe_load(Path(path).read_text())
    if not isinstance(doc, dict) or set(doc) - {"plan"} != {"model"} or not isinstance(doc["model"], dict) \
            or set(doc["model"]) != {"mod"} or not isinstance(doc["model"]["mod"], dict) \
            or not isinstance(doc.get("plan", {}), dict):
        raise ValueError(f"{path}: a MoD plan file must hold exactly a model: {{mod: {{...}}}} mapping "
                         f"(and optionally a plan: {{...}} record)")
    MoDConfig(**known_fields(MoDConfig, doc["model"]["mod"], f"{path}: mod"))
    return doc["model"]["mod"]


# A small vocabulary for the tiny presets: 256 text ids, the 8 structural ids, a 512-code codebook.
# Training on real data replaces it with the layout written by the data pipeline (its manifest).
_SMALL_VOCAB = dict(
    text_size=256, pad_id=256, bos_id=257, eos_id=258, boi_id=259, eoi_id=260, img_id=261, eol_id=262,
    eof_id=263, visual_start=264, visual_size=512, vocab_size=776,
)

PRESETS: dict[str, dict[str, Any]] = {
    # Tiny: every unit test and the CPU smoke run.
    "debug": dict(
        hidden_size=64, intermediate_size=176, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=2048, rope_theta=1e4, vocab=_SMALL_VOCAB,
    ),
    # Trains on a 2-core CPU in minutes on the demo data (about 8M parameters without embeddings).
    "demo": dict(
        hidden_size=256, intermediate_size=704, num_hidden_layers=8, num_attention_heads=8,
        num_key_value_heads=4, max_position_embeddings=4096, rope_theta=1e4, vocab=_SMALL_VOCAB,
    ),
    # About 1B parameters, for single-GPU throughput and MFU measurements.
    "emu3-1b": dict(
        hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=16,
        num_key_value_heads=4, max_position_embeddings=9216, rope_theta=1e6,
    ),
    # Exactly transformers' Emu3TextConfig() defaults (Emu3-8B).
    "emu3-8b": dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, max_position_embeddings=9216, rope_theta=1e6, rms_norm_eps=1e-5,
    ),
}
