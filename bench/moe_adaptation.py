"""The sparsity study's MoE adaptation on the demo data: the dense MLPs of a pretrained model become experts, the
model is fine-tuned with the trainer, and quality is measured at half (and a quarter) of the MLP parameters
active, against a dense fine-tune and against static width pruning at the same active parameters
(Markdown + JSON + plot).

    .venv/bin/python bench/moe_adaptation.py --seeds 0,1,2 --out bench/results/moe_adaptation_cpu.json

Every row fine-tunes train/configs/unimod_finetune.yaml (no MoD layer) from the same dense pretrained model
(`--pretrain-hf`, default: bench/unimod_recipe.py's pre-training, trained here when missing) for the same steps,
with the same data order per seed (run.seed = data.seed):

    dense_ft        the baseline: every MLP neuron active
    moe_task_k4     every MLP cut into E=8 experts (train/moe_init.py: snake partition of the neuron importance
                    from training-split calibration), top-4 routing by a task-aware router (one block of E
                    logits per task), Switch load-balancing loss 0.01: half the MLP parameters active per token
    moe_shared_k4   the same with one router shared by all tasks
    moe_task_k2     top-2 of 8: a quarter active
    moe_task_s2k2   the study's shared experts: 2 of the 8 experts (the most important quarter of the neurons) run
                    on every token, the router picks 2 of the other 6: half active, as moe_task_k4
    moe_shared_s2k2 the same with one router shared by all tasks
    prune_k4        static width pruning at moe_task_k4's active MLP width: in every MLP the half of the neurons
                    with the lowest importance (the same calibration) removed, then the same fine-tune
    prune_k2        the same at a quarter of the neurons

Every run evaluates at its end (understanding accuracy on the 180 validation digits, generation accuracy of 10
images per digit by the independent judge, text perplexity). FLOPs are each run's own count (an MoE layer's
experts for the slots they ran); active parameters are per token, without the embedding and the LM head.
Runs go `--jobs` at a time with `--threads` each, seed by seed, so an interrupted study still has whole seeds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.report import machine_info, publish, seed_panels  # noqa: E402
from bench.unimod_recipe import (FINETUNE_CONFIG, PRETRAIN_CONFIG, _fmt, _mean_sd, _run_record,  # noqa: E402
                                 _without_note, add_study_options, parse_rows_and_seeds, train)

E = 8
ROWS = {  # row -> (active experts per token (k + shared) or None, router, static width pruning, shared experts)
    "dense_ft": (None, None, False, 0),
    "moe_task_k4": (4, "task", False, 0),
    "moe_shared_k4": (4, "shared", False, 0),
    "moe_task_k2": (2, "task", False, 0),
    "moe_task_s2k2": (4, "task", False, 2),
    "moe_shared_s2k2": (4, "shared", False, 2),
    "prune_k4": (4, None, True, 0),
    "prune_k2": (2, None, True, 0),
}
BALANCE = 0.01
CALIB_SAMPLES = 64  # per task: the trainer's default checkpoint.moe_calibration_samples, for the pruning too
GOAL_GAP_PTS = 1.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs-dir", default=str(REPO / "runs" / "moe"))
    p.add_argument("--data", default=str(REPO / "demo_data"), help="demo dataset (built if it has no manifest)")
    p.add_argument("--pretrain-hf", default=None, help="the dense model to adapt (HF directory); default: "
                   "<runs-dir>/pretrain/hf, pre-trained here with train/configs/unimod_pretrain.yaml if missing")
    p.add_argument("--pretrain-steps", type=int, default=3000)
    p.add_argument("--rows", default="all", help=f"comma list of {', '.join(ROWS)}, or all")
    p.add_argument("--seeds", default="0", help="fine-tune seeds, e.g. 0,1,2 (every row runs every seed)")
    p.add_argument("--finetune-steps", type=int, default=1000)
    add_study_options(p, "moe_adaptation.json")
    args = p.parse_args(argv)
    parse_rows_and_seeds(p, args, ROWS)
    if not args.seeds or args.finetune_steps < 1 or args.jobs < 1:
        p.error("--seeds needs one seed; --finetune-steps and --jobs must be >= 1")
    args.out = args.out or str(Path(args.runs_dir) / "moe_adaptation.json")
    return args


def _finetune_cfg(data: str):
    from train.config import RunConfig

    return RunConfig.load(FINETUNE_CONFIG, [f"data.dataset_dir={data}"])


def moe_spec(active: int, router: str, layers: int, shared: int = 0) -> str:
    return (f'{{layers: "0-{layers - 1}", num_experts: {E}, top_k: {active - shared}, shared_experts: {shared}, '
            f'router: {router}, balance_loss_weight: {BALANCE}}}')


def prune_checkpoint(src: Path, dst: Path, keep: float, data: str) -> Path:
    """`src` (dense HF) with each MLP cut to its `keep` fraction of neurons of highest importance (the trainer's
    MoE calibration: train/moe_init.py `calibration_importance` on the fine-tune's training tasks), kept in index
    order, written as an HF directory with the smaller intermediate_size. Skipped when `dst` is newer than `src`."""
    import torch

    from model import UnifiedTransformer
    from train.moe_init import calibration_importance

    if (dst / "model.safetensors").exists() and \
            (dst / "model.safetensors").stat().st_mtime > (src / "model.safetensors").stat().st_mtime:
        return dst
    ft = _finetune_cfg(data)
    net = UnifiedTransformer.from_hf(src)
    cfg = net.config
    importance = calibration_importance(src, data, split="train", tasks=[t for t, w in ft.data.tasks.items() if w > 0],
                                        samples_per_task=CALIB_SAMPLES, seq_len=ft.data.seq_len, layout=cfg.vocab)
    width = round(keep * cfg.intermediate_size)
    pruned = UnifiedTransformer(cfg.replace(intermediate_size=width))
    state = net.state_dict()
    for i in range(cfg.num_hidden_layers):
        idx = torch.sort(importance[i], descending=True, stable=True).indices[:width].sort().values
        pre = f"model.layers.{i}.mlp."
        for name in ("gate_proj", "up_proj"):
            state[f"{pre}{name}.weight"] = state[f"{pre}{name}.weight"][idx]
        state[f"{pre}down_proj.weight"] = state[f"{pre}down_proj.weight"][:, idx]
    pruned.load_state_dict(state, strict=True)
    pruned.save_hf(dst)
    (dst / "pruned_from.json").write_text(json.dumps({"source": str(src), "keep": keep, "width": width,
                                                      "calibration_samples_per_task": CALIB_SAMPLES}))
    return dst


def row_overrides(row: str, seed: int, init: Path, args) -> list[str]:
    top_k, router, prune, shared = ROWS[row]
    sets = [f"run.seed={seed}", f"data.seed={seed}", *args.set]
    model = _finetune_cfg(args.data).model
    if row == "dense_ft":
        return [f"checkpoint.init_from_hf={init}", *sets]
    if prune:
        width = round(top_k / E * model.intermediate_size)
        return [f"checkpoint.init_from_hf={Path(args.runs_dir) / f'pruned_k{top_k}'}",
                f"model.intermediate_size={width}", *sets]
    return [f"checkpoint.init_from_hf={init}", f"model.moe={moe_spec(top_k, router, model.num_hidden_layers, shared)}",
            f"checkpoint.moe_calibration_samples={CALIB_SAMPLES}", *sets]


def run_all(args) -> Path:
    runs = Path(args.runs_dir)
    init = Path(args.pretrain_hf) if args.pretrain_hf else runs / "pretrain" / "hf"
    if not args.pretrain_hf:
        train("pretrain", runs / "pretrain", PRETRAIN_CONFIG, args.pretrain_steps, [],
              argparse.Namespace(**{**vars(args), "threads": args.threads * args.jobs}))
    for row in args.rows:
        top_k, _, prune, _ = ROWS[row]
        if prune:
            prune_checkpoint(init, runs / f"pruned_k{top_k}", top_k / E, args.data)
    jobs = [(f"{row}_s{seed}", row_overrides(row, seed, init, args)) for seed in args.seeds for row in args.rows]
    with ThreadPoolExecutor(args.jobs) as pool:
        for f in [pool.submit(train, name, runs / name, FINETUNE_CONFIG, args.finetune_steps, sets, args)
                  for name, sets in jobs]:
            f.result()
    return init


# ----- the table ----------------------------------------------------------------------------------------
def active_parameters(run: Path) -> dict[str, int]:
    """Parameters of a run's model (meta device, from its config.yaml): all, and active per token without the
    embedding and the LM head (an MoE layer's experts count k / E of theirs, its router in full)."""
    import torch

    from model import UnifiedTransformer
    from train.config import RunConfig

    cfg = RunConfig.load(run / "config.yaml").model
    with torch.device("meta"):
        net = UnifiedTransformer(cfg)
    outer = net.model.embed_tokens.weight.numel() + net.lm_head.weight.numel()
    return {"total": net.num_parameters(), "active_non_embedding": net.num_parameters(active=True) - outer}


def summarise(runs: Path, rows: list[str], data: str | None = None) -> dict:
    """Per row, over its finished seeds: the evaluation, FLOPs, step time, active parameters, the training's
    expert balance and (with `data`, MoE rows) the validation expert use of the exported models."""
    evaluator = None
    if data is not None:
        from tools.evaluate import EvalConfig, Evaluator

        evaluator = Evaluator(data, EvalConfig(max_samples=60))
    table = {}
    for row in rows:
        outs = sorted(p for p in runs.glob(f"{row}_s*") if p.name[len(row) + 2:].isdigit())
        outs = [o for o in outs if (o / "summary.json").exists() and json.loads((o / "summary.json").read_text())
                .get("eval")]
        if not outs:
            continue
        recs = [_run_record(o) for o in outs]
        agg = {"seeds": len(recs), "runs": recs, "params": active_parameters(outs[0])}
        for key in ("understanding", "generation", "text_ppl", "flops_actual", "step_time_median_s", "steps"):
            vals = [r[key] for r in recs if r[key] is not None]
            if vals:
                agg[key], agg[f"{key}_sd"] = _mean_sd(vals)
        moe = _expert_balance(outs)
        if moe is not None:
            agg["max_load"] = moe
            if evaluator is not None:
                agg["expert_use"] = _expert_use(outs, evaluator)
        table[row] = agg
    return table


def _expert_use(outs: list[Path], evaluator) -> dict[str, float]:
    """Mean over seeds and MoE layers of the evaluator's `experts/overlap/<a>_<b>` (how much two tasks use the same
    experts on validation samples: 1 = identically) and `experts/max_load`, from each run's HF export."""
    import torch

    from model import UnifiedTransformer

    sums: dict[str, list[float]] = {}
    for o in outs:
        if not (o / "hf").exists():
            continue
        with torch.no_grad():
            metrics = evaluator.expert_use(UnifiedTransformer.from_hf(o / "hf").eval())
        for key, value in metrics.items():
            name = key.split("/")[1] + ("/" + key.split("/")[2] if "overlap" in key else "")
            sums.setdefault(name, []).append(value)
    return {k: statistics.mean(v) for k, v in sorted(sums.items())}


def _expert_balance(outs: list[Path]) -> float | None:
    """Mean over the runs' last logged step of the busiest expert's load x E (1 = balanced, E = one expert takes
    every slot), over tasks and layers."""
    vals = []
    for o in outs:
        lines = [json.loads(x) for x in (o / "metrics.jsonl").read_text().splitlines() if x]
        last = [r for r in lines if any(k.startswith("moe/max_load/") for k in r)]
        if last:
            v = [val for k, val in last[-1].items() if k.startswith("moe/max_load/")]
            vals.append(statistics.mean(v))
    return statistics.mean(vals) if vals else None


METRICS = (("understanding", 100), ("generation", 100), ("text_ppl", 1))


def advantage(a: dict, b: dict) -> dict[str, dict[str, float | None]]:
    """Row `a`'s advantage over row `b` per metric (accuracy points a - b, perplexity b - a: positive = a is
    better), with its standard error over seeds (sqrt(sd_a^2/n_a + sd_b^2/n_b); None with one seed on either
    side): an advantage within about 2 standard errors is not one these seeds can tell."""
    out = {}
    for key, scale in METRICS:
        sign = -1 if key == "text_ppl" else 1
        sds = [a.get(f"{key}_sd"), b.get(f"{key}_sd")]
        se = None if None in sds else scale * (sds[0] ** 2 / a["seeds"] + sds[1] ** 2 / b["seeds"]) ** 0.5
        out[key] = {"diff": sign * scale * (a[key] - b[key]), "se": se}
    return out


def verdict(table: dict) -> dict:
    """The paper's claim, computed: the MoE adaptation at half the MLP parameters active stays within
    GOAL_GAP_PTS of the dense fine-tune on understanding and generation, and beats static width pruning at the
    same active parameters; plus the task-aware router against the shared one (`advantage`: positive = the
    first row is better)."""
    d = table.get("dense_ft")
    out: dict = {}
    if not d:
        return out
    for row in (r for r in ROWS if r != "dense_ft"):
        r = table.get(row)
        if not r:
            continue
        out[f"{row}_vs_dense_ft"] = advantage(r, d)
        out[f"{row}_cost_vs_dense_ft"] = {
            "flops": r["flops_actual"] / d["flops_actual"] if r.get("flops_actual") else None,
            "active_params": r["params"]["active_non_embedding"] / d["params"]["active_non_embedding"],
            "step_time": (r["step_time_median_s"] / d["step_time_median_s"]
                          if r.get("step_time_median_s") and d.get("step_time_median_s") else None)}
    if (g := out.get("moe_task_k4_vs_dense_ft")) is not None:
        out["half_active_within_goal"] = min(g["understanding"]["diff"], g["generation"]["diff"]) >= -GOAL_GAP_PTS
    for k in ("k4", "k2"):
        m, p = table.get(f"moe_task_{k}"), table.get(f"prune_{k}")
        if m and p:
            adv = out[f"moe_task_{k}_vs_prune_{k}"] = advantage(m, p)
            out[f"moe_beats_prune_{k}"] = all(x["diff"] > 2 * (x["se"] or 0.0) for x in adv.values())
    for shared_row in ("moe_task_s2k2", "moe_shared_s2k2"):  # the study's shared experts at half width
        m, p = table.get(shared_row), table.get("prune_k4")
        if m and p:
            adv = out[f"{shared_row}_vs_prune_k4"] = advantage(m, p)
            out[f"{shared_row}_beats_prune_k4"] = all(x["diff"] > 2 * (x["se"] or 0.0) for x in adv.values())
    for a, b in (("moe_task_k4", "moe_shared_k4"), ("moe_task_s2k2", "moe_shared_s2k2"), ("moe_task_s2k2", "moe_task_k4")):
        if table.get(a) and table.get(b):
            out[f"{a}_vs_{b}"] = advantage(table[a], table[b])
    return out


def _verdict_lines(v: dict) -> list[str]:
    def fmt(x: dict) -> str:
        return f"{x['diff']:+.2f}" + (f" ± {x['se']:.2f}" if x["se"] is not None else "")

    lines = []
    for key, val in v.items():
        if isinstance(val, dict) and all(isinstance(x, dict) for x in val.values()):
            lines.append(f"- {key}: " + ", ".join(f"{m} {fmt(x)}" for m, x in val.items()))
        elif isinstance(val, dict):
            lines.append(f"- {key}: " + ", ".join(f"{m} {x:.3f}" if isinstance(x, float) else f"{m} {x}"
                                                  for m, x in val.items()))
        else:
            lines.append(f"- {key}: {val}")
    return lines


def render(result: dict, png: str) -> str:
    t, v = result["table"], result["verdict"]
    lines = ["# MoE adaptation of the dense MLPs on the demo data (the sparsity study's harnessing half)", "",
             f"Command: `{result['command']}`", "",
             f"Every row fine-tunes the same dense pretrained model (`{result['pretrain_hf']}`) for "
             f"{result['finetune_steps']} steps with the same data order per seed. MoE rows: E = {E} experts per "
             f"MLP in every layer, load-balancing loss {BALANCE}, no capacity limit; experts cut by the snake "
             f"partition of the neuron importance from {CALIB_SAMPLES} training samples per task. Mean ± sample "
             "standard deviation over seeds where n > 1.", "",
             "| row | seeds | active params (non-emb.) | understanding % | generation % | text ppl | train FLOPs "
             "(TFLOP) | step median (s) | busiest expert x E |", "|---|---|---|---|---|---|---|---|---|"]
    for row, agg in t.items():
        load = f"{agg['max_load']:.2f}" if "max_load" in agg else "-"
        lines.append(f"| {row} | {agg['seeds']} | {agg['params']['active_non_embedding'] / 1e6:.3f} M | "
                     f"{_fmt(agg, 'understanding', 100)} | {_fmt(agg, 'generation', 100)} | "
                     f"{_fmt(agg, 'text_ppl', digits=3)} | {_fmt(agg, 'flops_actual', 1e-12, 2)} | "
                     f"{_fmt(agg, 'step_time_median_s', digits=3)} | {load} |")
    use = {row: agg["expert_use"] for row, agg in t.items() if agg.get("expert_use")}
    if use:
        pairs = sorted({k for u in use.values() for k in u if k.startswith("overlap/")})
        lines += ["", "Expert use on 60 validation samples per task (the evaluator's `experts/*`, exported models, mean "
                  "over seeds and layers): overlap of two tasks' expert shares (1 = the same experts alike), and the "
                  "busiest expert's share x E.", "",
                  "| row | " + " | ".join(p.removeprefix("overlap/").replace("_", " / ") for p in pairs) +
                  " | busiest x E |", "|---|" + "---|" * (len(pairs) + 1)]
        for row, u in use.items():
            lines.append(f"| {row} | " + " | ".join(f"{u[p]:.3f}" for p in pairs) + f" | {u.get('max_load', 0):.2f} |")
    lines += ["", f"Verdict (computed, not asserted): the claim is that the MoE adaptation at half the MLP "
              f"parameters active (moe_task_k4) stays within {GOAL_GAP_PTS} point of the dense fine-tune on "
              "understanding and generation, and beats static width pruning at the same active parameters. `A_vs_B`: A's "
              "advantage over B, positive = A better (accuracy points A - B; perplexity B - A), ± its standard error "
              "over seeds; `moe_beats_prune_*` asks for an advantage on all three larger than 2 standard errors.", ""]
    lines += _verdict_lines(v)
    if result.get("note"):
        lines += ["", result["note"]]
    lines += ["", f"![moe adaptation]({png})"]
    return "\n".join(lines)


def draw(table: dict, png: Path) -> None:
    params = {id(r): agg["params"]["active_non_embedding"] / 1e6 for agg in table.values() for r in [agg, *agg["runs"]]}
    seed_panels(png, table, [("understanding", "understanding accuracy (%)", 100),
                             ("generation", "generation accuracy, judge (%)", 100), ("text_ppl", "text perplexity", 1)],
                lambda r: params.get(id(r)), "active parameters per token, non-embedding (M)",
                "MoE adaptation vs dense fine-tune vs static width pruning")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    runs = Path(args.runs_dir)
    t0 = time.perf_counter()
    init = Path(args.pretrain_hf) if args.pretrain_hf else runs / "pretrain" / "hf"
    if not args.report_only:
        init = run_all(args)
    table = summarise(runs, args.rows, args.data)
    result = {"command": " ".join(["bench/moe_adaptation.py",
                                   *_without_note(argv if argv is not None else sys.argv[1:])]),
              "pretrain_hf": str(init), "finetune_steps": args.finetune_steps, "num_experts": E,
              "balance_loss_weight": BALANCE, "calibration_samples_per_task": CALIB_SAMPLES,
              "table": table, "verdict": verdict(table), "wall_s": time.perf_counter() - t0,
              "machine": machine_info(), "note": args.note}
    publish(args.out, result, lambda png: draw(table, png), render)
    return result


if __name__ == "__main__":
    main()
