"""The run configuration: one YAML file, typed sections, `--set section.field=value` overrides, and the
cross-check against the DeepSpeed JSON.

    model:       model.config.ModelConfig (preset + overrides, MoD plan)
    data:        data.config.LoaderConfig (shards, sequence length, micro-batch size, mixing weights)
    optim:       OptimConfig (AdamW, warmup + cosine, clipping, gradient accumulation)
    parallel:    ParallelConfig (zero | pipeline, stages, activation checkpointing, precision)
    logging:     LoggingConfig (TensorBoard cadence, peak FLOP/s for MFU, progress bar)
    checkpoint:  CheckpointConfig (cadence, retention, resume, HF export, non-finite-loss policy)
    run:         RunSection (output dir, seed, steps, device, torch.compile)

The YAML is the source of truth. In the DeepSpeed JSON, "auto" (or a missing key) is filled from it and
an explicit value must agree with it: a contradiction is a ValueError naming both files' fields, raised
before any model is built. The YAML files and `--set` values are read by one loader (`load_yaml`): PyYAML's
safe loader (data, never code) with YAML 1.2's floats, so `1e-4` is a number, not the string PyYAML's YAML 1.1
rules make of it.

Field checks use model/config.py's `known_fields`, `check_int` and `check_number`, like the model and data
sections. Checks come in two kinds: `RunConfig.from_dict` checks the config against itself (field ranges, data.seq_len
against the model's positions, pipeline stages against its layers); `check_environment` checks it against the
machine and the job (dataset, output directory, checkpoint to resume, shards for every reader) and is called
by train/main.py before the process group or the model exists.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from data.config import LoaderConfig
from model.config import ModelConfig, check_int, check_number, known_fields
from train.log import log

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
MODES = ("zero", "pipeline")


class _Yaml12FloatLoader(yaml.SafeLoader):
    """SafeLoader whose floats follow YAML 1.2: YAML 1.1 (PyYAML) wants a dot in the mantissa, so `1e-4`,
    `--set optim.lr=1e-4` and `EXTRA_SETS="optim.lr=2e-5"` would reach the config as strings."""


_Yaml12FloatLoader.add_implicit_resolver(  # checked after SafeLoader's own float and int patterns
    "tag:yaml.org,2002:float",
    re.compile(r"""^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$
                  |^[-+]?\.[0-9][0-9_]*[eE][-+]?[0-9]+$""", re.X),
    list("-+0123456789."))


def load_yaml(text: str):
    """Parse YAML data (a config file or one `--set` value) with YAML 1.2 floats; raises yaml.YAMLError."""
    return yaml.load(text, Loader=_Yaml12FloatLoader)


def read_config_doc(path: str | Path, overrides: list[str] = ()) -> dict[str, Any]:
    """The run YAML as a dict with the `--set` overrides applied; ValueError naming the file when unreadable."""
    path = Path(path)
    try:
        doc = load_yaml(path.read_text()) or {}
    except FileNotFoundError:
        raise ValueError(f"config file {path} does not exist") from None
    except IsADirectoryError:
        raise ValueError(f"config file {path} is a directory") from None
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(doc, Mapping):
        raise ValueError(f"{path}: the top level must be a mapping of sections")
    return apply_overrides(doc, overrides)


@dataclass
class OptimConfig:
    lr: float = 3e-4
    """Peak learning rate after warmup."""
    min_lr_ratio: float = 0.1
    """The cosine decays to lr * min_lr_ratio at run.max_steps."""
    warmup_steps: int = 10
    """Linear warmup from 0, in optimizer steps."""
    weight_decay: float = 0.1
    """AdamW decay for matrices; norms and MoD routers are never decayed."""
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0
    """Global gradient-norm clip (0 disables)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step on each data-parallel rank."""

    def __post_init__(self) -> None:
        check_number("optim.lr", self.lr, 0.0, lo_open=True)
        check_number("optim.min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)
        check_int("optim.warmup_steps", self.warmup_steps, 0)
        check_number("optim.weight_decay", self.weight_decay, 0.0)
        self.betas = tuple(self.betas)
        if len(self.betas) != 2:
            raise ValueError(f"optim.betas must be two numbers, got {self.betas!r}")
        for b in self.betas:
            check_number("optim.betas", b, 0.0, 1.0)
        check_number("optim.eps", self.eps, 0.0, lo_open=True)
        check_number("optim.grad_clip", self.grad_clip, 0.0)
        check_int("optim.grad_accum", self.grad_accum, 1)


@dataclass
class ParallelConfig:
    mode: str = "zero"
    """zero: DeepSpeed data parallel with the ZeRO stage of the JSON (3 for Emu3-scale, model built under
    zero.Init); pipeline: DeepSpeed PipelineModule (ZeRO 0/1 only)."""
    pipeline_stages: int = 1
    """Pipeline stages (mode=pipeline); the world size must be a multiple."""
    partition_method: str = "parameters"
    """DeepSpeed partition method for pipeline stages: parameters | uniform | type:<regex>."""
    activation_checkpointing: bool = False
    """Recompute each decoder layer in backward (saves activation memory for ~1/3 more compute)."""
    activation_checkpoint_interval: int = 1
    """Pipeline mode: checkpoint every N layers (when activation_checkpointing)."""
    precision: str = "auto"
    """auto (bf16 on GPU, fp32 on CPU) | bf16 | fp16 | fp32."""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"parallel.mode must be one of {MODES}, got {self.mode!r}")
        check_int("parallel.pipeline_stages", self.pipeline_stages, 1)
        if self.mode == "zero" and self.pipeline_stages != 1:
            raise ValueError("parallel.pipeline_stages > 1 needs parallel.mode: pipeline")
        check_int("parallel.activation_checkpoint_interval", self.activation_checkpoint_interval, 1)
        if self.precision not in PRECISIONS:
            raise ValueError(f"parallel.precision must be one of {PRECISIONS}, got {self.precision!r}")
        if not (self.partition_method in ("parameters", "uniform") or self.partition_method.startswith("type:")):
            raise ValueError(f"parallel.partition_method must be parameters | uniform | type:<regex>, "
                             f"got {self.partition_method!r}")


@dataclass
class LoggingConfig:
    log_every: int = 1
    """Optimizer steps between TensorBoard/console records."""
    peak_tflops: float | None = None
    """Peak TFLOP/s per device for MFU; None looks the GPU up in model.flops.PEAK_BF16_FLOPS (on CPU,
    MFU is left out unless this is set)."""
    progress_bar: bool = True
    """tqdm bar with ETA on rank 0 (off when stderr is not a terminal is fine: it then prints lines)."""
    eval_every: int = 0
    """Optimizer steps between evaluations on the validation split (tools/evaluate.py); 0: never during
    training. Metrics and a grid of generated images go to TensorBoard under eval/."""
    eval_at_end: bool = False
    """Evaluate the final model: <output_dir>/eval.json, the summary's "eval" entry, printed."""
    eval_samples: int = 50
    """Validation samples per task for understanding accuracy and perplexity."""

    def __post_init__(self) -> None:
        check_int("logging.log_every", self.log_every, 1)
        check_int("logging.eval_every", self.eval_every, 0)
        check_int("logging.eval_samples", self.eval_samples, 1)
        if self.peak_tflops is not None:
            check_number("logging.peak_tflops", self.peak_tflops, 0.0, lo_open=True)


