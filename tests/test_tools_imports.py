"""The tools never import DeepSpeed at module level, and opening an HF directory never imports it at all: a CPU
laptop without a working DeepSpeed can generate, evaluate and analyse an exported model."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from tests.train_helpers import REPO

TOOLS = ["tools.generate", "tools.evaluate", "tools.export", "tools.capacity", "tools.analyze", "tools.checkpoints",
         "analysis.checkpoint"]


def _run(code: str) -> list[str]:
    """Run `code` in a fresh interpreter; -> the deepspeed modules it left in sys.modules."""
    code += "\nimport sys\nprint(sorted(m for m in sys.modules if m == 'deepspeed' or m.startswith('deepspeed.')))\n"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=180,
                         env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    return eval(out.stdout.strip().splitlines()[-1])


def test_importing_the_tools_leaves_deepspeed_out():
    assert _run("\n".join(f"import {m}" for m in TOOLS)) == []


def test_opening_an_hf_directory_leaves_deepspeed_out(tmp_path):
    code = textwrap.dedent(f"""
        import torch
        from model import ModelConfig, UnifiedTransformer
        from tools.checkpoints import open_checkpoint
        from analysis.checkpoint import load_dense

        torch.manual_seed(0)
        net = UnifiedTransformer(ModelConfig.from_preset("debug", mod={{"capacity": {{"2-3": {{"t2i": 0.5}}}}}}))
        net.save_hf({str(tmp_path / "hf")!r})
        ckpt = open_checkpoint({str(tmp_path / "hf")!r})
        assert ckpt.kind == "hf" and ckpt.step_dir is None and ckpt.run_config is None, ckpt
        for k, v in net.state_dict().items():
            torch.testing.assert_close(ckpt.model.state_dict()[k], v, rtol=0, atol=0)
        assert load_dense({str(tmp_path / "hf")!r}).net.config.mod.mod_layers() == []
    """)
    assert _run(code) == []
