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

from pdserve.engine.config import ConfigError, EngineConfig

HUB_FILE_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer*", "*.txt"]


def resolve_model_path(model: str, revision: str | None = None, cache_dir: str | None = None) -> Path:
    """A local checkpoint directory for `model`: the directory itself, or a Hub snapshot (of
    `revision`: a branch, tag or commit; None: the default branch) in `cache_dir` (None: HF's cache)."""
    return _resolve(model, revision, cache_dir, "config.json", HUB_FILE_PATTERNS, "model", "an HF checkpoint")


def resolve_tokenizer_path(tokenizer: str, revision: str | None = None, cache_dir: str | None = None) -> Path:
    """A local directory holding `tokenizer`'s tokenizer.json (vLLM's --tokenizer: a model's tokenizer
    from elsewhere), or a Hub snapshot of a repository's tokenizer files and chat template only."""
    return _resolve(tokenizer, revision, cache_dir, "tokenizer.json", TOKENIZER_FILE_PATTERNS, "tokenizer", "a fast tokenizer")


def tokenizer_dir(config: EngineConfig, model_dir: str | Path) -> Path:
    """Where an engine's tokenizer is: `config.tokenizer`'s directory, else the model's."""
    if config.tokenizer is None:
        return Path(model_dir)
    return resolve_tokenizer_path(config.tokenizer, config.tokenizer_revision, config.download_dir)


TOKENIZER_FILE_PATTERNS = ["tokenizer*", "special_tokens_map.json", "chat_template.json", "*.jinja", "generation_config.json"]


def _resolve(
    name: str, revision: str | None, cache_dir: str | None, required: str, patterns: list[str], what: str, kind: str
) -> Path:
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / required).is_file():
            raise ConfigError(f"{name} is a directory but holds no {required}: not {kind}")
        if revision is not None:
            raise ConfigError(f"revision {revision!r} is for a Hub id; {name} is a local directory")
        return path
    if path.is_absolute() or name.startswith((".", "~")) or name.count("/") > 1 or path.exists():
        raise ConfigError(f"{what} directory {name!r} does not exist")
    return _download(name, revision, cache_dir, patterns, what)


def _download(repo_id: str, revision: str | None, cache_dir: str | None, patterns: list[str], what: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, allow_patterns=patterns))
    except Exception as exc:  # noqa: BLE001 - hub raises many types; all mean "cannot get it"
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        hint = " (HF_HUB_OFFLINE=1 is set)" if offline else ""
        raise ConfigError(
            f"{what} {repo_id!r} is not a local directory and could not be fetched from the Hugging Face Hub{hint}: "
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
        loaded |= model.load_weight(name, tensor)  # raises ConfigError naming a tensor it has no place for
    missing = expected - loaded
    if missing:
        more = f" and {len(missing) - 8} more" if len(missing) > 8 else ""
        raise ConfigError(f"checkpoint {model_dir} lacks tensors: {', '.join(sorted(missing)[:8])}{more}")


def init_random_weights(model: nn.Module, seed: int = 0) -> None:
    """Dummy weights (vLLM's `--load-format dummy`): small uniform values, norms at one;
    quantized layers draw their own (`init_random_`)."""
    generators: dict[torch.device, torch.Generator] = {}

    def generator(device: torch.device) -> torch.Generator:
        if device not in generators:
            generators[device] = torch.Generator(device=device).manual_seed(seed)
        return generators[device]

    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.data.fill_(1.0)
        else:
            param.data.uniform_(-0.02, 0.02, generator=generator(param.device))
    for module in model.modules():
        if hasattr(module, "init_random_"):
            module.init_random_(generator(next(module.buffers()).device))
