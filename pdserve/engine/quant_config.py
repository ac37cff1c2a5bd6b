"""Weight quantization settings: a checkpoint's `quantization_config` (fp8, compressed-tensors 8-bit,
awq, gptq) or the `--quantization` flag, parsed into one frozen `QuantConfig`. Anything pdserve
cannot honour exactly is refused here, by name, before a byte is loaded."""

from __future__ import annotations

import re
from dataclasses import dataclass

from pdserve.engine.config import ConfigError

ONLINE_METHODS = ("fp8", "int8")  # what `--quantization` can apply to an unquantized checkpoint


@dataclass(frozen=True)
class QuantConfig:
    """`scheme`: how the engine holds the weights ("fp8" or "int8": 8 bits with one scale per
    output channel; "w4": 4 bits, a scale and a zero point per group of `group_size` inputs).
    `checkpoint_format`: which tensors the checkpoint holds ("online": plain weights quantized at
    load, "fp8", "compressed-tensors", "awq", "gptq", "gptq_v2"). `ignore`: HF module names (or
    "re:" patterns) that stay unquantized."""

    scheme: str
    checkpoint_format: str
    group_size: int = 0
    is_symmetric: bool = True
    ignore: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        assert self.scheme in ("fp8", "int8", "w4"), self.scheme
        if self.scheme == "w4" and self.group_size != -1 and (self.group_size < 16 or self.group_size % 16):
            raise ConfigError(f"4-bit group_size must be a multiple of 16 (or -1: whole rows); got {self.group_size}")

    @property
    def name(self) -> str:
        """What `--quantization` calls it."""
        return "online-" + self.scheme if self.checkpoint_format == "online" else self.checkpoint_format

    def is_ignored(self, hf_module: str) -> bool:
        for pattern in self.ignore:
            if pattern.startswith("re:") and re.match(pattern[3:], hf_module):
                return True
            if hf_module == pattern or hf_module.endswith("." + pattern):
                return True
        return False


def parse_quantization_config(hf: dict | None) -> QuantConfig | None:
    """The checkpoint's `quantization_config` (from config.json), or None when it has none."""
    if not hf:
        return None
    method = hf.get("quant_method")
    parsers = {"fp8": _parse_fp8, "compressed-tensors": _parse_compressed_tensors, "awq": _parse_awq, "gptq": _parse_gptq}
    if method not in parsers:
        raise ConfigError(f"quantization_config quant_method {method!r} is not supported (supported: {', '.join(parsers)})")
    return parsers[method](hf)


def resolve_quantization(checkpoint: QuantConfig | None, flag: str | None, is_dummy: bool) -> QuantConfig | None:
    """What the engine runs: the checkpoint's format; `--quantization fp8|int8` on an unquantized
    checkpoint quantizes it at load; with `--load-format dummy`, any method on random weights."""
    if flag is None:
        return checkpoint
    if checkpoint is not None:
        if flag != checkpoint.checkpoint_format.removesuffix("_v2"):
            raise ConfigError(
                f"--quantization {flag} was asked for, but the checkpoint is quantized with {checkpoint.checkpoint_format}"
            )
        return checkpoint
    if flag in ONLINE_METHODS:
        return QuantConfig(scheme=flag, checkpoint_format="online")
    if not is_dummy:
        raise ConfigError(
            f"--quantization {flag} needs a checkpoint quantized with {flag} (its config.json has no quantization_config); "
            f"an unquantized checkpoint can be quantized at load with {' or '.join(ONLINE_METHODS)}"
        )
    if flag == "compressed-tensors":
        return QuantConfig(scheme="fp8", checkpoint_format="compressed-tensors")
    return QuantConfig(scheme="w4", checkpoint_format=flag, group_size=128, is_symmetric=flag == "gptq")


def _parse_fp8(hf: dict) -> QuantConfig:
    """`quant_method: fp8` (Neural Magic / Red Hat, transformers' FP8): e4m3 weights with one
    `weight_scale` per tensor; activation scales are taken per token at run time instead."""
    if hf.get("weight_block_size"):
        raise ConfigError(
            f"quantization_config weight_block_size {hf['weight_block_size']} (block-wise FP8) is not supported; per-tensor and per-channel FP8 are"
        )
    _check_choice(hf, "activation_scheme", ("static", "dynamic", None))
    return QuantConfig(scheme="fp8", checkpoint_format="fp8", ignore=tuple(hf.get("ignored_layers") or ()))


