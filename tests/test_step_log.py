"""StepLog's router scalars: counted over every step since the previous line, so a task rare in the mix shows
its routers even when the logged step itself held another task."""

from __future__ import annotations

import pytest
import torch

from train.config import RunConfig
from train.engine import StepRecord
from train.metrics import StepLog


class _Capture:
    def __init__(self) -> None:
        self.lines: list[tuple[int, dict]] = []

    def log(self, step, scalars) -> None:
        self.lines.append((step, dict(scalars)))


def _record(task: int, routable: int, selected: int, on: int, agree: int) -> StepRecord:
    routing = torch.zeros(4, 3, 4)
    routing[:, task] = torch.tensor([routable, selected, on, agree], dtype=torch.float32)
    rec = StepRecord(torch.zeros(3), torch.zeros(3), torch.zeros(()), routing)
    rec.loss_sum[task], rec.loss_count[task] = 1.0, 1.0
    rec.step_s = 0.1
    return rec


def test_router_scalars_cover_the_steps_since_the_last_line():
    cfg = RunConfig.from_dict({"model": {"preset": "debug", "mod": {"capacity": {"2-3": {"t2i": 0.25, "lm": 0.5}}}},
                               "data": {"dataset_dir": "unused", "seq_len": 64}, "logging": {"log_every": 3}})
    sink = _Capture()
    log = StepLog(sink, cfg, world_size=1, device=torch.device("cpu"))
    steps = [_record(0, 100, 25, 30, 90), _record(2, 40, 20, 10, 28), _record(0, 100, 25, 20, 96)]  # t2i, lm, t2i
    for step, rec in enumerate(steps, 1):
        log.add(rec)
        if log.due(step):
            log.write(step, rec, lr=1e-3, grad_norm=1.0, samples=4, data_counters=None)
    (step, s), = sink.lines
    assert step == 3
    # lm appeared only at step 2, yet its routers are reported; t2i sums its two steps
    assert s["mod/causal_keep/lm/layer_2"] == 10 / 40 and s["mod/agreement/lm/layer_3"] == 28 / 40
    assert s["mod/causal_keep/t2i/layer_2"] == 50 / 200 and s["mod/agreement/t2i/layer_3"] == 186 / 200
    assert s["mod/capacity/t2i/layer_2"] == 0.25 and s["mod/capacity/lm/layer_2"] == 0.5
    assert not any(k.startswith("mod/agreement/mmu") for k in s)  # mmu is not routed anywhere
    # the window starts again after a line
    log.add(_record(0, 10, 3, 5, 9))
    log.write(4, steps[0], lr=1e-3, grad_norm=1.0, samples=4, data_counters=None)
    assert sink.lines[-1][1]["mod/causal_keep/t2i/layer_2"] == 5 / 10 and "mod/causal_keep/lm/layer_2" not in sink.lines[-1][1]


def _moe_record(task: int, routed: list[float], dropped: list[float], balance: float) -> StepRecord:
    rec = _record(task, 10, 10, 10, 10)
    rec.experts = torch.zeros(4, 3, 4, 2)
    rec.experts[2:4, task, :, 0], rec.experts[2:4, task, :, 1] = torch.tensor(routed), torch.tensor(dropped)
    rec.balance_sum = torch.tensor(balance)
    return rec


def test_moe_scalars_cover_the_steps_since_the_last_line():
    cfg = RunConfig.from_dict({"model": {"preset": "debug", "moe": {"layers": "2-3", "num_experts": 4, "top_k": 2}},
                               "data": {"dataset_dir": "unused", "seq_len": 64}, "logging": {"log_every": 2}})
    sink = _Capture()
    log = StepLog(sink, cfg, world_size=1, device=torch.device("cpu"))
    steps = [_moe_record(0, [6, 2, 2, 0], [1, 0, 0, 0], 0.02), _moe_record(2, [1, 1, 1, 1], [0, 0, 0, 0], 0.04)]
    for step, rec in enumerate(steps, 1):
        log.add(rec)
        if log.due(step):
            log.write(step, rec, lr=1e-3, grad_norm=1.0, samples=4, data_counters=None)
    (step, s), = sink.lines
    # t2i appeared at step 1 only, yet is reported at step 2
    assert [s[f"moe/load/t2i/layer_3/expert_{e}"] for e in range(4)] == [0.6, 0.2, 0.2, 0.0]
    assert s["moe/max_load/t2i/layer_2"] == 0.6 * 4 and s["moe/dropped/t2i/layer_2"] == 0.1
    assert s["moe/max_load/lm/layer_3"] == 1.0 and s["moe/dropped/lm/layer_3"] == 0.0
    assert s["moe/balance_loss"] == pytest.approx(0.03)  # mean over the window's micro-batches
    assert not any(k.startswith(("moe/load/mmu", "moe/max_load/t2i/layer_1")) for k in s)
    log.add(steps[1])
    log.write(3, steps[1], lr=1e-3, grad_norm=1.0, samples=4, data_counters=None)
    assert "moe/max_load/t2i/layer_2" not in sink.lines[-1][1]  # the window starts again after a line


def test_moe_scalars_leave_the_shared_experts_out_of_the_balance():
    """Shared experts run every token; the load, the dropped share and max_load describe the routed experts."""
    cfg = RunConfig.from_dict({"model": {"preset": "debug", "moe": {"layers": "2-3", "num_experts": 4, "top_k": 1,
                                                                    "shared_experts": 2}},
                               "data": {"dataset_dir": "unused", "seq_len": 64}, "logging": {"log_every": 1}})
    sink = _Capture()
    log = StepLog(sink, cfg, world_size=1, device=torch.device("cpu"))
    rec = _moe_record(0, [10, 10, 7, 3], [0, 0, 1, 0], 0.02)  # experts 0-1 shared: every one of 10 tokens
    log.add(rec)
    log.write(1, rec, lr=1e-3, grad_norm=1.0, samples=4, data_counters=None)
    (_, s), = sink.lines
    assert [s.get(f"moe/load/t2i/layer_2/expert_{e}") for e in range(4)] == [None, None, 0.7, 0.3]
    assert s["moe/max_load/t2i/layer_2"] == pytest.approx(0.7 * 2) and s["moe/dropped/t2i/layer_2"] == 0.1
