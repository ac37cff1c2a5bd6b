"""Quantized replacements of `Linear` / `MergedLinear`: `W8Linear` (fp8 or int8, a scale per
output channel) and `W4Linear` (4 bits, a scale and zero point per group of inputs). Each loads
its checkpoint format shard by shard into its output rows, so fused q/k/v and gate/up keep one
matmul; per-tensor scales of fused shards become exact per-channel scales (no requantization)."""

from __future__ import annotations

import functools

import torch
from torch import nn

from pdserve import kernels
from pdserve.engine.layers import silu_and_mul
from pdserve.engine.quant_config import QuantConfig
from pdserve.engine.quant_formats import (
    FP8_MAX,
    awq_qweight_to_rows,
    quantize_per_channel,
    unpack_zeros,
)
from pdserve.kernels.pdl import use_pdl

W8_DTYPES = {"fp8": torch.float8_e4m3fn, "int8": torch.int8}
# 4-bit weights: up to here the GEMV (kernels/w4_gemv.py, no tensor cores), above it w4_matmul. H200,
# Llama-3-8B AWQ decode step: at 3 and 4 rows w4_matmul 4.16 / 4.19 ms against the GEMV's 4.85 ms; at
# 2 rows the GEMV 3.21-3.30 ms (bench/runs/2026-12-03-h200-11/)
W4_GEMV_MAX_ROWS = 2
# up to here the GEMV (kernels/gemv.py): a decode step at 2 rows is 17% faster than with w8_matmul;
# it repeats its unpacking per row, and by 4 rows w8_matmul is the faster (bench/gemv.py)
W8_GEMV_MAX_ROWS = 2
# above: FP8 tensor-core GEMM where the GPU has it (activations quantized per token by one kernel).
# H200 decode steps: at 16 rows the split-K weight-only kernel is faster (4.02 vs 5.76 ms), at 64 the
# GEMM (7.14 ms; int8 through split-K w8_matmul 8.29 ms); 32 lies between, not measured
FP8_GEMM_MIN_ROWS = 32
# From these rows on (16-bit activations on a GPU, outside CUDA-graph capture, after the FP8 GEMM
# where it applies), the weight is widened to the activations' dtype (kernels/dequantize.py) for the
# 16-bit GEMM: the weight-only kernels are bound by their unpacking there. H100, Llama-3-8B's
# projections (bench.gemv --prefill): int8 at 512 rows 57-67% of the bf16 GEMM's rate against
# w8_matmul's 47-56% (at 256 mixed: gate/up 47 against 68%); 4-bit from 256 rows 51-72% against
# w4_matmul's 29-43%. The engine's prefill of 2,048 tokens: int8 51 -> 75%, AWQ 33 -> 75% of the
# bf16 matmul rate (bench/RESULTS.md, twenty-eighth session).
W8_WIDEN_MIN_ROWS = 512
W4_WIDEN_MIN_ROWS = 256


