"""Samples and packed rows for the model tests, built by hand (not through data/), so the model's view of
documents is checked against an independent construction.

A row packs samples back to back; each sample's position ids restart at 0, and trailing padding continues
the last sample's positions (the contract of data/packing.py).
"""

from __future__ import annotations

import torch

from model import ModelConfig

T2I, MMU, LM = 0, 1, 2


def sample(cfg: ModelConfig, task: int, length: int, seed: int = 0, n_text: int = 6,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """One sample shaped like its task: BOS + text prompt + <image start> + image codes with an EOL every
    8 positions for t2i/mmu; BOS + text for lm. Drawn from `generator` when given (several samples from
    one stream), else from a generator seeded by `seed`."""
    g = generator if generator is not None else torch.Generator().manual_seed(seed)
    v = cfg.vocab
    if task == LM:
        ids = torch.randint(0, v.text_size, (length,), generator=g)
    else:
        ids = torch.randint(v.visual_start, v.visual_end, (length,), generator=g)
        ids[1 : 1 + n_text] = torch.randint(0, v.text_size, (n_text,), generator=g)
        ids[1 + n_text] = v.boi_id
        ids[12::8] = v.eol_id
    ids[0] = v.bos_id
    return ids


def pack(cfg: ModelConfig, rows: list[list[torch.Tensor]], seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """rows of samples -> (input_ids [B,S], position_ids [B,S]); samples back to back, then padding whose
    positions continue the last sample's."""
    ids = torch.full((len(rows), seq_len), cfg.vocab.pad_id, dtype=torch.long)
    pos = torch.zeros(len(rows), seq_len, dtype=torch.long)
    for b, samples in enumerate(rows):
        t = 0
        for s in samples:
            ids[b, t : t + len(s)] = s
            pos[b, t : t + len(s)] = torch.arange(len(s))
            t += len(s)
        assert t <= seq_len, "samples overflow the row"
        if t < seq_len:
            last = len(samples[-1])
            pos[b, t:] = torch.arange(last, last + seq_len - t)
    return ids, pos


def spans(rows: list[list[torch.Tensor]]) -> list[list[tuple[int, int]]]:
    """(start, end) columns of every sample in every row."""
    out = []
    for samples in rows:
        t, row = 0, []
        for s in samples:
            row.append((t, t + len(s)))
            t += len(s)
        out.append(row)
    return out


def layer_io(net, ids, tasks, layer_idx, routing=None, position_ids=None):
    """(seen, out): the decoder layer's input `x` and output `y` [B,S,D] and the token count `P` its
    attention ran on (the gathered width in a MoD layer), captured by hooks during one no-grad forward."""
    seen = {}
    layer = net.model.layers[layer_idx]
    h1 = layer.register_forward_hook(lambda m, a, o: seen.update(x=a[0], y=o[0]))
    h2 = layer.self_attn.register_forward_pre_hook(lambda m, a: seen.update(P=a[0].shape[1]))
    try:
        with torch.no_grad():
            out = net(ids, task_ids=tasks, position_ids=position_ids, routing=routing)
    finally:
        h1.remove(), h2.remove()
    return seen, out
