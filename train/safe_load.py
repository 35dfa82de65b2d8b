"""Read DeepSpeed checkpoints without running code from them: `torch.load(weights_only=True)` everywhere.

DeepSpeed 0.19 reads its own checkpoints with `torch.load(weights_only=False)` (TorchCheckpointEngine,
zero_to_fp32, ds_to_universal), so an object with a `__reduce__` planted in any `*.pt` of a checkpoint runs
its code on `--resume`, on export, on generation and on analysis. Here every such read goes through
`safe_torch_load`: the restricted unpickler of `weights_only=True`, which builds tensors, plain containers
and primitives, plus the few DeepSpeed classes in `ALLOWED_GLOBALS`, and refuses every other global.

    engine = install_safe_checkpoint_engine(engine)     # right after deepspeed.initialize: the resume path
    with weights_only_torch_load():                     # library code that calls torch.load itself
        state = get_fp32_state_dict_from_zero_checkpoint(root, tag=tag)

The allow-list is what real checkpoints of this trainer hold, found with
`torch.serialization.get_unsafe_globals_in_checkpoint` on checkpoints saved on CPU by ZeRO-0/1/2/3 in fp32,
ZeRO-0/1/3 in bf16, and the 2-stage pipeline engine (ZeRO-0/1 fp32, ZeRO-1 bf16), and on the universal
checkpoint ds_to_universal makes of the ZeRO-3 one. Model states and pipeline layer files hold no non-tensor
global at all; the ZeRO optimizer states hold the ones below (tests/test_safe_load.py keeps the list checked).
A refused file raises `UnsafeCheckpointError` (a ValueError: the CLIs print it and exit 2) naming the file and
the global.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import threading
from typing import Any, Iterator

import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address

# Each entry may be rebuilt by the weights_only unpickler in exactly two ways: called with pickled
# arguments (REDUCE / NEWOBJ) or given a pickled __dict__ (BUILD; none of these defines __setstate__).
# So an entry is safe when its constructor only stores its arguments and its attributes are plain data.
ALLOWED_GLOBALS: dict[type, str] = {
    ZeroStageEnum: "ZeRO optimizer states, key 'zero_stage' (every ZeRO-1/2/3 run). An int Enum: calling it "
                   "with a value only looks up one of its five members.",
    LossScaler: "ZeRO optimizer states, key 'loss_scaler' (fp32 and bf16 runs: a static scale of 1). Its "
                "__init__ stores cur_scale/dynamic; it has no __setstate__, so unpickling only sets attributes.",
    DynamicLossScaler: "the same 'loss_scaler' key in fp16 runs (GPU only, read from DeepSpeed's "
                       "CreateLossScaler; fp16 does not run on CPU). __init__ only stores numbers, flags and a "
                       "torch dtype; no __setstate__.",
    fragment_address: "ZeRO-1/2 and bf16 optimizer states, 'param_slice_mappings' (where each parameter lies in "
                      "the flat fp32 partition): a dataclass of two ints (numel, start).",
}
ALLOW: list[type] = list(ALLOWED_GLOBALS)

_DOC = "train/safe_load.py"


class UnsafeCheckpointError(ValueError):
    """A checkpoint file that the weights_only unpickler refused (a global outside ALLOWED_GLOBALS)."""


def _global_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _refusal(path: Any, err: Exception) -> UnsafeCheckpointError:
    """The error for a refused file: which global it wanted (scanned from the pickle's opcodes, nothing runs)
    and what to do about it, instead of the unpickler's wall of advice about weights_only=False."""
    allowed = {_global_name(c) for c in ALLOW}
    offending: list[str] = []
    if isinstance(path, (str, os.PathLike)):
        try:
            offending = [g for g in torch.serialization.get_unsafe_globals_in_checkpoint(path) if g not in allowed]
        except Exception:  # not a zip checkpoint or unreadable: fall back to the unpickler's own reason
            offending = []
    first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    what = (f"it needs the global(s) {', '.join(offending)}, which are not on the allow-list"
            if offending else f"the weights_only unpickler refused it ({first_line})")
    return UnsafeCheckpointError(
        f"{path}: refused to load this checkpoint file: {what}. A checkpoint of this trainer holds only tensors, "
        f"plain containers and {', '.join(sorted(allowed))}; anything else could run code when unpickled, so it "
        f"was not loaded. Do not use this checkpoint unless you know who wrote the file; if it is a genuine "
        f"checkpoint of a newer DeepSpeed whose new global is plain data, add that class with the reason to "
        f"ALLOWED_GLOBALS in {_DOC}.")


# torch.load as imported, before any patching: safe_torch_load must call the real one even while
# weights_only_torch_load() has replaced torch.load with it.
_torch_load = torch.load


def safe_torch_load(f: Any, map_location: Any = None, **kwargs: Any) -> Any:
    """`torch.load(f, weights_only=True)` with ALLOWED_GLOBALS. Any `weights_only` the caller passes is
    ignored (DeepSpeed passes False); a refused file raises UnsafeCheckpointError naming it."""
    kwargs.pop("weights_only", None)
    with torch.serialization.safe_globals(ALLOW):
        try:
            return _torch_load(f, map_location=map_location, weights_only=True, **kwargs)
        except pickle.UnpicklingError as e:
            raise _refusal(f if isinstance(f, (str, os.PathLike)) else getattr(f, "name", f), e) from None


class SafeTorchCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's TorchCheckpointEngine (same files, same saving) whose load() is safe_torch_load.
    Every model, optimizer, ZeRO shard and pipeline layer file that `engine.load_checkpoint` reads
    goes through the engine's `checkpoint_engine.load`."""

    def load(self, path: str, map_location=None):
        return safe_torch_load(path, map_location=map_location)


def install_safe_checkpoint_engine(engine):
    """Swap the engine's TorchCheckpointEngine for SafeTorchCheckpointEngine (call right after
    `deepspeed.initialize`), and run `engine.load_checkpoint` inside `weights_only_torch_load()`, so that
    the reads DeepSpeed makes there without its checkpoint engine (universal checkpoints, ZeRO-3
    module-only loads through zero_to_fp32) are weights_only too. Returns the engine."""
    current = engine.checkpoint_engine
    if not isinstance(current, SafeTorchCheckpointEngine):
        if type(current) is not TorchCheckpointEngine:
            raise ValueError(
                f"the DeepSpeed config selects the {type(current).__name__} checkpoint engine, but only "
                f"TorchCheckpointEngine loads are made safe ({_DOC}); remove the \"checkpoint\": {{\"writer\"}} "
                f"or \"datastates\" section from the DeepSpeed JSON")
        safe = SafeTorchCheckpointEngine.__new__(SafeTorchCheckpointEngine)
        safe.__dict__.update(vars(current))  # keeps its zipfile_serialization setting: saving is unchanged
        engine.checkpoint_engine = safe
    if not getattr(engine.load_checkpoint, "_weights_only", False):
        load_checkpoint = engine.load_checkpoint

        def safe_load_checkpoint(*args, **kwargs):
            with weights_only_torch_load():
                return load_checkpoint(*args, **kwargs)

        safe_load_checkpoint._weights_only = True
        engine.load_checkpoint = safe_load_checkpoint
    return engine


_patch_lock = threading.RLock()


@contextlib.contextmanager
def weights_only_torch_load() -> Iterator[None]:
    """Inside the block, `torch.load` is safe_torch_load: for library functions that call torch.load
    themselves with weights_only=False (zero_to_fp32, ds_to_universal). torch.load is a process-wide
    attribute, so the block holds a lock (another thread's block waits) and restores it on exit.
    Worker processes forked inside the block inherit the patch; spawned ones do not (ds_to_universal:
    keep its fork default, or one worker)."""
    with _patch_lock:
        before = torch.load
        torch.load = safe_torch_load
        try:
            yield
        finally:
            torch.load = before