@dataclass
class CheckpointConfig:
    save_every: int = 100
    """Optimizer steps between checkpoints (0: only at the end and on signals)."""
    keep_last: int = 3
    """Checkpoints kept; older ones are deleted after a newer one is complete."""
    resume: str = "auto"
    """auto: newest complete checkpoint under output_dir/checkpoints, if any | none | a checkpoint path."""
    export_hf: bool = True
    """At the end, write output_dir/hf: consolidated weights as an HF Emu3 directory (safetensors)."""
    init_from_hf: str | None = None
    """Start from an HF Emu3 checkpoint directory (UniMoD fine-tuning). Routers start fresh, unless the
    directory carries them for the same tasks (mod_routers.safetensors of a UniMoD export)."""
    moe_calibration_samples: int = 64
    """When `init_from_hf` is a dense checkpoint (or holds an MLP as another number of experts) and `model.moe`
    makes that MLP experts: calibration samples per training task, from data.dataset_dir's training split
    (data.split), that rank the MLP's neurons; the ranking deals them to the experts (train/moe_init.py). 0:
    deal them in index order."""
    max_consecutive_nonfinite: int = 5
    """A NaN/inf loss skips its micro-batch, a NaN/inf global gradient norm skips its optimizer step; this many
    of either in a row stops the run (exit 3), saving first only if the weights are finite."""
    accept_changes: list[str] = field(default_factory=list)
    """Fingerprint fields (train/fingerprint.py) this run may change on resume, e.g. [optim.lr, run.max_steps];
    a resume that changes any other is refused (exit 2) naming the field. Accepted optimizer and schedule
    changes take effect from the resumed step on. Model shapes cannot be accepted; the parallel layout
    (`parallel.layout`, or its fields) resumes through DeepSpeed's universal checkpoint (docs/elastic.md)."""

    def __post_init__(self) -> None:
        if isinstance(self.accept_changes, str):  # --set checkpoint.accept_changes=optim.lr
            self.accept_changes = [self.accept_changes]
        if not isinstance(self.accept_changes, list) or not all(
                isinstance(a, str) and "." in a for a in self.accept_changes):
            raise ValueError(f"checkpoint.accept_changes must be a list of dotted field names such as "
                             f"[optim.lr, run.max_steps], got {self.accept_changes!r}")
        check_int("checkpoint.save_every", self.save_every, 0)
        check_int("checkpoint.keep_last", self.keep_last, 1)
        check_int("checkpoint.max_consecutive_nonfinite", self.max_consecutive_nonfinite, 1)
        check_int("checkpoint.moe_calibration_samples", self.moe_calibration_samples, 0)
        if not isinstance(self.resume, str) or not self.resume:
            raise ValueError(f"checkpoint.resume must be 'auto', 'none' or a path, got {self.resume!r}")


