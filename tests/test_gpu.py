"""GPU paths: bf16 with the flash SDPA kernel, MoD on CUDA matching the CPU result, and a bf16 training
step. They skip on a machine without CUDA (CI), and run on a GPU machine with `./scripts/test.sh -k gpu`."""

from __future__ import annotations

import pytest
import torch

from model import ModelConfig, UnifiedTransformer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none visible)")


def _batch(cfg: ModelConfig, B: int = 2, S: int = 256, device: str = "cuda"):
    v = cfg.vocab
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(v.visual_start, v.visual_end, (B, S), generator=g)
    ids[:, 0], ids[:, 1:9] = v.bos_id, torch.randint(0, v.text_size, (B, 8), generator=g)
    return ids.to(device), torch.zeros(B, dtype=torch.long, device=device)


def test_bf16_flash_attention_runs_dense_and_mod():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    cfg = ModelConfig.from_preset("debug", mod={"capacity": {"2-3": {"t2i": 0.25}}})
    net = UnifiedTransformer(cfg).cuda().to(torch.bfloat16)
    ids, tasks = _batch(cfg)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # fails loudly if our shapes/GQA cannot use flash
        out = net(ids, task_ids=tasks)
        (out.logits.float().square().mean() + out.aux_loss).backward()
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.logits.float()).all()
    assert net.model.layers[2].mod_router.weight.grad is not None


def test_mod_on_cuda_matches_cpu_in_fp32():
    cfg = ModelConfig.from_preset("debug", mod={"capacity": {"1-3": {"t2i": 0.25, "mmu": 0.5}}})
    torch.manual_seed(0)
    cpu = UnifiedTransformer(cfg).eval()
    gpu = UnifiedTransformer(cfg).eval().cuda()
    gpu.load_state_dict(cpu.state_dict())
    ids, _ = _batch(cfg, device="cpu")
    tasks = torch.tensor([0, 1])
    with torch.no_grad():
        a = cpu(ids, task_ids=tasks).logits
        b = gpu(ids.cuda(), task_ids=tasks.cuda()).logits.cpu()
    torch.testing.assert_close(a, b, atol=2e-3, rtol=2e-3)


def test_cached_decoding_on_cuda_equals_full_forward():
    from model.generation import CachedDecoder

    cfg = ModelConfig.from_preset("debug", mod={"capacity": {"2-3": {"t2i": 0.3}}, "routing": "causal"})
    net = UnifiedTransformer(cfg).eval().cuda()
    ids, tasks = _batch(cfg, B=1, S=64)
    with torch.no_grad():
        full = net(ids, task_ids=tasks, routing="causal").logits[:, -1]
        dec = CachedDecoder(net, tasks)
        dec.step(ids[:, :-1])
        last = dec.step(ids[:, -1:])
    torch.testing.assert_close(last, full, atol=1e-3, rtol=1e-3)
