"""One rank of the peer benchmark: times training steps of either transformers' `Emu3ForCausalLM` (the
stack Emu3's authors train with) or our `UnifiedTransformer`, both under the same DeepSpeed ZeRO-3
config, torch AdamW, fp32 on CPU (bf16 on GPU), with synthetic Emu3-layout batches of the same shape.

Run under a launcher (bench/peer_stack.py does, for every variant in turn):

    DS_ACCELERATOR=cpu .venv/bin/deepspeed --num_gpus 2 bench/peer_step.py --model hf --out /tmp/hf.json
    DS_ACCELERATOR=cpu .venv/bin/deepspeed --num_gpus 2 bench/peer_step.py --model ours --mod demo --out /tmp/o.json
    torchrun --nproc_per_node 8 bench/peer_step.py --model hf --preset emu3-1b --seq-len 4096 --dtype bf16 ...

Each rank runs `--warmup` steps, then `--steps` timed steps (forward, loss, backward, optimizer step);
rank 0 writes per-step times (max over ranks), tokens/s and every rank's peak RSS (and, on GPU, peak
allocated memory) to `--out`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import deepspeed  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from model import ModelConfig, UnifiedTransformer  # noqa: E402
from model.flops import describe_microbatch, mfu, microbatch_flops, peak_flops, tflops_per_device  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# The demo training plan (train/configs/demo.yaml): UniMoD in the last half of the layers.
MOD_PLANS = {"demo": {"capacity": {"4-7": {"t2i": 0.2, "mmu": 0.3}}, "routable": {"t2i": "image", "mmu": "image", "lm": "all"}}}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, choices=("hf", "ours"))
    p.add_argument("--preset", default="demo")
    p.add_argument("--mod", choices=sorted(MOD_PLANS), help="ours only: train with this UniMoD plan")
    p.add_argument("--mod-layers", help='override the plan\'s layer range, e.g. "8-15" for a 16-layer model')
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--micro-batch", type=int, default=1, help="sequences per rank per step")
    p.add_argument("--tasks", default="t2i,mmu", type=lambda s: s.split(","),
                   help="task of each rank's micro-batch, by rank in turn (task-homogeneous micro-batches)")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing per layer")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads per rank (CPU)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--ds-config", default=str(REPO / "ds_configs" / "zero3_cpu.json"))
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help="set by the deepspeed launcher")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    if args.mod and args.model != "ours":
        p.error("--mod applies to --model ours (transformers' Emu3 has no MoD)")
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    return args


def ds_config(args: argparse.Namespace, world: int) -> dict:
    """The project's ZeRO-3 JSON with its "auto" values filled the way the trainer fills them."""
    cfg = json.loads(Path(args.ds_config).read_text())
    cfg.update(train_micro_batch_size_per_gpu=args.micro_batch, gradient_accumulation_steps=1,
               train_batch_size=args.micro_batch * world, gradient_clipping=1.0,
               bf16={"enabled": args.dtype == "bf16"}, fp16={"enabled": False}, steps_per_print=10**9)
    if cfg["zero_optimization"].get("stage") != 3:
        raise ValueError(f"{args.ds_config}: zero_optimization.stage must be 3 for this benchmark")
    return cfg


def model_config(args: argparse.Namespace) -> ModelConfig:
    over: dict = {"max_position_embeddings": max(args.seq_len, ModelConfig.from_preset(args.preset).max_position_embeddings)}
    if args.mod:
        plan = dict(MOD_PLANS[args.mod])
        if args.mod_layers:
            plan["capacity"] = {args.mod_layers: next(iter(plan["capacity"].values()))}
        over["mod"] = plan
    return ModelConfig.from_preset(args.preset, **over)


def build(args: argparse.Namespace, cfg: ModelConfig, ds: dict):
    """-> (module, keep_alive). Both models are built partitioned (zero.Init) from the same seed."""
    torch.manual_seed(0)
    if args.model == "ours":
        with deepspeed.zero.Init(config_dict_or_path=ds):
            net = UnifiedTransformer(cfg)
        net.gradient_checkpointing = args.checkpointing
        return net, None
    from transformers import Emu3ForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    from model.hf import hf_text_config

    hf_cfg = hf_text_config(cfg, DTYPES[args.dtype])
    hf_cfg.attention_dropout = 0.0
    hf_cfg._attn_implementation = "sdpa"
    # transformers partitions at construction only while an HfDeepSpeedConfig is alive; _from_config
    # (unlike the plain constructor) enters deepspeed.zero.Init itself.
    keep = HfDeepSpeedConfig(ds)
    net = Emu3ForCausalLM._from_config(hf_cfg, attn_implementation="sdpa", dtype=DTYPES[args.dtype])
    if args.checkpointing:
        net.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    net.config.use_cache = False
    return net, keep