@dataclass
class RunSection:
    output_dir: str = "runs/default"
    """config.yaml, tensorboard/, checkpoints/, summary.json and hf/ are written here."""
    seed: int = 0
    """Seeds model init (fresh weights, and fresh MoD routers on top of `checkpoint.init_from_hf`). The data
    order and caption dropout are `data.seed`'s: set both to repeat a run with another seed end to end."""
    max_steps: int = 100
    """Optimizer steps to train."""
    device: str = "auto"
    """auto (cuda when available) | cpu | cuda."""
    compile: bool | None = None
    """true | false | null: `torch.compile` each decoder layer's dense compute (norms, attention with RoPE, SwiGLU
    MLP; model/compile.py `compile_blocks`), in ZeRO (stages 0-3) and pipeline mode. Parameters, their names and
    checkpoints are unchanged. The token dimension is compiled dynamic, so MoD's kept-token counts, mixed-task and
    packed micro-batches and `data.pad_to: longest` never recompile: a run compiles two graphs (rows without and
    with a document mask), and again once if it evaluates (no_grad). null: on with CUDA (unmeasured in this
    project; what torchtitan users expect), off on CPU, where the main job (demo.yaml, 1 thread) measured 3.4%
    faster steps for ~20 s of compiling per process, paid back only after ~3,200 steps
    (bench/results/compile_cpu.md)."""

    def __post_init__(self) -> None:
        check_int("run.seed", self.seed, 0)
        check_int("run.max_steps", self.max_steps, 1)
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"run.device must be auto, cpu or cuda, got {self.device!r}")
        if not (self.compile is None or isinstance(self.compile, bool)):
            raise ValueError(f"run.compile must be true, false or null, got {self.compile!r}")

    def compile_on(self, device_type: str) -> tuple[bool, str]:
        """-> (compile the decoder blocks?, why, for the log) on a device of this type ("cuda", "cpu")."""
        if self.compile is not None:
            return self.compile, f"run.compile: {str(self.compile).lower()}"
        if device_type == "cuda":
            return True, "run.compile: null, on by default on CUDA"
        return False, (f"run.compile: null, off by default on {device_type}: 3% faster steps do not repay the compile "
                       "on CPU, bench/results/compile_cpu.md")


