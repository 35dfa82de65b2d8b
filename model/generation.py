"""Autoregressive decoding for `UnifiedTransformer`: a per-layer KV cache that is exact under causal MoD routing,
token sampling, and the two token-level generators (an Emu3 image block, answer text).

Sampling cannot use top-k routing (a token's selection depends on later tokens), so it uses the router's
`causal` mode: a routable token goes through MoD layer l iff its router logit for the sequence's task is > 0
(the decision `model/mod.py::_forward_causal` makes on a full sequence, trained by the BCE auxiliary loss).
A token a layer skips is absent from that layer's KV cache, so each layer's cache holds only the tokens it
processed and later tokens cannot attend to the skipped one there, exactly as in the full-sequence forward,
where skipped tokens are masked out as keys. RoPE positions stay absolute: a cached key keeps the rotary
phase of its position in the sequence, and each layer's cache stores those positions for the causal mask.

`CachedDecoder` reuses the model's own submodules (`input_layernorm`, `self_attn.q_proj`, `mod_router`, ...)
so there is one set of weights and the arithmetic is the forward's; `tests/test_generation.py` checks that
greedy decoding with the cache produces the tokens (and logits) of re-running the full forward each step.

Prompts of different lengths share a batch by left padding: padded positions are marked invalid, take no
position, enter no cache and are never attended to, so a padded row decodes exactly as it would alone.

    dec = CachedDecoder(model, task_ids)            # task_ids [B]
    logits = dec.step(prompt_ids, valid)            # prefill: [B, V] next-token logits
    logits = dec.step(next_ids[:, None])            # one token per row per call afterwards
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from model.config import VocabLayout
from model.layers import apply_rope, rope_cos_sin
from model.mod import capacity_table, routable_table, token_kinds


@dataclass
class LayerCache:
    """Keys/values of the tokens one layer processed, compacted per row (skipped tokens take no slot)."""

    k: torch.Tensor
    """[B, kv_heads, C, head_dim] post-RoPE keys; slots >= `length[b]` are unused."""
    v: torch.Tensor
    """[B, kv_heads, C, head_dim] values."""
    pos: torch.Tensor
    """[B, C] absolute position of the token in each slot (for the causal mask)."""
    length: torch.Tensor
    """[B] slots in use per row = tokens this layer has processed for that row."""

    @classmethod
    def empty(cls, batch: int, kv_heads: int, head_dim: int, capacity: int, like: torch.Tensor) -> "LayerCache":
        kv = like.new_zeros(batch, kv_heads, capacity, head_dim)
        return cls(k=kv, v=kv.clone(), pos=torch.zeros(batch, capacity, dtype=torch.long, device=like.device),
                   length=torch.zeros(batch, dtype=torch.long, device=like.device))

    def append(self, k_new: torch.Tensor, v_new: torch.Tensor, pos_new: torch.Tensor, keep: torch.Tensor) -> None:
        """Write the kept tokens of a chunk (k_new/v_new [B,kv,T,hd], pos_new/keep [B,T]) after each row's
        last slot, in order."""
        n_new = keep.sum(1)
        T = keep.shape[1]
        need = int(self.length.max()) + T
        if need > self.k.shape[2]:
            self._grow(max(need, 2 * self.k.shape[2]))
        if T == 1:
            # Decoding: every row writes its next free slot, only rows that keep the token claim it
            # (an unclaimed slot lies past `length`, is never attended to, and is overwritten later).
            rows = torch.arange(keep.shape[0], device=keep.device)
            self.k[rows, :, self.length] = k_new[:, :, 0]
            self.v[rows, :, self.length] = v_new[:, :, 0]
            self.pos[rows, self.length] = pos_new[:, 0]
            self.length += n_new
            return
        b, t = keep.nonzero(as_tuple=True)
        slot = (self.length[:, None] + keep.long().cumsum(1) - 1)[b, t]
        # Advanced indices around a slice put the indexed dim first: both sides are [N, kv, hd].
        self.k[b, :, slot] = k_new[b, :, t]
        self.v[b, :, slot] = v_new[b, :, t]
        self.pos[b, slot] = pos_new[b, t]
        self.length += n_new

    def keys_values_mask(self, q_pos: torch.Tensor):
        """(K, V [B,kv,L,hd], attention mask [B,1,T,L]) for queries at absolute positions q_pos [B,T];
        L = the longest row's length, so the attention cost follows the tokens actually cached."""
        L = int(self.length.max())
        K, V = self.k[:, :, :L], self.v[:, :, :L]
        if q_pos.shape[1] == 1 and int(self.length.min()) == L:
            # One new token per row and no row shorter: every cached token precedes the query (the
            # query's own key included), so no mask is needed and SDPA takes its fastest path.
            return K, V, None
        slots = torch.arange(L, device=q_pos.device)
        used = slots[None, :] < self.length[:, None]  # [B,L]
        if q_pos.shape[1] == 1:
            return K, V, used[:, None, None, :]
        causal = self.pos[:, None, :L] <= q_pos[:, :, None]  # [B,T,L]
        return K, V, (causal & used[:, None, :])[:, None]

    def _grow(self, capacity: int) -> None:
        # Grown by doubling, so a layer that skips most tokens never holds memory for them.
        B, H, C, D = self.k.shape
        for name in ("k", "v"):
            old = getattr(self, name)
            new = old.new_zeros(B, H, capacity, D)
            new[:, :, :C] = old
            setattr(self, name, new)
        pos = self.pos.new_zeros(B, capacity)
        pos[:, :C] = self.pos
        self.pos = pos


