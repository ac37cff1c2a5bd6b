"""Finding a checkpoint (local directory or Hugging Face Hub id) and streaming its `*.safetensors`
weights straight into a model's parameters (its identity: `engine/fingerprint.py`)."""
from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from pdserve.engine.config import ConfigError

HUB_FILE_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer*", "*.txt"]


def resolve_model_path(model: str) -> Path:
    """A local checkpoint directory for `model`: the directory itself, or a Hub snapshot."""
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(f"{model} is a directory but holds no config.json: not an HF checkpoint")
        return path
    if path.is_absolute() or model.startswith((".", "~")) or model.count("/") > 1 or path.exists():
        raise ConfigError(f"model directory {model!r} does not exist")
    return _download(model)


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILE_PATTERNS))
    except Exception as exc:  # noqa: BLE001 - hub raises many types; all mean "cannot get it"
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        hint = " (HF_HUB_OFFLINE=1 is set)" if offline else ""
        raise ConfigError(
            f"model {repo_id!r} is not a local directory and could not be fetched from the Hugging Face Hub{hint}: "
            f"{type(exc).__name__}: {exc}"
        ) from exc


def safetensors_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [model_dir / name for name in sorted(set(weight_map.values()))]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"no *.safetensors weights in {model_dir}")
    return files


def iterate_weights(model_dir: Path) -> Iterator[tuple[str, torch.Tensor]]:
    for file in safetensors_files(model_dir):
        with safe_open(file, framework="pt", device="cpu") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def load_weights(model: nn.Module, model_dir: Path) -> None:
    """Copy every checkpoint tensor into its parameter; the model maps HF names to its own
    (fused qkv / gate_up shards) through `model.load_weight(name, tensor) -> set[str]`."""
    expected = model.weight_keys()
    loaded: set[str] = set()
    for name, tensor in iterate_weights(model_dir):
        loaded |= model.load_weight(name, tensor)
    missing = expected - loaded
    if missing:
        raise ConfigError(f"checkpoint {model_dir} lacks weights: {', '.join(sorted(missing)[:8])}")


def init_random_weights(model: nn.Module, seed: int = 0) -> None:
    """Dummy weights (vLLM's `--load-format dummy`): small uniform values, norms at one."""
    generators: dict[torch.device, torch.Generator] = {}
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.data.fill_(1.0)
            continue
        if param.device not in generators:
            generators[param.device] = torch.Generator(device=param.device).manual_seed(seed)
        param.data.uniform_(-0.02, 0.02, generator=generators[param.device])