_SECTIONS = {"optim": OptimConfig, "parallel": ParallelConfig, "logging": LoggingConfig,
             "checkpoint": CheckpointConfig, "run": RunSection}


RETIRED_FIELDS = {
    "logging.eval_images_per_digit": "the demo grid's size is tools/evaluate.py's --images-per-digit",
}
"""Settings that earlier versions wrote into every run's config.yaml: ignored with a warning, so those runs'
configs still load (resume, tools reading a run), while any other unknown key still stops a run."""


@dataclass
class RunConfig:
    model: ModelConfig
    data: LoaderConfig
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    run: RunSection = field(default_factory=RunSection)

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any], where: str = "config") -> "RunConfig":
        if not isinstance(doc, Mapping):
            raise ValueError(f"{where}: the top level must be a mapping of sections")
        unknown = sorted(set(doc) - {"model", "data", *_SECTIONS})
        if unknown:
            raise ValueError(f"{where}: unknown section {unknown[0]!r}; sections are model, data, "
                             f"{', '.join(_SECTIONS)}")
        for required in ("model", "data"):
            if required not in doc:
                raise ValueError(f"{where}: the {required}: section is required")
        kwargs: dict[str, Any] = {}
        try:
            model_doc = dict(doc["model"] or {})
            if "vocab" not in model_doc:
                # The data defines what the ids mean: take the layout its manifest records.
                manifest = _manifest_vocab(doc["data"] or {})
                if manifest is not None:
                    model_doc["vocab"] = manifest
            kwargs["model"] = ModelConfig.from_dict(model_doc)
            kwargs["data"] = LoaderConfig.from_dict(doc["data"] or {})
            for name, section in _SECTIONS.items():
                raw = doc.get(name) or {}
                if not isinstance(raw, Mapping):
                    raise ValueError(f"{name}: must be a mapping, got {raw!r}")
                retired = sorted(k for k in raw if f"{name}.{k}" in RETIRED_FIELDS)
                if retired:
                    log.warning(f"{where}: ignoring {', '.join(f'{name}.{k}' for k in retired)} (no longer a setting: "
                                f"{'; '.join(RETIRED_FIELDS[f'{name}.{k}'] for k in retired)})")
                    raw = {k: v for k, v in raw.items() if k not in retired}
                kwargs[name] = section(**known_fields(section, raw, name))
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        _check_routable_exists(kwargs["model"], where)
        model, data, parallel = kwargs["model"], kwargs["data"], kwargs["parallel"]
        ckpt = kwargs["checkpoint"]
        if ckpt.init_from_hf and model.moe.layers and ckpt.moe_calibration_samples and data.dataset_dir is None:
            raise ValueError(f"{where}: checkpoint.moe_calibration_samples={ckpt.moe_calibration_samples} ranks the "
                             "neurons of the MLPs that model.moe converts from checkpoint.init_from_hf on calibration "
                             "samples of the training split, which needs data.dataset_dir (a manifest); data.shards "
                             "has none. Set checkpoint.moe_calibration_samples=0 to deal the neurons in index order")
        if data.seq_len > model.max_position_embeddings:
            raise ValueError(f"{where}: data.seq_len={data.seq_len} is longer than model.max_position_embeddings="
                             f"{model.max_position_embeddings}: rows would hold positions the model is not built "
                             f"for; lower data.seq_len or raise model.max_position_embeddings")
        if parallel.mode == "pipeline" and parallel.pipeline_stages > model.num_hidden_layers:
            raise ValueError(f"{where}: parallel.pipeline_stages={parallel.pipeline_stages} but the model has "
                             f"{model.num_hidden_layers} decoder layers (model.num_hidden_layers): a stage without "
                             f"a decoder layer has nothing to compute; use at most {model.num_hidden_layers} stages")
        if kwargs["parallel"].mode == "pipeline" and kwargs["data"].pad_to != "seq_len":
            # Pipeline stages exchange activations of one fixed shape, sent once per run.
            raise ValueError(f"{where}: data.pad_to={kwargs['data'].pad_to!r} makes micro-batch widths vary, "
                             f"but parallel.mode=pipeline needs fixed shapes; use data.pad_to: seq_len")
        return cls(**kwargs)

    @classmethod
    def load(cls, path: str | Path, overrides: list[str] = ()) -> "RunConfig":
        return cls.from_dict(read_config_doc(path, overrides), where=str(path))

    def to_dict(self) -> dict[str, Any]:
        out = {"model": self.model.to_dict(), "data": dataclasses.asdict(self.data)}
        for name in _SECTIONS:
            out[name] = dataclasses.asdict(getattr(self, name))
        out["optim"]["betas"] = list(self.optim.betas)
        return out