def _parse_compressed_tensors(hf: dict) -> QuantConfig:
    """compressed-tensors (llm-compressor) with 8-bit symmetric weights, per channel or per tensor:
    `float-quantized` (fp8) or `int-quantized` (int8). One config group targeting Linear."""
    fmt = hf.get("format")
    if fmt not in ("float-quantized", "int-quantized", "naive-quantized"):
        raise ConfigError(f"compressed-tensors format {fmt!r} is not supported (supported: float-quantized, int-quantized)")
    if hf.get("kv_cache_scheme"):
        raise ConfigError("compressed-tensors kv_cache_scheme is not supported with quantized weights in this build")
    groups = hf.get("config_groups") or {}
    if len(groups) != 1:
        raise ConfigError(f"compressed-tensors config_groups must hold exactly one group; got {sorted(groups)}")
    ((name, group),) = groups.items()
    if group.get("targets") != ["Linear"]:
        raise ConfigError(
            f"compressed-tensors config_groups.{name}.targets {group.get('targets')} is not supported (supported: ['Linear'])"
        )
    weights = group.get("weights") or {}
    where = f"compressed-tensors config_groups.{name}.weights"
    kind = weights.get("type")
    if weights.get("num_bits") != 8 or kind not in ("float", "int"):
        raise ConfigError(
            f"{where}: {weights.get('num_bits')}-bit {kind} weights are not supported (supported: 8-bit float or int)"
        )
    if weights.get("strategy") not in ("channel", "tensor"):
        raise ConfigError(f"{where}.strategy {weights.get('strategy')!r} is not supported (supported: channel, tensor)")
    if not weights.get("symmetric", True) or weights.get("dynamic"):
        raise ConfigError(f"{where}: only static symmetric weight scales are supported")
    return QuantConfig(
        scheme="fp8" if kind == "float" else "int8", checkpoint_format="compressed-tensors", ignore=tuple(hf.get("ignore") or ())
    )


def _parse_awq(hf: dict) -> QuantConfig:
    """AutoAWQ's GEMM checkpoints: qweight [in, out / 8] (interleaved nibbles), qzeros, scales."""
    _check_choice(hf, "version", ("gemm", "GEMM", None))
    _check_choice(hf, "bits", (4, None), key_name="w_bit" if "w_bit" in hf else "bits")
    group_size = int(hf.get("group_size", hf.get("q_group_size", 128)))
    # AutoAWQ skips every module whose name contains one of these
    ignore = tuple(f"re:.*{re.escape(name)}" for name in hf.get("modules_to_not_convert") or ())
    return QuantConfig(
        scheme="w4", checkpoint_format="awq", group_size=group_size, is_symmetric=not hf.get("zero_point", True), ignore=ignore
    )


def _parse_gptq(hf: dict) -> QuantConfig:
    """AutoGPTQ / GPTQModel: qweight [in / 8, out], qzeros (+1 offset in the classic format), scales, g_idx."""
    _check_choice(hf, "bits", (4,))
    if hf.get("desc_act"):
        raise ConfigError(
            "gptq desc_act=True (act-order: rows of a group scattered by g_idx) is not supported; use a desc_act=False checkpoint"
        )
    if hf.get("lm_head"):
        raise ConfigError("gptq lm_head=True (a quantized LM head) is not supported")
    _check_choice(hf, "checkpoint_format", ("gptq", "gptq_v2", None))
    fmt = "gptq_v2" if hf.get("checkpoint_format") == "gptq_v2" else "gptq"
    return QuantConfig(
        scheme="w4", checkpoint_format=fmt, group_size=int(hf.get("group_size", 128)), is_symmetric=bool(hf.get("sym", True))
    )


def _check_choice(hf: dict, key: str, allowed: tuple, key_name: str | None = None) -> None:
    key_name = key_name or key
    if hf.get(key_name) not in allowed:
        shown = ", ".join(str(a) for a in allowed if a is not None)
        raise ConfigError(f"quantization_config {key_name}={hf.get(key_name)!r} is not supported (supported: {shown})")
