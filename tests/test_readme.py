"""The README's two set-up commands are the ones CI runs and that work: `.ci/run` calls the test
command verbatim, and the CLI's demo-model command writes a checkpoint transformers loads."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def readme_commands() -> list[str]:
    block = re.search(r"## Set-up: two commands.*?```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert block, "README has no set-up block"
    return [line for line in block.group(1).splitlines() if line and not line.startswith("#")]


def test_readme_has_exactly_two_setup_commands_and_ci_runs_the_test_command() -> None:
    install_and_serve, install_and_test = readme_commands()
    assert install_and_serve.endswith("pdserve serve")
    assert "pytest" in install_and_test
    assert install_and_test in (ROOT / ".ci" / "run").read_text().splitlines()


def test_demo_model_command_writes_a_loadable_checkpoint(tmp_path: Path) -> None:
    import transformers

    result = subprocess.run(
        [sys.executable, "-m", "pdserve.deploy.cli", "demo-model", str(tmp_path / "demo")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "demo")
    assert model.config.architectures == ["LlamaForCausalLM"]