# Token kinds a task's samples can hold at all (data/layout.py): plain text has no image tokens.
_KINDS_IN_TASK = {"t2i": {"text", "image"}, "mmu": {"text", "image"}, "lm": {"text"}}


def _check_routable_exists(model: ModelConfig, where: str) -> None:
    """A task routed in some layer must have tokens of its routable kind, or its capacity skips nothing while
    the FLOPs plan and the summary count on it (e.g. `routable: {lm: image}`)."""
    mod = model.mod
    for task in mod.tasks:
        layers = [layer for layer in mod.mod_layers() if mod.capacity_of(layer, task) < 1.0]
        kinds = {"all": {"text", "image"}}.get(mod.routable[task], {mod.routable[task]})
        if layers and task in _KINDS_IN_TASK and not kinds & _KINDS_IN_TASK[task]:
            raise ValueError(f"{where}: model.mod.routable.{task} = {mod.routable[task]!r}, but {task} samples hold "
                             f"no {mod.routable[task]} tokens, so model.mod.capacity for {task} in layers {layers} "
                             f"would skip nothing; route another kind or drop {task} from those layers")


def _manifest_vocab(data: Mapping[str, Any]) -> dict[str, int] | None:
    dataset_dir = data.get("dataset_dir")
    if not dataset_dir:
        return None
    from data.manifest import MANIFEST_NAME, load_manifest

    if not (Path(dataset_dir) / MANIFEST_NAME).exists():
        return None
    # load_manifest checks the vocab field (a ValueError naming the file); the section as written is handed
    # on, so that fields it leaves out come from the model preset as before.
    return load_manifest(dataset_dir).doc["vocab"]


def apply_overrides(doc: Mapping[str, Any], overrides: list[str]) -> dict[str, Any]:
    """`section.field[.sub]=value` -> nested dict update; value parsed as YAML data (numbers, lists, maps) by
    `load_yaml`, so `optim.lr=1e-4` is a number."""
    doc = copy.deepcopy(dict(doc))
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"--set {item!r}: expected section.field=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if len(parts) < 2 or not all(parts):
            raise ValueError(f"--set {item!r}: the key must name a section and a field, e.g. optim.lr=1e-4")
        try:
            value = load_yaml(raw)
        except yaml.YAMLError as e:
            raise ValueError(f"--set {item!r}: value is not valid YAML ({e})") from None
        node = doc
        for p in parts[:-1]:
            nxt = node.get(p)
            if nxt is None:
                nxt = node[p] = {}
            if not isinstance(nxt, dict):
                raise ValueError(f"--set {item!r}: {p} is not a section")
            node = nxt
        node[parts[-1]] = value
    return doc