def loss_of(args: argparse.Namespace, engine, ids: torch.Tensor, labels: torch.Tensor, task_ids: torch.Tensor):
    """Same loss for both, each stack's own training path: mean next-token cross-entropy over supervised
    positions (HF: fp32 logits through its `ForCausalLMLoss`; ours: the head and the loss in chunks,
    model/loss.py) + our MoD routers' aux loss."""
    if args.model == "ours":
        out = engine(ids, task_ids=task_ids, labels=labels)
        return out.loss + out.aux_loss
    return engine(input_ids=ids, labels=labels, use_cache=False).loss


def max_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(args.threads)
    rss_before_build = max_rss_gib()

    from bench.mod_speed import make_batch  # the same Emu3-layout sequences as the MoD benchmark

    cfg = model_config(args)
    ds = ds_config(args, world)
    net, keep_alive = build(args, cfg, ds)
    n_params = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in net.parameters())
    partitioned = all(hasattr(p, "ds_id") for p in net.parameters())
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=device.type == "cuda")
    engine, _, _, _ = deepspeed.initialize(model=net, optimizer=opt, config=ds)

    task = args.tasks[rank % len(args.tasks)]
    ids, labels = make_batch(cfg, [task] * args.micro_batch, args.seq_len, seed=rank)
    ids, labels = ids.to(device), labels.to(device)
    task_ids = torch.full((args.micro_batch,), cfg.mod.tasks.index(task), device=device)

    times = []
    for i in range(args.warmup + args.steps):
        dist.barrier()
        t0 = time.perf_counter()
        loss = loss_of(args, engine, ids, labels, task_ids)
        engine.backward(loss)
        engine.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
        dist.all_reduce(dt, op=dist.ReduceOp.MAX)  # a ZeRO-3 step is as slow as its slowest rank
        if i >= args.warmup:
            times.append(dt.item())

    mem = torch.tensor([max_rss_gib(), rss_before_build,
                        torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0], dtype=torch.float64)
    gathered = [torch.zeros_like(mem) for _ in range(world)]
    dist.all_gather(gathered, mem)
    if rank == 0:
        med = sorted(times)[len(times) // 2]
        tokens = world * args.micro_batch * args.seq_len
        by_rank = [args.tasks[r % len(args.tasks)] for r in range(world)]
        # Useful work of the global step (no recompute credited): the MoD FLOPs for ours with a plan, counted
        # on each rank's batch (make_batch is seeded by the rank, so rank 0 rebuilds every rank's).
        positions = torch.arange(args.seq_len).expand(args.micro_batch, args.seq_len)
        flops = 0
        for r, t in enumerate(by_rank):
            ids_r, _ = make_batch(cfg, [t] * args.micro_batch, args.seq_len, seed=r)
            task_r = torch.full((args.micro_batch,), cfg.mod.tasks.index(t))
            flops += microbatch_flops(cfg, describe_microbatch(ids_r, positions, task_r, cfg)).total
        peak = peak_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
        result = {
            "model": args.model, "mod": args.mod, "preset": args.preset, "seq_len": args.seq_len,
            "micro_batch": args.micro_batch, "world_size": world, "tasks_by_rank": by_rank,
            "dtype": args.dtype, "checkpointing": args.checkpointing, "threads_per_rank": args.threads,
            "device": str(device), "parameters": n_params, "zero3_partitioned": partitioned,
            "step_times_s": times, "median_step_s": med, "min_step_s": min(times),
            "tokens_per_step": tokens, "tokens_per_s": tokens / med, "final_loss": float(loss.detach()),
            "flops_per_step": flops, "tflops_per_device": tflops_per_device(flops, med, world),
            "mfu": mfu(flops, med, world, peak) if peak else None,
            "max_rss_gib_by_rank": [g[0].item() for g in gathered],
            "rss_before_build_gib_by_rank": [g[1].item() for g in gathered],
            "gpu_max_allocated_gib_by_rank": [g[2].item() for g in gathered] if device.type == "cuda" else None,
        }
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
        print(f"[peer] {args.model}{'+' + args.mod if args.mod else ''}: median step {med:.3f} s, "
              f"{tokens / med:.0f} tokens/s, max RSS {max(g[0].item() for g in gathered):.2f} GiB", flush=True)
    del keep_alive
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
