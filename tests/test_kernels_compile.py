"""Every launch the kernel wrappers make compiles for a real GPU (sm_90), checked on the CPU: the CPU
tests run the kernels in Triton's interpreter, which never type-checks a branch that a launch does
not take, so a kernel can pass them all and still fail to compile on the GPU (an atomic on the
placeholder pointer a one-split launch passes did: tests/kernel_compile.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


def _has_ptxas() -> bool:
    try:
        import triton.backends.nvidia as nvidia
    except ImportError:
        return False
    return (Path(nvidia.__file__).parent / "bin" / "ptxas").exists()


@pytest.mark.skipif(not _has_ptxas(), reason="this Triton has no NVIDIA backend with ptxas")
@pytest.mark.parametrize("kernels", ["rotary_decode_attention", "paged_decode_attention", "w4", "gemv", "dequantize"])
def test_every_launch_compiles_for_sm90(kernels: str, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # compiled here, not found in a cache
    done = subprocess.run(
        [sys.executable, "-m", "tests.kernel_compile", kernels],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert results, done.stderr[-3000:]
    failed = [r for r in results if not r["ok"]]
    assert not failed, "\n\n".join(f"{r['case']} (grid {r['grid']}):\n{r['error']}" for r in failed)
    if kernels != "gemv":  # the split kernels: one split and several (the grid's last axis)
        assert any(r["grid"][-1] == 1 for r in results) and any(r["grid"][-1] > 1 for r in results), results