class QuantizedLinear(nn.Module):
    """What both schemes share: output rows per shard, the bias, and the tensor kinds expected."""

    def __init__(
        self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype, shard_ranges: dict[str, tuple[int, int]] | None
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.shard_ranges = shard_ranges or {}
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype), requires_grad=False) if bias else None

    def checkpoint_kinds(self) -> set[str]:
        """Tensor kinds (name suffixes) each HF projection must provide."""
        return {"bias"} if self.bias is not None else set()

    def optional_kinds(self) -> set[str]:
        return set()

    def load_shard(self, shard: str, kind: str, tensor: torch.Tensor) -> None:
        start, size = self.shard_ranges[shard]
        self.load(kind, tensor, slice(start, start + size))

    def load(self, kind: str, tensor: torch.Tensor, rows: slice = slice(None)) -> None:
        if kind != "bias" or self.bias is None:
            raise ValueError(
                f"unexpected tensor kind {kind!r} (expected: {', '.join(sorted(self.checkpoint_kinds() | self.optional_kinds()))})"
            )
        _copy(self.bias.data[rows], tensor, kind)

    def _add_bias(self, out: torch.Tensor) -> torch.Tensor:
        return out if self.bias is None else out + self.bias

    def swiglu(self, x: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up of a [gate | up] projection (engine/layers.py `MergedLinear.swiglu`)."""
        return silu_and_mul(self(x))


class W8Linear(QuantizedLinear):
    """weight [N, K] fp8 e4m3 / int8, weight_scale fp32 [N]: y = x (weight * scale)^T + b."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        quant: QuantConfig,
        dtype: torch.dtype,
        shard_ranges: dict[str, tuple[int, int]] | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias, dtype, shard_ranges)
        self.checkpoint_format = quant.checkpoint_format
        self.register_buffer("weight", torch.empty((out_features, in_features), dtype=W8_DTYPES[quant.scheme]))
        self.register_buffer("weight_scale", torch.empty(out_features, dtype=torch.float32))

    def checkpoint_kinds(self) -> set[str]:
        scale = set() if self.checkpoint_format == "online" else {"weight_scale"}
        return super().checkpoint_kinds() | {"weight"} | scale

    def optional_kinds(self) -> set[str]:
        # Static activation scales: read, but activations are scaled per token at run time.
        return set() if self.checkpoint_format == "online" else {"input_scale"}

    def load(self, kind: str, tensor: torch.Tensor, rows: slice = slice(None)) -> None:
        if kind == "weight":
            self._load_weight(tensor, rows)
        elif kind == "weight_scale" and kind in self.checkpoint_kinds():
            target = self.weight_scale.data[rows]
            scale = tensor.float().reshape(-1)
            if scale.numel() not in (1, target.numel()):
                raise ValueError(
                    f"weight_scale has shape {tuple(tensor.shape)}; expected one scale or {target.numel()} (per channel)"
                )
            target.copy_(scale.expand(target.shape) if scale.numel() == 1 else scale)
        elif kind == "input_scale" and kind in self.optional_kinds():
            if tensor.numel() != 1:
                raise ValueError(f"input_scale has shape {tuple(tensor.shape)}; expected a per-tensor scale")
        else:
            super().load(kind, tensor, rows)

    def _load_weight(self, tensor: torch.Tensor, rows: slice) -> None:
        target = self.weight.data[rows]
        if self.checkpoint_format != "online":
            if tensor.dtype != self.weight.dtype:
                raise ValueError(
                    f"weight is {tensor.dtype}; a {self.checkpoint_format} checkpoint of this scheme holds {self.weight.dtype}"
                )
            _copy(target, tensor, "weight")
            return
        if not tensor.is_floating_point() or tensor.element_size() < 2:
            raise ValueError(f"weight is {tensor.dtype}; quantizing at load needs float16/bfloat16/float32 weights")
        if tensor.shape != target.shape:
            raise ValueError(f"weight has shape {tuple(tensor.shape)}; this layer expects {tuple(target.shape)}")
        q, scale = quantize_per_channel(tensor.to(target.device), self.weight.dtype)
        target.copy_(q)
        self.weight_scale.data[rows].copy_(scale)

    def init_random_(self, generator: torch.Generator) -> None:
        """Dummy weights: uniform(-0.02, 0.02) quantized per channel."""
        w = torch.empty(self.weight.shape, device=self.weight.device).uniform_(-0.02, 0.02, generator=generator)
        q, scale = quantize_per_channel(w, self.weight.dtype)
        self.weight.copy_(q)
        self.weight_scale.copy_(scale)

    def is_fp8_gemm_eligible(self, x: torch.Tensor) -> bool:
        """FP8 tensor cores for half-precision models with fp8 weights (an fp32 model keeps its precision)."""
        return (
            self.weight.dtype == torch.float8_e4m3fn
            and x.dtype in (torch.bfloat16, torch.float16)
            and fp8_gemm_kind(x.device) is not None
        )

    def _takes_gemv(self, x: torch.Tensor, num_rows: int) -> bool:
        # one or two rows, narrow outputs (q/k/v, o, down): the GEMV, the bias in its epilogue;
        # wide ones (gate/up) too where it launches as a dependent (one row on sm_90+: a link in
        # the chain of the step's kernels); elsewhere w8_matmul reads them faster
        return (
            x.is_cuda
            and num_rows <= W8_GEMV_MAX_ROWS
            and (self.out_features <= 2 * self.in_features or (num_rows == 1 and use_pdl(x, 1)))
        )

    def swiglu(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        if self._takes_gemv(x, rows.shape[0]):  # SwiGLU in the GEMV's epilogue
            out = kernels.gemv(rows.contiguous(), self.weight, self.weight_scale, bias=self.bias, swiglu=True)
            return out.view(*x.shape[:-1], self.out_features // 2)
        return silu_and_mul(self(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        num_rows = rows.shape[0]
        if self._takes_gemv(x, num_rows):
            out = kernels.gemv(rows.contiguous(), self.weight, self.weight_scale, bias=self.bias)
            return out.view(*x.shape[:-1], self.out_features)
        if not x.is_cuda:
            out = kernels.w8_matmul_ref(rows, self.weight, self.weight_scale)
        elif num_rows > FP8_GEMM_MIN_ROWS and self.is_fp8_gemm_eligible(x):
            out = fp8_gemm(rows, self.weight, self.weight_scale, fp8_gemm_kind(x.device))
        elif takes_widened_weight(x, num_rows, W8_WIDEN_MIN_ROWS):
            out = torch.nn.functional.linear(rows, kernels.w8_dequantize(self.weight, self.weight_scale, x.dtype))
        else:
            out = kernels.w8_matmul(rows.contiguous(), self.weight, self.weight_scale)
        return self._add_bias(out).view(*x.shape[:-1], self.out_features)


class W4Linear(QuantizedLinear):
    """qweight int32 [K / 8, N], scales fp16 [K / group, N] (as AWQ and GPTQ write them: exact;
    bf16 would round them), zeros uint8 [K / group, N] (kernels/w4_matmul.py)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        quant: QuantConfig,
        dtype: torch.dtype,
        shard_ranges: dict[str, tuple[int, int]] | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias, dtype, shard_ranges)
        self.checkpoint_format, self.is_symmetric = quant.checkpoint_format, quant.is_symmetric
        self.group_size = in_features if quant.group_size == -1 else quant.group_size
        if in_features % self.group_size or self.group_size % 16:
            raise ValueError(
                f"in_features {in_features} is not a multiple of group_size {self.group_size} (itself a multiple of 16)"
            )
        if quant.checkpoint_format == "awq" and any(size % 8 for _, size in self.shard_ranges.values() or [(0, out_features)]):
            raise ValueError(f"AWQ packs 8 output columns a word; out_features {out_features} is not a multiple of 8")
        num_groups = in_features // self.group_size
        self.register_buffer("qweight", torch.empty((in_features // 8, out_features), dtype=torch.int32))
        self.register_buffer("scales", torch.empty((num_groups, out_features), dtype=torch.float16))
        self.register_buffer("zeros", torch.empty((num_groups, out_features), dtype=torch.uint8))

    def checkpoint_kinds(self) -> set[str]:
        return super().checkpoint_kinds() | {"qweight", "qzeros", "scales"}

    def optional_kinds(self) -> set[str]:
        return {"g_idx"} if self.checkpoint_format.startswith("gptq") else set()

    def load(self, kind: str, tensor: torch.Tensor, rows: slice = slice(None)) -> None:
        if kind in ("qweight", "qzeros") and tensor.dtype != torch.int32:
            raise ValueError(f"{kind} is {tensor.dtype}; {self.checkpoint_format} packs 4-bit values into int32")
        if kind == "qweight":
            packed = awq_qweight_to_rows(tensor) if self.checkpoint_format == "awq" else tensor
            _copy(self.qweight.data[:, rows], packed, kind)
        elif kind == "qzeros":
            _copy(self.zeros.data[:, rows], unpack_zeros(tensor, self.checkpoint_format), kind)
        elif kind == "scales":
            _copy(self.scales.data[:, rows], tensor, kind)
        elif kind == "g_idx" and kind in self.optional_kinds():
            in_order = torch.arange(self.in_features, device=tensor.device) // self.group_size
            if tensor.shape != in_order.shape or not torch.equal(tensor.long(), in_order):
                raise ValueError("g_idx is not sequential (act-order / desc_act checkpoints are not supported)")
        else:
            super().load(kind, tensor, rows)

    def init_random_(self, generator: torch.Generator) -> None:
        """Dummy weights: random nibbles, zeros 8 (symmetric) or random, scales ~ 0.0025 (|w| <~ 0.04)."""
        device = self.qweight.device
        self.qweight.copy_(
            torch.randint(-(2**31), 2**31 - 1, self.qweight.shape, generator=generator, device=device, dtype=torch.int32)
        )
        if self.is_symmetric:
            self.zeros.fill_(8)
        else:
            self.zeros.copy_(torch.randint(4, 12, self.zeros.shape, generator=generator, device=device, dtype=torch.uint8))
        self.scales.uniform_(0.002, 0.003, generator=generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        if not x.is_cuda:
            matmul = kernels.w4_matmul_ref
        elif rows.shape[0] <= W4_GEMV_MAX_ROWS:
            matmul = kernels.w4_gemv  # decode rows: unpacking at memory speed, no tensor cores
        elif takes_widened_weight(x, rows.shape[0], W4_WIDEN_MIN_ROWS):
            matmul = _widened_w4_matmul
        else:
            matmul = kernels.w4_matmul
        out = matmul(rows.contiguous(), self.qweight, self.scales, self.zeros, self.group_size)
        return self._add_bias(out).view(*x.shape[:-1], self.out_features)


def takes_widened_weight(x: torch.Tensor, num_rows: int, min_rows: int) -> bool:
    """Whether a quantized projection widens its weight for the 16-bit GEMM (W8/W4_WIDEN_MIN_ROWS):
    never in a captured CUDA graph, whose memory pool would keep the widened copy."""
    return num_rows >= min_rows and x.dtype in (torch.bfloat16, torch.float16) and not torch.cuda.is_current_stream_capturing()


def _widened_w4_matmul(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int
) -> torch.Tensor:
    return x @ kernels.w4_dequantize(qweight, scales, zeros, group_size, x.dtype)


def quantized_linear(
    quant: QuantConfig,
    in_features: int,
    out_features: int,
    bias: bool,
    dtype: torch.dtype,
    shard_ranges: dict[str, tuple[int, int]] | None,
) -> QuantizedLinear:
    """`dtype`: the model's (activations, bias)."""
    if quant.scheme == "w4":
        return W4Linear(in_features, out_features, bias, quant, dtype, shard_ranges)
    return W8Linear(in_features, out_features, bias, quant, dtype, shard_ranges)


@functools.lru_cache(maxsize=8)
def fp8_gemm_kind(device: torch.device) -> str | None:
    """ "rowwise" (per-token x per-channel scales, sm90+), "tensorwise" (sm89), or None (no FP8 tensor cores)."""
    capability = torch.cuda.get_device_capability(device)
    return "rowwise" if capability >= (9, 0) else "tensorwise" if capability >= (8, 9) else None


def fp8_gemm(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, kind: str) -> torch.Tensor:
    """x [M, K] quantized to fp8 at run time (per token, or per tensor on sm89), times the fp8
    weight [N, K] on FP8 tensor cores (torch._scaled_mm), per-channel weight scales applied."""
    if kind == "rowwise" and x.dtype == torch.bfloat16:
        quantize = kernels.quantize_fp8_rows if x.is_cuda else kernels.quantize_fp8_rows_ref
        x_fp8, x_scale = quantize(x.contiguous())  # one kernel on the GPU; scale [M, 1]
        return torch._scaled_mm(x_fp8, weight.t(), scale_a=x_scale, scale_b=scale.view(1, -1), out_dtype=x.dtype)
    x_scale = (x.abs().amax().float() / FP8_MAX).clamp_min(1e-12)
    x_fp8 = (x.float() / x_scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    one = torch.ones((), device=x.device)
    out = torch._scaled_mm(x_fp8, weight.t(), scale_a=x_scale, scale_b=one, out_dtype=torch.float32)
    return (out * scale).to(x.dtype)


def _copy(target: torch.Tensor, source: torch.Tensor, kind: str) -> None:
    if target.shape != source.shape:
        raise ValueError(f"{kind} has shape {tuple(source.shape)}; this layer expects {tuple(target.shape)}")
    target.copy_(source)
