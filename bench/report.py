"""Shared helpers of the bench scripts: a description of the machine a number was measured on, and
writing Markdown reports (every result file says where it came from)."""

from __future__ import annotations

import gc
import json
import os
import platform
import resource
import subprocess
from pathlib import Path


def load_average() -> list[float]:
    """1/5/15-minute load: on a shared 2-core machine, the context every timing needs."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def machine_info() -> dict[str, object]:
    import torch

    info: dict[str, object] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average_1_5_15": load_average(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        keep = ("Architecture", "Model name", "CPU(s)", "Thread(s) per core", "Core(s) per socket", "L2 cache",
                "L3 cache", "Flags")
        for line in lscpu.splitlines():
            key, _, val = line.partition(":")
            if key.strip() in keep:
                val = val.strip()
                if key.strip() == "Flags":  # only the SIMD flags that decide matmul/attention kernels
                    val = " ".join(f for f in val.split() if f.startswith(("avx", "amx", "fma")))
                info[f"lscpu {key.strip()}"] = val
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        mem_kib = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                       if line.startswith("MemTotal"))
        info["memory_gib"] = round(mem_kib / 2**20, 1)
    except (OSError, StopIteration):
        pass
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("deepspeed", "transformers"):  # metadata only: importing deepspeed costs seconds
        try:
            info[dist] = version(dist)
        except PackageNotFoundError:
            pass
    return info


def write_markdown(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text if text.endswith("\n") else text + "\n")


def publish(out: str | Path, result: dict, draw, render) -> str:
    """Write a benchmark's three artefacts side by side: `out` (JSON), `out`.png (`draw(png_path)`) and
    `out`.md (`render(result, png_name)`); print and return the Markdown."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    png = out.with_suffix(".png")
    draw(png)
    text = render(result, png.name)
    write_markdown(out.with_suffix(".md"), text)
    print(text)
    return text


def bar_panels(png: str | Path, names: list[str], panels: list[tuple[str, list[float]]], colours: list[str],
               height: float = 3.3, label_rotation: float = 0.0) -> None:
    """One PNG of side-by-side bar charts over the same `names`, one per (title, values) panel, each bar labelled
    with its value (the benches' comparison plots)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(12, height))
    for ax, (title, vals) in zip(axes, panels):
        ax.bar(names, vals, color=colours)
        ax.set_title(title, fontsize=10)
        if label_rotation:
            ax.tick_params(axis="x", labelrotation=label_rotation, labelsize=8)
        for i, v in enumerate(vals):
            ax.text(i, v, f"{v:.3g}", ha="center", va="bottom", fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def seed_panels(png: str | Path, table: dict, panels: list[tuple[str, str, float]], x_of, xlabel: str,
                title: str) -> None:
    """One PNG of side-by-side panels, one per (metric key, axis label, scale): each row of `table` ({row: {metric:
    mean, metric_sd: sd, runs: [per-seed records]}}) as a mean with its seed spread, its seeds as grey dots.
    `x_of(record)` places a row (its mean record) and each seed (its run record) on the x axis; None leaves it out."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4.7 * len(panels), 4.2))
    for ax, (key, label, scale) in zip(axes, panels):
        for row, agg in table.items():
            x = x_of(agg)
            if key not in agg or x is None:
                continue
            ax.errorbar(x, scale * agg[key], yerr=scale * (agg.get(f"{key}_sd") or 0), fmt="o", capsize=3, label=row)
            for r in agg["runs"]:
                if r.get(key) is not None and x_of(r) is not None:
                    ax.plot(x_of(r), scale * r[key], ".", color="grey", alpha=0.5)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize=7)
    fig.suptitle(f"{title} (dots: single seeds)")
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


# ----- memory of this process (the benches' peak-memory probes run one measurement per fresh process) -----
def status_kib(field: str) -> int:
    """A field of /proc/self/status in KiB (Linux: VmRSS, VmHWM, ...); OSError elsewhere."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {field}")


def rss_kib() -> int:
    """The resident set now (Linux), else the process's peak so far (all getrusage can tell)."""
    try:
        return status_kib("VmRSS")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux: writing 5 to /proc/self/clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def release_free_heap() -> None:
    """Give the heap's free pages back to the OS (glibc malloc_trim), so the RSS is the memory in use."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