# ----- the config against the machine and the job ------------------------------------------------------
def check_environment(cfg: RunConfig, world_size: int, where: str = "config") -> None:
    """What the run needs from the file system and the job, checked on every rank before the process group,
    the model or the engine exist (which can take minutes, and under ZeRO-3 hang a peer that failed alone).

    Raises ValueError naming the field: data.dataset_dir without a manifest, run.output_dir that cannot hold
    the run, a checkpoint.resume path without a complete checkpoint, or more data readers (data-parallel
    ranks x data.num_workers) than a task has shards. Creates run.output_dir (the run would anyway).
    """
    data = cfg.data
    if data.dataset_dir is not None:
        dataset = Path(data.dataset_dir)
        if not dataset.is_dir():
            raise ValueError(f"{where}: data.dataset_dir={data.dataset_dir}: "
                             f"{'not a directory' if dataset.exists() else 'no such directory'} (write a dataset "
                             f"there with python -m data.prepare, or pass --prepare-demo-data for the demo)")
        if not (dataset / "manifest.json").is_file():
            raise ValueError(f"{where}: data.dataset_dir={data.dataset_dir} has no manifest.json (an unfinished "
                             f"python -m data.prepare run writes it last)")
    _check_output_dir(cfg.run.output_dir, where)
    _check_resume(cfg, where)
    _check_readers(cfg, world_size, where)


