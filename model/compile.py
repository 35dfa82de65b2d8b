"""`torch.compile` of the decoder blocks' dense compute (regional compilation).

    from model.compile import compile_blocks
    compile_blocks(net.model.layers)            # or a pipeline stage's DecoderPipe layers

What is compiled is `Block.block` (model/layers.py): the two RMSNorms, attention with RoPE, the SwiGLU MLP
and the residuals, the part of a layer that does the FLOPs. The rest of `DecoderLayer.forward` stays eager:
MoD routing reads host-side counts (`RowLayout`) to size the gather, which would break a graph anyway, and
it is cheap index work. Every layer runs the same code object, so Dynamo compiles it once for all layers
(torchtitan and the PyTorch "regional compilation" recipe do the same per transformer block).

The function is compiled, not the module: each layer gets the compiled function as its own `block`
attribute (a bound method), so the module tree, the parameters and the state_dict keys stay the model's
own (no `_orig_mod.` prefix). Under ZeRO-3 a DeepSpeed hook on a submodule inside the block would break the
graph; train/zero.py makes each decoder layer a ZeRO-3 leaf module, so the hooks sit outside it.

Shapes. The token dimension varies with the data: an MoD layer runs on the P kept tokens of its
micro-batch, and P differs between tasks, between mixed-task micro-batches and with packing; with
`data.pad_to: longest` even the full length S differs between micro-batches. With `dynamic=None` (the
default) the token dimension of the block's inputs is marked dynamic before every call
(`maybe_mark_dynamic`), so the first compile covers every length. The other dimensions (batch, hidden,
heads) stay static, and would fall to Dynamo's automatic dynamic shapes (one recompile) if they changed. The
attention mask is None for rows of one document each and a bool [B,1,S,S] tensor for packed rows: two
graphs, each the only compile of its own function. Dynamo also guards on grad mode and `module.training`, so
a forward under `no_grad` or in eval mode compiles its own graphs once. `dynamic=True` and `False` are passed
to `torch.compile` as they are (False: static shapes, one compile per distinct length).
"""

from __future__ import annotations

import types
from collections.abc import Iterable

import torch
from torch import nn

from model.layers import Block

_COMPILED: dict[bool | None, types.FunctionType] = {}


def _block_without_mask(layer: Block, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return Block.block(layer, x, cos, sin, None)


def _block_with_mask(layer: Block, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     attn_mask: torch.Tensor) -> torch.Tensor:
    return Block.block(layer, x, cos, sin, attn_mask)


def _compiled_block(dynamic: bool | None):
    """The compiled `Block.block` for this `dynamic` setting, one per process and shared by every layer, so Dynamo
    compiles each graph once for all layers. Rows without and with a mask go through two functions, so each graph
    is the first (and only) compile of its own code object: no run ever "recompiles" (Dynamo's term for a second
    cache entry, which `torch._dynamo.config.error_on_recompile` turns into an error)."""
    if dynamic not in _COMPILED:
        without_mask = torch.compile(_block_without_mask, dynamic=dynamic)
        with_mask = torch.compile(_block_with_mask, dynamic=dynamic)

        def block(self: Block, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  attn_mask: torch.Tensor | None = None) -> torch.Tensor:
            if dynamic is None:
                # x/cos/sin [B,S,*] and the mask [B,1,S,S]: S is the token count (P in an MoD layer).
                for t in (x, cos, sin):
                    torch._dynamo.maybe_mark_dynamic(t, 1)
                if attn_mask is not None:
                    torch._dynamo.maybe_mark_dynamic(attn_mask, [2, 3])
            if attn_mask is None:
                return without_mask(self, x, cos, sin)
            return with_mask(self, x, cos, sin, attn_mask)

        block.compiled_dynamic = dynamic
        _COMPILED[dynamic] = block
    return _COMPILED[dynamic]


def is_compiled(layer: nn.Module) -> bool:
    """Whether `compile_blocks` installed the compiled block on this layer."""
    method = layer.__dict__.get("block")
    return isinstance(method, types.MethodType) and hasattr(method.__func__, "compiled_dynamic")


def compile_blocks(layers: Iterable[nn.Module], *, dynamic: bool | None = None) -> None:
    """Compile the dense block compute of each layer (`Block.block`) in place. Idempotent: a layer already
    compiled with the same `dynamic` is left as it is; another `dynamic` replaces it.

    `layers`: Block / DecoderLayer modules (`net.model.layers`, or a pipeline stage's `DecoderPipe`s). The
    compile itself happens on the first call of each graph (inputs with and without a mask, training and
    `no_grad`)."""
    fn = _compiled_block(dynamic)
    for layer in layers:
        if not isinstance(layer, Block):
            raise TypeError(f"compile_blocks takes decoder layers (model.layers.Block), got {type(layer).__name__}")
        if is_compiled(layer) and layer.block.__func__ is fn:
            continue
        layer.block = types.MethodType(fn, layer)
