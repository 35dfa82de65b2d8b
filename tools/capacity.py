"""Capacity planner: per-GPU memory, pipeline partition, FLOPs and step time of a run, without a GPU.

    python -m tools.capacity --config train/configs/emu3_8b_unimod.yaml --nodes 4 --gpus-per-node 8
    python -m tools.capacity --preset emu3-8b --set data.seq_len=4096 --set parallel.mode=pipeline \
        --set parallel.pipeline_stages=4 --set optim.grad_accum=16 --nodes 2 --gpus-per-node 8
    python train/main.py --config X.yaml --plan --nodes N --gpus-per-node G [--gpu-memory-gib M]   (the same)

`plan(cfg, nodes=..., gpus_per_node=...)` takes the run's `RunConfig` (train/config.py): model, parallel mode
and stages, micro-batch, sequence length, gradient accumulation, precision, activation checkpointing and
the task mix (`data.tasks` weights as shares of micro-batches) all come from it, in its words; the arguments
are what a run config cannot know: the cluster, the GPU memory, optimizer offload (a DeepSpeed JSON setting),
the MFU to assume and the share of routable tokens per row. `parallel.mode: zero` is planned as ZeRO-3 (the
stage the Emu3-scale configs use); `parallel.precision: auto` as bf16 (what it resolves to on a GPU).

Parameters are counted exactly on a meta-device `UnifiedTransformer` (routers included, no memory
used); FLOPs come from `model/flops.py`; the pipeline partition is DeepSpeed's own
`partition_method="parameters"` algorithm (`deepspeed.runtime.utils.partition_balanced`) on the
list [embedding, layer 0, ..., layer L-1, final norm + LM head], so what is printed is what
`PipelineModule` builds from that list.

Memory model, per GPU (ZeRO paper, Rajbhandari et al. 2020, section 3.1: mixed-precision Adam keeps
2 + 2 + K bytes per parameter with K = 12):
- bf16/fp16: parameters 2 B, gradients 2 B, optimizer states 12 B (fp32 master copy, Adam m and v);
  fp32: 4 + 4 + 8 B (the parameters are their own master copy).
- ZeRO-3 (data parallel over all GPUs): all three are sharded over the data-parallel ranks, plus the
  working set of gathered 16-bit parameters: the largest pair of consecutive modules in execution
  order (the running one and the prefetched next one), e.g. the last layer and the LM head.
- Pipeline + ZeRO-1: a stage keeps its full parameters and gradients and shards only optimizer states
  over the data-parallel ranks of that stage. The busiest stage is reported.
- `offload_optimizer` moves the optimizer states to host memory (reported per node).
- Activations per micro-batch (B sequences of S tokens, hidden D, activation bytes a): with
  activation checkpointing every layer keeps its input (S*B*D*a) plus one layer's full activations
  during its recomputation; without it every layer keeps its full activations, a Korthikanti et al.
  2022-style count for this block with flash/efficient attention (no S^2 score matrix):
  tokens*B*(6D + 2*D_kv + 4F)*a (norm inputs and outputs, q/k/v, attention output, SwiGLU gate, up,
  SiLU and product). A MoD layer runs on P = K tokens instead of S (see "Rows" below), plus its
  full-length residual (S*B*D*a); the task of the mix with the largest P sets the memory.
- LM head + loss, on the last pipeline stage only: the head runs in chunks and never holds the S*B*V fp32
  logits (model/loss.py `linear_cross_entropy`); its backward holds one chunk of fp32 logits (as large as the
  hidden states) and its cast, an fp32 input-gradient accumulator, and under ZeRO-3 the head's whole weight
  gradient before it is reduce-scattered (`head_loss_bytes`). Full logits would be 7.04 GiB for one
  10,240-token Emu3-8B micro-batch, and their gradient as much again.
- 1F1B pipeline: stage s holds min(stages - s, grad_accum) micro-batches of activations in flight.
Not counted: CUDA context and NCCL buffers (~1-2 GiB), allocator fragmentation, ZeRO bucket buffers,
temporary tensors of the loss. Leave that much headroom.

Rows (an assumption, since the planner sees no data): every row is one sample of S tokens without padding,
of which `routable_fraction[task]` x S (rounded down) are tokens its task may skip. A MoD layer keeps the
S - r non-routable tokens and `model.mod.routable_kept(capacity, r)` routable ones (the model's rule).
The default fraction follows the task's `mod.routable` kind: "image" 0.9 (an Emu3 t2i or mmu sample at
4096 tokens is ~90% visual codes: a 64x64 code grid with its EOL tokens, a short caption or question),
"all" 1.0 (plain text: every token but a couple of structural ones), "text" 0.1 (the text of an image
sample). Pass measured fractions (`data.inspect` counts a dataset's token kinds) for a real plan. Without
padding the dense baseline of a row is the dense model on it, so the saving shown is MoD's own.

FLOPs per optimizer step: global batch = micro_batch * grad_accum * data-parallel size sequences,
split over tasks by `data.tasks` (as shares of micro-batches), counted by `model.flops.step_flops`
with recompute when activation checkpointing is on. The step time assumes the hardware sustains
`assumed_mfu` of its peak on those FLOPs (recomputation included, so strictly a hardware FLOPs
utilisation): time = FLOPs / (GPUs * peak * assumed_mfu).
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, field
from typing import Mapping, Sequence

from model.config import ModelConfig
from model.flops import RowTokens, layer_tokens, step_flops
from model.loss import head_loss_bytes
from train.config import RunConfig, apply_overrides, read_config_doc, resolve_precision

GiB = 1024**3
H100_PEAK_FLOPS = 989e12  # dense bf16, SXM: the default when neither the caller nor logging.peak_tflops sets one
# Bytes per parameter: (16-bit or fp32 parameters, gradients, optimizer states) per the ZeRO paper.
_STATE_BYTES = {"bf16": (2, 2, 12), "fp16": (2, 2, 12), "fp32": (4, 4, 8)}
_ACT_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
# Share of a row's tokens its task may skip, by the task's `mod.routable` kind (module docstring, "Rows").
DEFAULT_ROUTABLE_FRACTION = {"image": 0.9, "all": 1.0, "text": 0.1}


@dataclass(frozen=True)
class StagePlan:
    """One pipeline stage (or, under ZeRO-3, the single "stage" holding the whole model)."""

    items: tuple[str, ...]
    """Names of the modules in this stage: "embed", "layer 0" ... "layer L-1", "norm+head"."""
    params: int
    """Parameters of those modules."""
    memory: dict[str, float]
    """Bytes per GPU of this stage by term."""

    @property
    def total_bytes(self) -> float:
        return sum(self.memory.values())

    @property
    def describe(self) -> str:
        """"embed + layers 0-5" style summary of `items`."""
        layers = [int(n.split()[1]) for n in self.items if n.startswith("layer ")]
        parts = [n for n in self.items if not n.startswith("layer ")]
        if layers:
            span = f"layer {layers[0]}" if len(layers) == 1 else f"layers {layers[0]}-{layers[-1]}"
            parts.insert(1 if "embed" in parts else 0, span)
        return " + ".join(parts)


@dataclass(frozen=True)
class CapacityPlan:
    """Every number the planner computed; `format_plan` turns it into a table."""

    model: str
    """Preset name (or "custom") and shape summary."""
    mode: str
    """parallel.mode: zero (planned as ZeRO-3) | pipeline (ZeRO-1 within each stage)."""
    nodes: int
    gpus_per_node: int
    pipeline_stages: int
    data_parallel: int
    """Data-parallel ranks (all GPUs under ZeRO-3, GPUs / stages under the pipeline)."""
    micro_batch_size: int
    seq_len: int
    grad_accum: int
    precision: str
    activation_checkpointing: bool
    offload_optimizer: bool
    task_mix: dict[str, float]
    """Normalised share of micro-batches per task."""
    params_total: int
    """All parameters, routers included (meta-device count)."""
    params_dense: int
    """Parameters without MoD routers (the HF Emu3 checkpoint's count)."""
    params_per_item: dict[str, int]
    """Parameters of every pipeline item (embed, each layer, norm+head)."""
    stages: tuple[StagePlan, ...]
    """Per stage: its modules, parameters and per-GPU memory; one entry under ZeRO-3."""
    worst_stage: int
    """Index of the stage with the most memory per GPU."""
    memory_per_gpu: dict[str, float]
    """Bytes per GPU by term, of the worst stage."""
    host_memory_per_node: float
    """Bytes of offloaded optimizer states per node (0 without offload)."""
    gpu_memory_gib: float
    routable_tokens: dict[str, int]
    """Task -> routable tokens assumed per row of S tokens (`routable_fraction` x S, rounded down)."""
    mod_tokens: dict[str, list[int]]
    """Task -> tokens each layer runs on (P per MoD layer, S elsewhere)."""
    global_batch: int
    """Sequences per optimizer step."""
    tokens_per_step: int
    flops_dense: float
    """Training FLOPs per step with every layer dense (recompute included when checkpointing)."""
    flops_mod: float
    """Training FLOPs per step as run with MoD."""
    flops_per_task: dict[str, tuple[float, float]]
    """Task -> (MoD, dense) FLOPs of its share of the step."""
    assumed_mfu: float
    peak_flops_per_gpu: float
    step_time_dense_s: float
    step_time_mod_s: float
    tokens_per_s_dense: float
    tokens_per_s_mod: float
    notes: list[str] = field(default_factory=list)

    @property
    def num_gpus(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def total_bytes_per_gpu(self) -> float:
        return sum(self.memory_per_gpu.values())

    @property
    def fits(self) -> bool:
        return self.total_bytes_per_gpu <= self.gpu_memory_gib * GiB

    @property
    def biggest_term(self) -> tuple[str, float]:
        return max(self.memory_per_gpu.items(), key=lambda kv: kv[1])

    @property
    def mod_saved_pct(self) -> float:
        return 100.0 * (1.0 - self.flops_mod / self.flops_dense)


# ----- parameters --------------------------------------------------------------------------------------
def count_params(model_cfg: ModelConfig) -> dict[str, int]:
    """Parameters per pipeline item, counted on a meta-device model (exact, no memory allocated)."""
    import torch

    from model.transformer import UnifiedTransformer

    with torch.device("meta"):
        net = UnifiedTransformer(model_cfg)

    def n(module: torch.nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    items = {"embed": n(net.model.embed_tokens)}
    for i, layer in enumerate(net.model.layers):
        items[f"layer {i}"] = n(layer)
    items["norm+head"] = n(net.model.norm) + n(net.lm_head)
    assert sum(items.values()) == net.num_parameters(), "pipeline items must cover every parameter once"
    return items


def partition(weights: Sequence[int], num_stages: int) -> list[int]:
    """Stage boundaries (len num_stages + 1) as DeepSpeed's partition_method="parameters" draws them."""
    from deepspeed.runtime.utils import partition_balanced

    return [int(p) for p in partition_balanced(weights=list(weights), num_parts=num_stages)]


# ----- activations -------------------------------------------------------------------------------------
def _row(model_cfg: ModelConfig, task: str, seq_len: int, fraction: float) -> RowTokens:
    """The assumed row of `task`: one sample of seq_len tokens, floor(fraction * seq_len) of them routable."""
    return RowTokens.single(model_cfg.mod.tasks.index(task), seq_len, routable=math.floor(fraction * seq_len + 1e-9))


def _layer_full_bytes(model_cfg: ModelConfig, tokens: int, seq_len: int, batch: int, a: int) -> float:
    """Activations one layer keeps for backward without checkpointing (see module docstring)."""
    d, f = model_cfg.hidden_size, model_cfg.intermediate_size
    d_kv = model_cfg.num_key_value_heads * model_cfg.head_dim
    body = tokens * batch * (6 * d + 2 * d_kv + 4 * f) * a
    # A MoD layer also keeps its gathered input and scatters back into the full-length residual.
    return body + (seq_len * batch * d * a if tokens < seq_len else 0)


def _activation_bytes(model_cfg: ModelConfig, layers: Sequence[int], layer_tokens: Sequence[int], seq_len: int,
                      batch: int, a: int, checkpointing: bool) -> float:
    """One micro-batch's activations held by the given layers."""
    if not layers:
        return 0.0
    full = [_layer_full_bytes(model_cfg, layer_tokens[i], seq_len, batch, a) for i in layers]
    if checkpointing:
        return len(layers) * seq_len * batch * model_cfg.hidden_size * a + max(full)
    return float(sum(full))


# ----- the plan ----------------------------------------------------------------------------------------
def plan(cfg: RunConfig, *, nodes: int, gpus_per_node: int, gpu_memory_gib: float = 80.0,
         offload_optimizer: bool = False, assumed_mfu: float = 0.4, peak_flops_per_gpu: float | None = None,
         routable_fraction: Mapping[str, float] | None = None) -> CapacityPlan:
    """Memory, partition, FLOPs and step time of training run `cfg` on `nodes` x `gpus_per_node` GPUs of
    `gpu_memory_gib` each (see module docstring).

    `peak_flops_per_gpu` defaults to `cfg.logging.peak_tflops`, else the H100 SXM dense bf16 peak.
    `routable_fraction` maps tasks to the share of a row's tokens they may skip (missing tasks:
    `DEFAULT_ROUTABLE_FRACTION` of their `mod.routable` kind; see "Rows" in the module docstring).
    """
    model_cfg = cfg.model
    mode, pipeline_stages = cfg.parallel.mode, cfg.parallel.pipeline_stages
    micro_batch_size, seq_len, grad_accum = cfg.data.micro_batch_size, cfg.data.seq_len, cfg.optim.grad_accum
    precision = resolve_precision(cfg.parallel.precision, on_gpu=True)
    activation_checkpointing = cfg.parallel.activation_checkpointing
    if peak_flops_per_gpu is None:
        peak_flops_per_gpu = cfg.logging.peak_tflops * 1e12 if cfg.logging.peak_tflops else H100_PEAK_FLOPS
    for name, value in (("nodes", nodes), ("gpus_per_node", gpus_per_node)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"plan.{name} must be a positive integer, got {value!r}")
    if not gpu_memory_gib > 0:
        raise ValueError(f"plan.gpu_memory_gib must be > 0, got {gpu_memory_gib!r}")
    if not 0 < assumed_mfu <= 1:
        raise ValueError(f"plan.assumed_mfu must be in (0, 1], got {assumed_mfu!r}")
    if not peak_flops_per_gpu > 0:
        raise ValueError(f"plan.peak_flops_per_gpu must be > 0, got {peak_flops_per_gpu!r}")
    world = nodes * gpus_per_node
    if world % pipeline_stages:
        raise ValueError(f"parallel.pipeline_stages ({pipeline_stages}) must divide the {world} GPUs")
    mix = _normalise_mix(model_cfg, cfg.data.tasks)
    fractions = _routable_fractions(model_cfg, routable_fraction)
    rows = {t: _row(model_cfg, t, seq_len, fractions[t]) for t in mix}
    dp = world // pipeline_stages

    items = count_params(model_cfg)
    names, weights = list(items), list(items.values())
    params_total = sum(weights)
    params_dense = params_total - _router_params(model_cfg)

    # Memory: the task of the mix with the most tokens per layer sets the activations.
    a = _ACT_BYTES[precision]
    b_param, b_grad, b_opt = _STATE_BYTES[precision]
    mod_tokens = {t: [n for n, _ in layer_tokens(model_cfg, [rows[t]])] for t in mix}
    worst_task = max(mix, key=lambda t: sum(mod_tokens[t]))
    layer_of = {n: int(n.split()[1]) for n in names if n.startswith("layer ")}

    if mode == "zero":
        bounds = [0, len(names)]
    else:
        bounds = partition(weights, pipeline_stages)
    stages = []
    for s in range(len(bounds) - 1):
        stage_names = names[bounds[s]:bounds[s + 1]]
        p = sum(items[n] for n in stage_names)
        layers = [layer_of[n] for n in stage_names if n in layer_of]
        acts = _activation_bytes(model_cfg, layers, mod_tokens[worst_task], seq_len, micro_batch_size, a,
                                 activation_checkpointing)
        memory: dict[str, float] = {}
        if mode == "zero":
            # Running module + prefetched next one, in execution order (forward; backward mirrors it).
            gathered = max(weights[i] + weights[i + 1] for i in range(len(weights) - 1))
            memory["parameters"] = b_param * p / dp
            memory["gradients"] = b_grad * p / dp
            memory["optimizer states"] = 0.0 if offload_optimizer else b_opt * p / dp
            memory["gathered parameters"] = 2.0 * gathered if precision != "fp32" else 4.0 * gathered
            memory["activations"] = acts
        else:
            in_flight = min(pipeline_stages - s, grad_accum)
            memory["parameters"] = float(b_param * p)
            memory["gradients"] = float(b_grad * p)
            memory["optimizer states"] = 0.0 if offload_optimizer else b_opt * p / dp
            memory["activations"] = in_flight * acts
        memory["LM head + loss"] = float(head_loss_bytes(seq_len * micro_batch_size, model_cfg.hidden_size,
                                                         model_cfg.vocab_size, a, weight_grad=mode == "zero")
                                         ) if "norm+head" in stage_names else 0.0
        stages.append(StagePlan(items=tuple(stage_names), params=p, memory=memory))
    worst = max(range(len(stages)), key=lambda i: stages[i].total_bytes)
    # Offloaded optimizer states: every GPU's shard lives in its node's host memory.
    host = (b_opt * max(st.params for st in stages) / dp) * gpus_per_node if offload_optimizer else 0.0

    # FLOPs: one micro-batch per task, scaled by that task's share of the step's micro-batches.
    global_batch = micro_batch_size * grad_accum * dp
    microbatches = grad_accum * dp
    per_task: dict[str, tuple[float, float]] = {}
    for task, share in mix.items():
        one = step_flops(model_cfg, [[rows[task]] * micro_batch_size], recompute=activation_checkpointing)
        per_task[task] = (share * microbatches * one.actual, share * microbatches * one.dense)
    flops_mod = sum(v[0] for v in per_task.values())
    flops_dense = sum(v[1] for v in per_task.values())
    rate = world * peak_flops_per_gpu * assumed_mfu
    tokens = global_batch * seq_len

    notes = []
    if mode == "pipeline":
        bubble = (pipeline_stages - 1) / (grad_accum + pipeline_stages - 1)
        notes.append(f"1F1B pipeline bubble: {100 * bubble:.0f}% of each step is idle; the assumed MFU must "
                     f"include it (step times above do not add it)")
    if mode == "pipeline" and grad_accum < pipeline_stages:
        notes.append(f"grad_accum ({grad_accum}) < pipeline stages ({pipeline_stages}): the pipeline bubble "
                     f"dominates; use grad_accum >= 4 x stages")

    return CapacityPlan(
        model=f"{model_cfg.preset or 'custom'} (L={model_cfg.num_hidden_layers}, D={model_cfg.hidden_size}, "
              f"F={model_cfg.intermediate_size}, H={model_cfg.num_attention_heads}/{model_cfg.num_key_value_heads}, "
              f"V={model_cfg.vocab_size})",
        mode=mode, nodes=nodes, gpus_per_node=gpus_per_node, pipeline_stages=pipeline_stages, data_parallel=dp,
        micro_batch_size=micro_batch_size, seq_len=seq_len, grad_accum=grad_accum, precision=precision,
        activation_checkpointing=activation_checkpointing, offload_optimizer=offload_optimizer, task_mix=mix,
        params_total=params_total, params_dense=params_dense, params_per_item=items, stages=tuple(stages),
        worst_stage=worst, memory_per_gpu=dict(stages[worst].memory), host_memory_per_node=host,
        gpu_memory_gib=float(gpu_memory_gib), routable_tokens={t: rows[t].documents[0].routable for t in mix},
        mod_tokens=mod_tokens, global_batch=global_batch,
        tokens_per_step=tokens, flops_dense=flops_dense, flops_mod=flops_mod, flops_per_task=per_task,
        assumed_mfu=assumed_mfu, peak_flops_per_gpu=peak_flops_per_gpu,
        step_time_dense_s=flops_dense / rate, step_time_mod_s=flops_mod / rate,
        tokens_per_s_dense=tokens * rate / flops_dense, tokens_per_s_mod=tokens * rate / flops_mod, notes=notes,
    )


def _normalise_mix(model_cfg: ModelConfig, weights: Mapping[str, float]) -> dict[str, float]:
    """data.tasks weights -> shares of micro-batches (LoaderConfig has checked they are positive)."""
    tasks = model_cfg.mod.tasks
    for task in weights:
        if task not in tasks:
            raise ValueError(f"data.tasks names task {task!r} which is not in model.mod.tasks {tasks}")
    total = float(sum(weights.values()))
    return {t: w / total for t, w in weights.items()}


def _routable_fractions(model_cfg: ModelConfig, given: Mapping[str, float] | None) -> dict[str, float]:
    mod = model_cfg.mod
    out = {t: DEFAULT_ROUTABLE_FRACTION[mod.routable[t]] for t in mod.tasks}
    for task, frac in dict(given or {}).items():
        if task not in mod.tasks:
            raise ValueError(f"plan.routable_fraction names task {task!r} which is not in mod.tasks {mod.tasks}")
        if isinstance(frac, bool) or not isinstance(frac, (int, float)) or not 0.0 <= frac <= 1.0:
            raise ValueError(f"plan.routable_fraction.{task} must be a number in [0, 1], got {frac!r}")
        out[task] = float(frac)
    return out


def _router_params(model_cfg: ModelConfig) -> int:
    # A router bank is Linear(D, num_tasks) without bias in every MoD layer (model/mod.py).
    return len(model_cfg.mod.mod_layers()) * model_cfg.hidden_size * model_cfg.num_tasks


# ----- the table -----------------------------------------------------------------------------------------
def _gib(x: float) -> str:
    return f"{x / GiB:8.2f} GiB"


def _count(x: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3f}{unit}"
    return f"{x:.0f}"


def _vs_dense(saved_pct: float) -> str:
    return f"{saved_pct:.1f}% fewer than dense" if saved_pct >= 0 else f"{-saved_pct:.1f}% more than dense"


def _largest_layer(p: CapacityPlan) -> int:
    return max(v for k, v in p.params_per_item.items() if k.startswith("layer "))


def format_plan(p: CapacityPlan) -> str:
    """An aligned text table of the plan (memory in GiB), ending with FITS or DOES NOT FIT."""
    w = 38
    row = lambda k, v: f"  {k:<{w}} {v}"  # noqa: E731 (a local formatter keeps the table aligned)
    out = ["== Model", row("model", p.model),
           row("parameters (routers included)", f"{p.params_total:,} ({_count(p.params_total)})"),
           row("parameters (dense, no routers)", f"{p.params_dense:,} ({_count(p.params_dense)})"),
           row("embedding / largest layer / norm+head",
               f"{_count(p.params_per_item['embed'])} / {_count(_largest_layer(p))} / "
               f"{_count(p.params_per_item['norm+head'])}")]
    stage_note = f"{p.pipeline_stages} pipeline stages x " if p.mode == "pipeline" else ""
    out += ["", "== Layout",
            row("GPUs", f"{p.num_gpus} = {p.nodes} node(s) x {p.gpus_per_node}"),
            row("mode", f"{p.mode} ({'ZeRO-3, ' if p.mode == 'zero' else ''}{stage_note}{p.data_parallel} "
                        f"data-parallel ranks)"
                        + (", optimizer offloaded to CPU" if p.offload_optimizer else "")),
            row("micro-batch x seq_len x grad_accum", f"{p.micro_batch_size} x {p.seq_len} x {p.grad_accum}"),
            row("global batch", f"{p.global_batch} sequences, {p.tokens_per_step:,} tokens"),
            row("precision / activation checkpointing", f"{p.precision} / {'on' if p.activation_checkpointing else 'off'}"),
            row("task mix (share of micro-batches)", ", ".join(f"{t} {s:.2f}" for t, s in p.task_mix.items())),
            row("routable tokens per row (assumed)", ", ".join(f"{t} {n}" for t, n in p.routable_tokens.items()))]
    for task, toks in p.mod_tokens.items():
        if any(n < p.seq_len for n in toks):
            routed = [i for i, n in enumerate(toks) if n < p.seq_len]
            out.append(row(f"MoD tokens per layer ({task})",
                           f"{min(toks)} of {p.seq_len} in layers {routed[0]}-{routed[-1]} ({len(routed)} layers)"))

    stage = f" (stage {p.worst_stage}, the fullest)" if p.mode == "pipeline" else ""
    out += ["", f"== Memory per GPU{stage}"]
    for term, nbytes in p.memory_per_gpu.items():
        out.append(row(term, _gib(nbytes)))
    out.append(row("total", f"{_gib(p.total_bytes_per_gpu)} of {p.gpu_memory_gib:.1f} GiB"))
    if p.offload_optimizer:
        out.append(row("host memory per node (optimizer)", _gib(p.host_memory_per_node)))

    out += ["", "== Pipeline partition (DeepSpeed partition_method='parameters')"]
    if p.mode == "pipeline":
        for i, st in enumerate(p.stages):
            out.append(row(f"stage {i}", f"{_count(st.params):>9} params  {_gib(st.total_bytes)}  {st.describe}"))
    else:
        out.append(row("none", "ZeRO-3 shards the whole model over all GPUs"))

    out += ["", "== FLOPs per optimizer step" + (" (recompute included)" if p.activation_checkpointing else ""),
            row("dense", f"{p.flops_dense:.3e}"),
            row("MoD", f"{p.flops_mod:.3e} ({_vs_dense(p.mod_saved_pct)})")]
    for task, (mod_f, dense_f) in p.flops_per_task.items():
        saved = 100.0 * (1 - mod_f / dense_f) if dense_f else 0.0
        out.append(row(f"  {task}", f"MoD {mod_f:.3e} / dense {dense_f:.3e} ({_vs_dense(saved)})"))
    out += ["", f"== Step time at {100 * p.assumed_mfu:.0f}% MFU of {p.peak_flops_per_gpu / 1e12:.0f} TFLOP/s per GPU",
            row("dense", f"{p.step_time_dense_s:9.3f} s/step  {p.tokens_per_s_dense:12,.0f} tokens/s"),
            row("MoD", f"{p.step_time_mod_s:9.3f} s/step  {p.tokens_per_s_mod:12,.0f} tokens/s")]
    for note in p.notes:
        out.append(f"  note: {note}")
    out.append("")
    if p.fits:
        out.append(f"FITS: {p.total_bytes_per_gpu / GiB:.2f} GiB of {p.gpu_memory_gib:.1f} GiB per GPU "
                   f"(plus ~1-2 GiB CUDA context and fragmentation, not counted)")
    else:
        term, nbytes = p.biggest_term
        out.append(f"DOES NOT FIT: {p.total_bytes_per_gpu / GiB:.2f} GiB needed > {p.gpu_memory_gib:.1f} GiB per GPU; "
                   f"biggest term: {term} ({nbytes / GiB:.2f} GiB)")
    return "\n".join(out)


# ----- command line ------------------------------------------------------------------------------------------
def add_plan_args(parser: argparse.ArgumentParser) -> None:
    """What a run config cannot know: the cluster and hardware flags of `--plan`."""
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--gpu-memory-gib", type=float, default=80.0)
    parser.add_argument("--assumed-mfu", type=float, default=0.4)
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="dense bf16 peak per GPU (default: logging.peak_tflops, else H100 SXM: 989)")


def _parse_fractions(text: str) -> dict[str, float]:
    out = {}
    for item in text.split(","):
        task, sep, share = item.partition("=")
        try:
            if not sep:
                raise ValueError
            out[task.strip()] = float(share)
        except ValueError:
            raise argparse.ArgumentTypeError(f"item {item!r} is not task=fraction") from None
    return out


def run_config(config: str | None, preset: str, overrides: Sequence[str] = ()) -> RunConfig:
    """The run to plan: a run YAML as train/main.py reads it, or a preset. A preset (or a YAML with only a
    `model:` section) gets the planner's stand-alone defaults: equal task shares, seq_len 4096 (or the model's
    positions, if fewer), activation checkpointing on, and a dataset placeholder, since the planner reads no
    data. `--set` overrides apply last."""
    doc = read_config_doc(config) if config else {"model": {"preset": preset}}
    where = config or f"--preset {preset}"
    if "data" not in doc:
        try:
            model = ModelConfig.from_dict(doc.get("model") or {})
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        doc["data"] = {"dataset_dir": "(not read by the capacity planner)", "tasks": {t: 1.0 for t in model.mod.tasks},
                       "seq_len": min(4096, model.max_position_embeddings)}
        doc.setdefault("parallel", {}).setdefault("activation_checkpointing", True)
    return RunConfig.from_dict(apply_overrides(doc, list(overrides)), where=where)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.capacity", description=__doc__.split("\n")[0])
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--preset", default="emu3-8b", help="model preset (debug, demo, emu3-1b, emu3-8b)")
    src.add_argument("--config", help="run YAML (train/main.py's), or a YAML with only a model: section")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="override a run config value as train/main.py does, e.g. --set data.seq_len=4096, "
                             "--set parallel.mode=pipeline, --set \"data.tasks={t2i: 1}\"")
    add_plan_args(parser)
    parser.add_argument("--offload-optimizer", action="store_true",
                        help="optimizer states in host memory (DeepSpeed zero_optimization.offload_optimizer)")
    parser.add_argument("--routable-fraction", type=_parse_fractions, default=None,
                        help="share of a row's tokens each task may skip, e.g. t2i=0.9,mmu=0.85 "
                             "(default: image 0.9, all 1.0, text 0.1 by the task's mod.routable)")
    args = parser.parse_args(argv)
    try:
        result = plan(
            run_config(args.config, args.preset, args.set), nodes=args.nodes, gpus_per_node=args.gpus_per_node,
            gpu_memory_gib=args.gpu_memory_gib, offload_optimizer=args.offload_optimizer,
            assumed_mfu=args.assumed_mfu,
            peak_flops_per_gpu=args.peak_tflops * 1e12 if args.peak_tflops is not None else None,
            routable_fraction=args.routable_fraction,
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_plan(result))
    return 0 if result.fits else 1


if __name__ == "__main__":
    raise SystemExit(main())
