"""Installing pdserve adds one top-level import name, `pdserve`: it installs beside packages that
own the generic names its subpackages have (proto-plus's `proto`, which every google-cloud client
imports; Hugging Face's `kernels`; any `engine`, `router`, `deploy` or `bench`) and breaks neither."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

from setuptools import find_packages

ROOT = Path(__file__).resolve().parent.parent


def test_the_distribution_has_one_top_level_package() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    packages = find_packages(str(ROOT), include=config["include"])
    assert "pdserve.engine" in packages and "pdserve.proto" in packages  # the rule finds the real tree
    assert {name.split(".")[0] for name in packages} == {"pdserve"}


def test_proto_plus_and_pdserve_work_in_one_interpreter(tmp_path: Path) -> None:
    """proto-plus (a test dependency) owns `proto`; a package named `kernels` and one named `engine`
    sit first on the path. pdserve's gateway, wire contract, kernels and engine still load, and so
    do theirs."""
    for name in ("kernels", "engine"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(f"OWNER = 'not pdserve: {name}'\n")
    code = textwrap.dedent("""
        import proto, kernels, engine
        from pdserve.proto import pdserve_pb2
        import pdserve.router.app, pdserve.kernels, pdserve.engine.sampling_params
        assert hasattr(proto, "Message"), "proto is not proto-plus"
        class Point(proto.Message):
            x = proto.Field(proto.INT32, number=1)
        assert Point(x=3).x == 3
        assert kernels.OWNER == "not pdserve: kernels" and engine.OWNER == "not pdserve: engine"
        assert pdserve_pb2.SamplingParams(n=2).n == 2 and hasattr(pdserve.kernels, "rms_norm")
        print("ok")
    """)
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "ok"