class CachedDecoder:
    """Incremental forward of a `UnifiedTransformer` under causal routing, one chunk of tokens per call."""

    def __init__(self, model, task_ids: torch.Tensor, initial_capacity: int = 64) -> None:
        cfg = model.config
        self.model, self.cfg = model, cfg
        self.task_ids = task_ids.long()
        self.batch = int(task_ids.shape[0])
        device = task_ids.device
        if self.batch == 0 or int(task_ids.min()) < 0 or int(task_ids.max()) >= cfg.num_tasks:
            raise ValueError(f"task_ids must be a non-empty [B] tensor of values in [0, {cfg.num_tasks}) "
                             f"for tasks {cfg.mod.tasks}, got {task_ids.tolist()}")
        self.initial_capacity = int(initial_capacity)
        self.routable_tbl = routable_table(cfg, device)  # [T,4]
        self.cap_tbl = capacity_table(cfg, device)  # [L,T]
        self.caches: list[LayerCache | None] = [None] * cfg.num_hidden_layers
        self.next_pos = torch.zeros(self.batch, dtype=torch.long, device=device)
        self.processed = torch.zeros(cfg.num_hidden_layers, dtype=torch.long)
        """Tokens each layer processed so far (all rows): the compute MoD saves at sampling."""
        self.routable_seen = torch.zeros(cfg.num_hidden_layers, dtype=torch.long)
        """Routable tokens each MoD layer saw (its routers decided on them)."""
        self.routed_kept = torch.zeros(cfg.num_hidden_layers, dtype=torch.long)
        """Routable tokens each MoD layer kept (router logit > 0)."""

    @property
    def tokens_seen(self) -> torch.Tensor:
        """[B] valid tokens fed per row (the next token's absolute position)."""
        return self.next_pos.clone()

    @torch.inference_mode()
    def step(self, ids: torch.Tensor, valid: torch.Tensor | None = None, all_logits: bool = False) -> torch.Tensor:
        """Feed ids [B,T] (valid [B,T] False marks left padding); returns the logits after the last position
        [B,V], or after every position [B,T,V] with `all_logits` (positions of invalid tokens are junk)."""
        cfg, B = self.cfg, self.batch
        if ids.ndim != 2 or ids.shape[0] != B:
            raise ValueError(f"ids must have shape [{B}, T], got {tuple(ids.shape)}")
        valid = torch.ones_like(ids, dtype=torch.bool) if valid is None else valid.bool()
        # The full forward never keeps padding as a key in a MoD layer: treat pad ids as absent everywhere.
        valid = valid & (ids != cfg.vocab.pad_id)
        pos = (self.next_pos[:, None] + valid.long().cumsum(1) - 1).clamp_min(0)  # [B,T] absolute positions
        self.next_pos += valid.sum(1)

        model = self.model
        x = model.model.embed_tokens(ids)
        cos, sin = rope_cos_sin(pos, cfg.head_dim, cfg.rope_theta, x.dtype)
        kinds = token_kinds(ids, cfg.vocab)
        rows = torch.arange(B, device=ids.device)[:, None]
        routable_kind = self.routable_tbl[self.task_ids][rows, kinds.long()]  # [B,T]
        for i, layer in enumerate(model.model.layers):
            if layer.is_mod:
                routed_seq = self.cap_tbl[i][self.task_ids] < 1.0  # [B]: is this task routed in this layer
                routable = routable_kind & routed_seq[:, None] & valid
                r, _ = layer.router_logits(x, self.task_ids)  # [B,T] each row's own task's logit
                keep = valid & (~routable | (r > 0))
                self.routable_seen[i] += routable.sum().cpu()
                self.routed_kept[i] += (routable & keep).sum().cpu()
            else:
                keep = valid
            n_keep = keep.sum().cpu()
            self.processed[i] += n_keep
            if not n_keep:
                continue  # every row skips this layer: no compute, nothing cached
            y = self._block(i, layer, x, cos, sin, pos, keep)
            if layer.is_mod:
                # The forward's causal-routing update: gate 2*sigmoid(r) for routed tokens, 1 otherwise.
                gate = torch.where(routable, 2.0 * torch.sigmoid(r), torch.ones_like(r))
                x = torch.where(keep[..., None], x + (y - x) * gate[..., None].to(x.dtype), x)
            else:
                x = torch.where(keep[..., None], y, x)
        h = x if all_logits else x[:, -1:]
        logits = model.lm_head(model.model.norm(h))
        return logits if all_logits else logits[:, 0]

    def _block(self, i: int, layer, x, cos, sin, pos, keep) -> torch.Tensor:
        """`Block.block` for a chunk against this layer's cache: the kept tokens' keys/values are cached
        first, so a kept query sees itself; rows of skipped queries may be NaN (no key) and are discarded."""
        attn = layer.self_attn
        B, T, _ = x.shape
        hq, hkv, hd = attn.num_heads, attn.num_kv_heads, attn.head_dim
        a_in = layer.input_layernorm(x)
        q = attn.q_proj(a_in).view(B, T, hq, hd).transpose(1, 2)
        k = attn.k_proj(a_in).view(B, T, hkv, hd).transpose(1, 2)
        v = attn.v_proj(a_in).view(B, T, hkv, hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.caches[i] is None:
            self.caches[i] = LayerCache.empty(B, hkv, hd, max(self.initial_capacity, T), k)
        cache = self.caches[i]
        cache.append(k, v, pos, keep)
        K, V, mask = cache.keys_values_mask(pos)
        o = F.scaled_dot_product_attention(q, K, V, attn_mask=mask, enable_gqa=hkv != hq)
        h = x + attn.o_proj(o.transpose(1, 2).reshape(B, T, hq * hd))
        m_in = layer.post_attention_layernorm(h)
        if not layer.is_moe:
            return h + layer.mlp(m_in)
        # Each kept token runs its own task's experts; no capacity at sampling, as in the causal forward.
        y, _, _ = layer.mlp.dispatch(m_in.reshape(B * T, -1), self.task_ids[:, None].expand(B, T).reshape(-1),
                                     keep.reshape(-1), apply_capacity=False, num_tasks=self.cfg.num_tasks)
        return h + y.view_as(h)


# ----- sampling ------------------------------------------------------------------------------------------
def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device | str):
    """(ids [B,S], valid [B,S]) with every prompt right-aligned, so all rows' next tokens line up."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("prompts must be a non-empty list of non-empty token lists")
    S = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), S), pad_id, dtype=torch.long)
    valid = torch.zeros(len(prompts), S, dtype=torch.bool)
    for b, p in enumerate(prompts):
        ids[b, S - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
        valid[b, S - len(p):] = True
    return ids.to(device), valid.to(device)


def sample_token(logits: torch.Tensor, temperature: float = 0.0, top_k: int = 0,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [B,V] -> ids [B]: argmax when temperature == 0, else softmax(logits / T) over the top_k
    (0 = all) ids. Disallowed ids should already be -inf."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def image_body_plan(layout: VocabLayout, h: int, w: int) -> list[int | None]:
    """What follows `<image start> "h*w" <image token>`: None where a visual code is sampled, else the
    forced structural id (EOL after each row of w codes, then EOF and <image end>), as Emu3 constrains it."""
    if h <= 0 or w <= 0:
        raise ValueError(f"image grid must be positive, got {h}x{w}")
    return ([None] * w + [layout.eol_id]) * h + [layout.eof_id, layout.eoi_id]


@torch.no_grad()
def generate_image_tokens(model, prompts: Sequence[Sequence[int]], uncond_prompt: Sequence[int] | None,
                          task_id: int, h: int, w: int, *, cfg_scale: float = 1.0, temperature: float = 1.0,
                          top_k: int = 0, num_codes: int | None = None,
                          generator: torch.Generator | None = None) -> torch.Tensor:
    """Sample one image block body per prompt; returns ids [N, h*(w+1)+2] (codes, EOLs, EOF, <image end>).

    Each prompt must end with the block header `<image start> "h*w" <image token>` (forced, not sampled).
    Classifier-free guidance (Emu3): logits = uncond + cfg_scale * (cond - uncond), the unconditional
    branch being `uncond_prompt` (BOS + header: the caption-dropped sequence training sees), run in the
    same batch; cfg_scale == 1 needs no unconditional branch. Inside a row only the first `num_codes`
    visual ids (default: the whole codebook) can be drawn, so the block is well-formed by construction.
    """
    cfg = model.config
    lay = cfg.vocab
    device = next(model.parameters()).device
    N = len(prompts)
    guided = cfg_scale != 1.0
    if guided and not uncond_prompt:
        raise ValueError("cfg_scale != 1 needs the unconditional prompt (BOS + image header)")
    num_codes = lay.visual_size if num_codes is None else int(num_codes)
    if not 0 < num_codes <= lay.visual_size:
        raise ValueError(f"num_codes must be in (0, {lay.visual_size}], got {num_codes}")
    rows = list(prompts) + ([list(uncond_prompt)] * N if guided else [])
    ids, valid = left_pad(rows, lay.pad_id, device)
    dec = CachedDecoder(model, torch.full((len(rows),), task_id, dtype=torch.long, device=device),
                        initial_capacity=ids.shape[1] + h * (w + 1) + 2)
    logits = dec.step(ids, valid)
    allowed = torch.zeros(cfg.vocab_size, dtype=torch.bool, device=device)
    allowed[lay.visual_start:lay.visual_start + num_codes] = True
    plan = image_body_plan(lay, h, w)
    last_free = max(i for i, slot in enumerate(plan) if slot is None)
    out = torch.empty(N, len(plan), dtype=torch.long, device=device)
    for i, slot in enumerate(plan):
        if slot is None:
            lg = logits[:N].float()
            if guided:
                uncond = logits[N:].float()
                lg = uncond + cfg_scale * (lg - uncond)
            tok = sample_token(lg.masked_fill(~allowed, float("-inf")), temperature, top_k, generator)
        else:
            tok = torch.full((N,), slot, dtype=torch.long, device=device)
        out[:, i] = tok
        if i < last_free:  # after the last code everything is forced: no more model calls
            logits = dec.step(tok.repeat(2 if guided else 1)[:, None])
    return out


@torch.no_grad()
def generate_text(model, prompts: Sequence[Sequence[int]], task_id: int, *, max_new_tokens: int,
                  allowed: torch.Tensor | None = None, temperature: float = 0.0, top_k: int = 0,
                  generator: torch.Generator | None = None) -> list[list[int]]:
    """Continue each prompt until EOS or `max_new_tokens`; returns the new ids per prompt (EOS dropped).

    `allowed` [V] bool restricts what can be drawn (e.g. text ids and EOS for an answer); greedy by default.
    A finished row is fed as padding, which enters no cache, until every row is done."""
    cfg = model.config
    eos, pad = cfg.vocab.eos_id, cfg.vocab.pad_id
    device = next(model.parameters()).device
    ids, valid = left_pad(prompts, pad, device)
    B = len(prompts)
    dec = CachedDecoder(model, torch.full((B,), task_id, dtype=torch.long, device=device),
                        initial_capacity=ids.shape[1] + max_new_tokens)
    logits = dec.step(ids, valid)
    out: list[list[int]] = [[] for _ in range(B)]
    done = torch.zeros(B, dtype=torch.bool, device=device)
    for n in range(max_new_tokens):
        lg = logits.float()
        if allowed is not None:
            lg = lg.masked_fill(~allowed.to(device), float("-inf"))
        tok = sample_token(lg, temperature, top_k, generator)
        for b, t in enumerate(tok.tolist()):
            if not done[b] and t != eos:
                out[b].append(t)
        done |= tok == eos
        if bool(done.all()) or n == max_new_tokens - 1:
            break
        logits = dec.step(torch.where(done, pad, tok)[:, None], (~done)[:, None])
    return out
