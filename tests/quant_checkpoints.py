"""Quantized checkpoints for the tests, written from the formats' published descriptions and
independent of the engine's code: a round-to-nearest quantizer and packer per format (what
llm-compressor / AutoAWQ / AutoGPTQ write, minus their calibration), and a dequantizer per format
that reads the packed tensors back with numpy bit operations.

- fp8 (quant_method "fp8", Neural Magic): `weight` float8_e4m3fn [N, K], `weight_scale` fp32 scalar,
  W = weight * weight_scale; `input_scale` scalar (static activation scheme).
- compressed-tensors (`float-quantized` / `int-quantized`): `weight` fp8 or int8 [N, K] and
  `weight_scale` [N, 1] ("channel") or [1] ("tensor") in the checkpoint's dtype.
- awq (GEMM): `qweight` int32 [K, N / 8], nibble i of word j holds column 8 j + [0, 2, 4, 6, 1, 3, 5, 7][i];
  `qzeros` int32 [K / g, N / 8] packed alike; `scales` fp16 [K / g, N]; W = (q - z) * s.
- gptq: `qweight` int32 [K / 8, N], nibble j of row i holds input 8 i + j; `qzeros` int32 [K / g, N / 8]
  holding z - 1 (nibble j of word c: column 8 c + j); `scales` fp16 [K / g, N]; `g_idx` [K]; W = (q - z) * s.
  `checkpoint_format: gptq_v2` stores z itself. group_size -1: one group of the whole row (K inputs)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]
GROUP = 128
E4M3_MAX = 448.0


def _ct_config(fmt: str, kind: str, strategy: str) -> dict:
    weights = {"num_bits": 8, "type": kind, "strategy": strategy, "symmetric": True, "dynamic": False, "group_size": None}
    activations = {"num_bits": 8, "type": kind, "strategy": "token", "symmetric": True, "dynamic": True}
    return {
        "quant_method": "compressed-tensors",
        "format": fmt,
        "quantization_status": "compressed",
        "ignore": ["lm_head"],
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": activations}},
        "kv_cache_scheme": None,
    }


def _awq_config(group_size: int) -> dict:
    return {"quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": True, "version": "gemm"}


def _gptq_config(symmetric: bool, group_size: int = GROUP, checkpoint_format: str = "gptq") -> dict:
    return {
        "quant_method": "gptq",
        "bits": 4,
        "group_size": group_size,
        "desc_act": False,
        "sym": symmetric,
        "checkpoint_format": checkpoint_format,
    }


CONFIGS = {
    "fp8": {"quant_method": "fp8", "activation_scheme": "static"},
    "fp8-channel-dynamic": {"quant_method": "fp8", "activation_scheme": "dynamic"},
    "ct-fp8-channel": _ct_config("float-quantized", "float", "channel"),
    "ct-fp8-tensor": _ct_config("float-quantized", "float", "tensor"),
    "ct-int8-channel": _ct_config("int-quantized", "int", "channel"),
    "ct-int8-tensor": _ct_config("int-quantized", "int", "tensor"),
    "awq": _awq_config(GROUP),
    "awq-g64": _awq_config(64),
    "gptq-sym": _gptq_config(symmetric=True),
    "gptq-asym": _gptq_config(symmetric=False),
    "gptq-v2": _gptq_config(symmetric=False, checkpoint_format="gptq_v2"),
    "gptq-g64": _gptq_config(symmetric=True, group_size=64),
    "gptq-whole-rows": _gptq_config(symmetric=False, group_size=-1),
}


# -- quantizers (HF weight [N, K] float32 -> the format's tensors) -------------------------------
def _fp8_tensor(w: torch.Tensor) -> dict[str, torch.Tensor]:
    scale = w.abs().max() / E4M3_MAX
    return {"weight": (w / scale).to(torch.float8_e4m3fn), "weight_scale": scale.reshape(()), "input_scale": torch.tensor(0.02)}


def _fp8_channel(w: torch.Tensor) -> dict[str, torch.Tensor]:
    """A scale per output channel (fp32 [N]); dynamic activations: no input_scale."""
    scale = w.abs().amax(dim=1) / E4M3_MAX
    return {"weight": (w / scale[:, None]).to(torch.float8_e4m3fn), "weight_scale": scale}


def _ct_8bit(dtype: torch.dtype, per_channel: bool) -> Callable[[torch.Tensor], dict[str, torch.Tensor]]:
    def quantize(w: torch.Tensor) -> dict[str, torch.Tensor]:
        limit = E4M3_MAX if dtype == torch.float8_e4m3fn else 127.0
        amax = w.abs().amax(dim=1, keepdim=True) if per_channel else w.abs().max().reshape(1)
        scale = (amax / limit).to(torch.bfloat16)  # llm-compressor stores scales in the model's dtype
        scaled = w / scale.float()
        scaled = scaled.round() if dtype == torch.int8 else scaled
        return {"weight": scaled.clamp(-limit, limit).to(dtype), "weight_scale": scale}

    return quantize


def _rtn_int4(w: torch.Tensor, symmetric: bool, group: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Round to nearest per group of `group` inputs (-1: the whole row): (q [K, N], zeros [K / g, N]
    ints, scales fp16 [K / g, N])."""
    n, k = w.shape
    group = k if group == -1 else group
    groups = w.reshape(n, k // group, group).double()
    if symmetric:  # GPTQ sym: the grid centred at 8, scale 2 max|w| / 15
        scale = (2 * groups.abs().amax(-1) / 15).half()
        zero = torch.full(scale.shape, 8.0, dtype=torch.float64)
    else:
        low, high = groups.amin(-1).clamp(max=0), groups.amax(-1).clamp(min=0)
        scale = ((high - low) / 15).half()
        zero = (-low / scale.double()).round().clamp(0, 15)
    q = (groups / scale.double()[..., None]).round() + zero[..., None]
    q = q.clamp(0, 15).reshape(n, k).long()
    return q.t().numpy(), zero.long().t().numpy(), scale.t().contiguous()


def pack_along_columns(values: np.ndarray, order: list[int]) -> torch.Tensor:
    """[R, C] nibbles -> int32 [R, C / 8]: nibble i of word j holds column 8 j + order[i]."""
    values = values.astype(np.uint32) & 0xF
    words = np.zeros((values.shape[0], values.shape[1] // 8), dtype=np.uint32)
    for i, column in enumerate(order):
        words |= values[:, column::8] << np.uint32(4 * i)
    return torch.from_numpy(words.view(np.int32))


def _pack_along_rows(values: np.ndarray) -> torch.Tensor:
    """[K, N] nibbles -> int32 [K / 8, N]: nibble j of row i holds row 8 i + j."""
    values = values.astype(np.uint32)
    words = np.zeros((values.shape[0] // 8, values.shape[1]), dtype=np.uint32)
    for j in range(8):
        words |= values[j::8] << np.uint32(4 * j)
    return torch.from_numpy(words.view(np.int32))


def _awq(group: int) -> Callable[[torch.Tensor], dict[str, torch.Tensor]]:
    def quantize(w: torch.Tensor) -> dict[str, torch.Tensor]:
        q, zero, scale = _rtn_int4(w, symmetric=False, group=group)
        return {"qweight": pack_along_columns(q, AWQ_ORDER), "qzeros": pack_along_columns(zero, AWQ_ORDER), "scales": scale}

    return quantize


def _gptq(symmetric: bool, group: int = GROUP, v2: bool = False) -> Callable[[torch.Tensor], dict[str, torch.Tensor]]:
    def quantize(w: torch.Tensor) -> dict[str, torch.Tensor]:
        q, zero, scale = _rtn_int4(w, symmetric, group)
        k = q.shape[0]
        return {
            "qweight": _pack_along_rows(q),
            "qzeros": pack_along_columns(zero if v2 else zero - 1, list(range(8))),
            "scales": scale,
            "g_idx": torch.arange(k, dtype=torch.int32) // (k if group == -1 else group),
        }

    return quantize


QUANTIZERS = {
    "fp8": _fp8_tensor,
    "fp8-channel-dynamic": _fp8_channel,
    "ct-fp8-channel": _ct_8bit(torch.float8_e4m3fn, per_channel=True),
    "ct-fp8-tensor": _ct_8bit(torch.float8_e4m3fn, per_channel=False),
    "ct-int8-channel": _ct_8bit(torch.int8, per_channel=True),
    "ct-int8-tensor": _ct_8bit(torch.int8, per_channel=False),
    "awq": _awq(GROUP),
    "awq-g64": _awq(64),
    "gptq-sym": _gptq(symmetric=True),
    "gptq-asym": _gptq(symmetric=False),
    "gptq-v2": _gptq(symmetric=False, v2=True),
    "gptq-g64": _gptq(symmetric=True, group=64),
    "gptq-whole-rows": _gptq(symmetric=False, group=-1),
}


# -- dequantizers (the format's tensors -> W [N, K] float64) -------------------------------------
def unpack_columns(words: torch.Tensor, order: list[int]) -> np.ndarray:
    words = words.numpy().view(np.uint32)
    out = np.zeros((words.shape[0], words.shape[1] * 8), dtype=np.int64)
    for i, column in enumerate(order):
        out[:, column::8] = (words >> np.uint32(4 * i)) & 0xF
    return out


def _unpack_rows(words: torch.Tensor) -> np.ndarray:
    words = words.numpy().view(np.uint32)
    out = np.zeros((words.shape[0] * 8, words.shape[1]), dtype=np.int64)
    for j in range(8):
        out[j::8] = (words >> np.uint32(4 * j)) & 0xF
    return out


def dequantize(fmt: str, tensors: dict[str, torch.Tensor]) -> np.ndarray:
    if fmt.startswith(("fp8", "ct-")):
        scale = tensors["weight_scale"].double().numpy().reshape(-1, 1)  # [N, 1] or [1, 1]
        return tensors["weight"].double().numpy() * scale
    if fmt.startswith("awq"):
        q, zero = unpack_columns(tensors["qweight"], AWQ_ORDER), unpack_columns(tensors["qzeros"], AWQ_ORDER)
    else:
        stored = unpack_columns(tensors["qzeros"], list(range(8)))
        q, zero = _unpack_rows(tensors["qweight"]), stored if fmt == "gptq-v2" else stored + 1
    scale = tensors["scales"].double().numpy()
    group_of_row = np.arange(q.shape[0]) // (q.shape[0] // scale.shape[0])  # K / (K / group)
    return ((q - zero[group_of_row]) * scale[group_of_row]).T


# -- checkpoints ---------------------------------------------------------------------------------
def write_quantized_checkpoint(source: Path, target: Path, fmt: str) -> dict[str, np.ndarray]:
    """`source` (an unquantized HF checkpoint) with every decoder projection quantized as `fmt`;
    returns each projection's dequantized weight (HF module name -> [N, K])."""
    shutil.copytree(source, target)
    tensors = load_file(source / "model.safetensors")
    out, dequantized = {}, {}
    for name, tensor in tensors.items():
        module, _, kind = name.rpartition(".")
        if kind == "weight" and module.rpartition(".")[2] in PROJECTIONS:
            packed = QUANTIZERS[fmt](tensor.float())
            out |= {f"{module}.{k}": v.contiguous() for k, v in packed.items()}
            dequantized[module] = dequantize(fmt, packed)
        else:
            out[name] = tensor
    save_file(out, target / "model.safetensors")
    edit_config(target, quantization_config=CONFIGS[fmt])
    return dequantized


def edit_config(directory: Path, **changes: object) -> None:
    path = directory / "config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | changes, indent=2))


def edit_tensors(directory: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    tensors = load_file(directory / "model.safetensors")
    edit(tensors)
    save_file(tensors, directory / "model.safetensors")