def _check_output_dir(output_dir: str, where: str) -> None:
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{where}: run.output_dir={output_dir} is a file, not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
        # A real write, not os.access: root passes access() on read-only mounts' directories and /proc.
        fd, probe = tempfile.mkstemp(prefix=".writable-", dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ValueError(f"{where}: run.output_dir={output_dir} is not a writable directory "
                         f"({e.strerror or e})") from None


def _check_resume(cfg: RunConfig, where: str) -> None:
    spec = cfg.checkpoint.resume
    if spec in ("auto", "none"):
        return  # auto without a checkpoint starts from scratch
    if not Path(spec).exists():
        raise ValueError(f"{where}: checkpoint.resume={spec}: no such file or directory (auto | none | a "
                         f"checkpoints/ directory or one of its step_NNNNNNNN directories)")
    from train.checkpoint import CheckpointManager

    try:
        CheckpointManager.resolve(spec, Path(cfg.run.output_dir) / "checkpoints")
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def _check_readers(cfg: RunConfig, world_size: int, where: str) -> None:
    """The loader gives every (rank, worker) reader of a task its own shards (data/loader.py): a reader
    without one would hang DDP. It checks the usable shards again once built; this catches it up front."""
    data = cfg.data
    stages = cfg.parallel.pipeline_stages if cfg.parallel.mode == "pipeline" else 1
    if world_size % stages:
        return  # reconcile_ds_config reports it
    dp = world_size // stages
    readers = dp * max(1, data.num_workers)
    if data.shards is not None:
        counts, source = {t: len(data.shards[t]) for t in data.tasks}, "data.shards"
    else:
        from data.manifest import load_manifest

        manifest = load_manifest(data.dataset_dir)
        by_task = manifest.shards.get(data.split)
        if by_task is None:
            raise ValueError(f"{where}: data.split={data.split!r} is not in {data.dataset_dir}/manifest.json "
                             f"(splits: {sorted(manifest.shards)})")
        counts = {t: len(by_task.get(t, [])) for t in data.tasks}
        source = f"split {data.split!r} of {data.dataset_dir}/manifest.json"
    for task, n in counts.items():
        if n < readers:
            fits = n // dp
            raise ValueError(
                f"{where}: data.num_workers={data.num_workers} x {dp} data-parallel rank(s) = {readers} readers, but "
                f"task {task} has {n} shard(s) in {source} and every reader needs at least one (a reader without "
                f"data hangs the others); " + (f"set data.num_workers to at most {fits}" if fits >= 1 else
                                                f"use at most {n} data-parallel ranks")
                + " or write more, smaller shards")


# ----- DeepSpeed JSON ------------------------------------------------------------------------------------
def resolve_precision(precision: str, on_gpu: bool) -> str:
    return ("bf16" if on_gpu else "fp32") if precision == "auto" else precision


def reconcile_ds_config(ds: Mapping[str, Any], cfg: RunConfig, world_size: int, on_gpu: bool,
                        where: str = "deepspeed config") -> dict[str, Any]:
    """Fill the DeepSpeed JSON's "auto" values from the run config and check the rest agree with it.

    Returns the config dict to hand to `deepspeed.initialize`. Raises ValueError naming the JSON key and
    the YAML field on a contradiction (batch sizes, precision, ZeRO stage vs pipeline, clipping).
    """
    ds = copy.deepcopy(dict(ds))
    stages = cfg.parallel.pipeline_stages if cfg.parallel.mode == "pipeline" else 1
    if world_size % stages:
        raise ValueError(f"world size {world_size} is not a multiple of parallel.pipeline_stages {stages}")
    dp = world_size // stages
    micro, accum = cfg.data.micro_batch_size, cfg.optim.grad_accum

    def agree(key: str, ours: Any, yaml_field: str) -> None:
        theirs = ds.get(key, "auto")
        if theirs == "auto":
            ds[key] = ours
        elif theirs != ours:
            raise ValueError(f"{where}: {key}={theirs!r} contradicts {yaml_field}={ours!r}; "
                             f"set one of them to match (or \"auto\" in the JSON)")

    agree("train_micro_batch_size_per_gpu", micro, "data.micro_batch_size")
    agree("gradient_accumulation_steps", accum, "optim.grad_accum")
    agree("train_batch_size", micro * accum * dp,
          f"data.micro_batch_size x optim.grad_accum x data-parallel size ({micro} x {accum} x {dp})")
    agree("gradient_clipping", float(cfg.optim.grad_clip), "optim.grad_clip")

    for section in ("optimizer", "scheduler"):
        if section in ds:
            raise ValueError(f"{where}: has an \"{section}\" section, but the optimizer and LR schedule come "
                             f"from the optim: section of the YAML (AdamW with decay groups, warmup + cosine); "
                             f"remove it")

    precision = resolve_precision(cfg.parallel.precision, on_gpu)
    for name in ("bf16", "fp16"):
        sec = ds.setdefault(name, {})
        if not isinstance(sec, dict):
            raise ValueError(f"{where}: \"{name}\" must be an object")
        want = precision == name
        enabled = sec.get("enabled", "auto")
        if enabled == "auto":
            sec["enabled"] = want
        elif bool(enabled) != want:
            raise ValueError(f"{where}: {name}.enabled={enabled} contradicts parallel.precision={cfg.parallel.precision!r} "
                             f"(resolved to {precision})")
    if precision == "bf16" and cfg.parallel.mode == "pipeline":
        # DeepSpeed's bf16 optimizer with ZeRO-0 crashes on load_checkpoint (KeyError: 0); ZeRO-1 is fine.
        ds.setdefault("zero_optimization", {}).setdefault("stage", 1)

    zero = ds.setdefault("zero_optimization", {})
    stage = zero.get("stage", 0)
    if cfg.parallel.mode == "pipeline" and stage not in (0, 1):
        raise ValueError(f"{where}: zero_optimization.stage={stage} but parallel.mode=pipeline; DeepSpeed's "
                         f"pipeline engine supports ZeRO stage 0 or 1 only (use mode: zero for ZeRO-2/3)")
    if cfg.parallel.mode == "pipeline" and precision == "bf16" and stage == 0:
        raise ValueError(f"{where}: bf16 with ZeRO stage 0 in pipeline mode cannot reload checkpoints in "
                         f"DeepSpeed 0.19 (KeyError in the bf16 optimizer); use zero_optimization.stage=1")
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"{where}: zero_optimization.stage must be 0-3, got {stage!r}")
    if not on_gpu and (zero.get("offload_optimizer", {}).get("device") in ("cpu", "nvme")
                       or zero.get("offload_param", {}).get("device") in ("cpu", "nvme")):
        raise ValueError(f"{where}: ZeRO offload needs a GPU (it moves states off the GPU); use a ds_configs/*cpu* config")
    ds.setdefault("steps_per_print", 1 << 30)  # our logger prints; keep DeepSpeed's per-step lines quiet
    ds.setdefault("wall_clock_breakdown", False)
    return ds


def load_ds_config(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"--deepspeed_config {path} does not exist") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"--deepspeed_config {path}: not valid JSON ({e})") from None
