"""The architecture's import rules (STYLE.md "The shape"), read from the source with `ast`, nothing
imported: data flows router -> prefill_worker -> kvtransfer -> decode_worker -> router, the two
workers never import each other, nothing below the gateway imports `router` or `deploy`, and the
gateway stays free of torch."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "pdserve"  # the packages live under the `pdserve` namespace
OURS = ("engine", "kernels", "proto", "kvtransfer", "prefill_worker", "decode_worker", "router", "deploy", "bench", "tests")
BELOW_THE_GATEWAY = ("engine", "kernels", "proto", "kvtransfer", "prefill_worker", "decode_worker")

# package -> packages of ours it must never import (anything it imports is allowed otherwise)
FORBIDDEN: dict[str, set[str]] = {name: {"router", "deploy"} for name in BELOW_THE_GATEWAY}
FORBIDDEN["prefill_worker"] |= {"decode_worker"}
FORBIDDEN["decode_worker"] |= {"prefill_worker"}
FORBIDDEN["router"] = {"prefill_worker", "decode_worker", "deploy"}
FORBIDDEN["kernels"] = set(OURS) - {"kernels"}  # imports nothing of ours
FORBIDDEN["engine"] = set(OURS) - {"engine", "kernels"}  # imports nothing of ours but kernels


def imported_packages(source: str, package: str) -> list[tuple[int, str, str]]:
    """(line, top-level package, as written) for every import in `source`, lazy ones in functions
    and `TYPE_CHECKING` blocks included; relative imports stay inside `package`."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, _package_of(alias.name), f"import {alias.name}") for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            names = ", ".join(alias.name for alias in node.names)
            if node.level:
                top = package
            elif module == "pdserve":  # `from pdserve import kernels`
                top = node.names[0].name
            else:
                top = _package_of(module)
            found.append((node.lineno, top, f"from {'.' * node.level}{module} import {names}"))
    return found


def _package_of(module: str) -> str:
    """`pdserve.engine.model` -> "engine"; anything else: its top-level name."""
    parts = module.split(".")
    return parts[1] if parts[0] == "pdserve" and len(parts) > 1 else parts[0]


def violations(package: str) -> list[str]:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"no Python files under {package}/"
    problems = []
    for path in files:
        for line, top, statement in imported_packages(path.read_text(), package):
            if top in FORBIDDEN[package]:
                problems.append(f"{path.relative_to(ROOT)}:{line}: {statement}")
    return problems


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_follow_the_architecture(package: str) -> None:
    problems = violations(package)
    assert not problems, f"{package} must not import {', '.join(sorted(FORBIDDEN[package]))}; found:\n  " + "\n  ".join(problems)


def test_the_checker_sees_every_kind_of_import() -> None:
    source = textwrap.dedent("""
        import os, pdserve.router.app
        from pdserve.deploy.worker_host import WorkerHost
        from . import sibling
        from .scheduler import PrefillScheduler
        if TYPE_CHECKING:
            from pdserve.decode_worker import worker
        def lazy():
            import pdserve.prefill_worker.server as server
            from pdserve import kernels
    """)
    assert imported_packages(source, "engine") == [
        (2, "os", "import os"),
        (2, "router", "import pdserve.router.app"),
        (3, "deploy", "from pdserve.deploy.worker_host import WorkerHost"),
        (4, "engine", "from . import sibling"),
        (5, "engine", "from .scheduler import PrefillScheduler"),
        (7, "decode_worker", "from pdserve.decode_worker import worker"),
        (9, "prefill_worker", "import pdserve.prefill_worker.server"),
        (10, "kernels", "from pdserve import kernels"),
    ]


def test_the_checker_finds_known_imports_in_the_real_tree() -> None:
    """Guards against a rule that passes because it reads nothing (wrong root, empty walk)."""
    host = imported_packages((ROOT / "deploy" / "worker_host.py").read_text(), "deploy")
    assert {"router", "engine", "prefill_worker", "decode_worker"} <= {top for _, top, _ in host}
    decode_server = imported_packages((ROOT / "decode_worker" / "server.py").read_text(), "decode_worker")
    assert {"kvtransfer", "proto", "engine", "decode_worker"} <= {top for _, top, _ in decode_server}


GATEWAY_MODULES = ("pdserve.router.app", "pdserve.router.disaggregated", "pdserve.router.workers", "pdserve.router.registry")


def test_the_gateway_modules_do_not_load_torch() -> None:
    """One fresh interpreter imports them in turn and names the first that brings torch in."""
    code = textwrap.dedent(f"""
        import importlib, sys
        for name in {GATEWAY_MODULES!r}:
            importlib.import_module(name)
            heavy = [m for m in ("torch", "triton") if m in sys.modules]
            if heavy:
                print(name, "loaded", ", ".join(heavy))
                break
    """)
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT.parent, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "", result.stdout.strip()
