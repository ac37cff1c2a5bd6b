"""Per-layer fp8 KV cache scales from a checkpoint: the scalars `model.layers.{i}.self_attn.k_scale`
/ `v_scale` (vLLM's names, as llm-compressor and ModelOpt write them), 1.0 for a layer that has
none (vLLM's default). The weight loader skips these names; only an fp8 cache reads them."""

from __future__ import annotations

import re
from pathlib import Path

from safetensors import safe_open

from pdserve.engine.config import ConfigError
from pdserve.engine.loader import safetensors_files

_SCALE_NAME = re.compile(r"^model\.layers\.(\d+)\.self_attn\.([kv])_scale$")


def read_kv_scales(model_dir: Path, num_layers: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(K scales, V scales), one per layer; raises ConfigError naming a scale that is not a positive
    finite scalar or belongs to no layer."""
    scales = {"k": [1.0] * num_layers, "v": [1.0] * num_layers}
    for path in safetensors_files(model_dir):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - a safetensors handle, not a dict
                match = _SCALE_NAME.match(name)
                if match is None:
                    continue
                layer, kind = int(match.group(1)), match.group(2)
                value = f.get_tensor(name).float()
                if layer >= num_layers or value.numel() != 1 or not 0.0 < value.item() < float("inf"):
                    raise ConfigError(
                        f"KV scale {name} must be a positive finite scalar of a layer < {num_layers}, got {value.tolist()}"
                    )
                scales[kind][layer] = value.item()
    return tuple(scales["k"]), tuple(scales["v"])
