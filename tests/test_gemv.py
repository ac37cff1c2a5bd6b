"""The decode GEMV kernel (Triton, run on CPU tensors by the interpreter) against its torch
reference: float, fp8 and int8 weights, with and without a bias, and every int8 byte value (the
kernel widens int8 with a bit trick, not a conversion)."""

from __future__ import annotations

import importlib
import os
from types import SimpleNamespace

import pytest
import torch

if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("CPU-interpreter tests; tests/test_quant_gpu.py covers the kernel here", allow_module_level=True)
os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first `import triton`

import pdserve.kernels as K  # noqa: E402
from pdserve.engine.quant_formats import quantize_per_channel  # noqa: E402


def weights(kind: str, n: int, k: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    w = torch.randn(n, k)
    if kind == "fp32":
        return w, None
    if kind in ("bf16", "fp16"):
        return w.to(torch.bfloat16 if kind == "bf16" else torch.float16), None
    return quantize_per_channel(w, torch.float8_e4m3fn if kind == "fp8" else torch.int8)


# Float weights from DOT_MIN_ROWS rows take the tensor-core kernel; the interpreter's bf16 tl.dot
# (Triton 3.9) returns garbage, so bf16 runs it on the GPU only (tests/test_quant_gpu.py)
CASES = [
    (kind, m, n, k)
    for kind in ("fp32", "bf16", "fp16", "fp8", "int8")
    for m, n, k in [
        (1, 40, 96),
        (3, 17, 2100),
        (1, 70, 4500),
        (4, 300, 64),
        (1, 4500, 40),
        (9, 70, 300),
        (16, 33, 130),
        (16, 4500, 40),
    ]
    if not (kind == "bf16" and m >= K.DOT_MIN_ROWS) and not (kind in ("fp8", "int8") and m > K.ELEMENTWISE_MAX_ROWS)
]


@pytest.mark.parametrize("kind,m,n,k", CASES)
@pytest.mark.parametrize("has_bias", [False, True], ids=["", "bias"])
def test_gemv_matches_reference(kind: str, m: int, n: int, k: int, has_bias: bool) -> None:
    """k 96 and 64 take one tile of inputs (the first, read before the PDL wait), 2100 several (the
    last one partial); 70 x 4500 at one row, 16-bit weights: a small model's down (2 x 2048 tiles);
    n 4500 takes the wide outputs' tiles (16 rows a program), the last one partial;
    9 and 16 rows (float weights: tensor cores) pad the rows to 16, with partial tiles of n and k."""
    torch.manual_seed(m * n + k)
    weight, scale = weights(kind, n, k)
    x = torch.randn(m, k)
    if kind in ("bf16", "fp16"):
        x = x.to(weight.dtype)
    bias = torch.randn(n).to(x.dtype) if has_bias else None
    got = K.gemv(x, weight, scale, bias)
    ref = K.gemv_ref(x, weight, scale, bias)
    tol = 1e-4 if x.dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), ref.float(), rtol=tol, atol=tol * ref.abs().max().item())


# 8-bit weights with 16-bit x take `_gemv_8bit_kernel` (f16x2 arithmetic) where K is a multiple of 16:
# 96 and 64 inputs are one partial tile of chunks; 2112 and 4096 several (4096: whole tiles only);
# 2100 is not a multiple of 16 and takes the fp32 kernel; n 17 and 300 leave a partial row tile
CASES_16BIT_X = [
    (kind, x_dtype, m, n, k)
    for kind in ("fp8", "int8")
    for x_dtype in (torch.bfloat16, torch.float16)
    for m, n, k in [(1, 40, 96), (3, 17, 2112), (1, 70, 4096), (4, 300, 64), (2, 33, 2100)]
]


@pytest.mark.parametrize("kind,x_dtype,m,n,k", CASES_16BIT_X)
@pytest.mark.parametrize("has_bias", [False, True], ids=["", "bias"])
def test_gemv_8bit_weights_16bit_x(kind: str, x_dtype: torch.dtype, m: int, n: int, k: int, has_bias: bool) -> None:
    torch.manual_seed(m * n + k)
    weight, scale = weights(kind, n, k)
    x = torch.randn(m, k).to(x_dtype)
    bias = torch.randn(n).to(x_dtype) if has_bias else None
    got = K.gemv(x, weight, scale, bias)
    ref = K.gemv_ref(x, weight, scale, bias)
    torch.testing.assert_close(got.float(), ref.float(), rtol=2e-2, atol=2e-2 * ref.abs().max().item())


@pytest.mark.parametrize("kind", ["fp8", "int8"])
def test_gemv_8bit_weights_large_and_small_x(kind: str) -> None:
    """fp16 arithmetic keeps the extremes of a bf16 model's activations: 16 inputs of 4096 against
    the largest weights (one chunk's 8-term fp16 sums at 57,344 for fp8) come out finite and exact,
    and inputs of 1e-3..2e-3 (fp16 subnormals once scaled) give outputs within 1% of the reference
    (relative to the output vector's norm: these outputs are sums that cancel)."""
    big = 448.0 if kind == "fp8" else 127.0
    dtype = torch.float8_e4m3fn if kind == "fp8" else torch.int8
    weight = torch.full((8, 16), big).to(dtype)
    x = torch.full((1, 16), 4096.0, dtype=torch.bfloat16)
    got = K.gemv(x, weight, torch.ones(8))
    assert torch.equal(got.float(), torch.full((1, 8), big * 4096 * 16))
    torch.manual_seed(0)
    weight, scale = weights(kind, 64, 256)
    small = (torch.rand(1, 256) * 1e-3 + 1e-3).to(torch.bfloat16)
    got, ref = K.gemv(small, weight, scale).float(), K.gemv_ref(small, weight, scale).float()
    assert (got - ref).norm() < 1e-2 * ref.norm()


def test_gemv_int8_every_byte_value() -> None:
    """All 256 int8 values, each alone in its output channel, come out exactly (scale 1, x one-hot)."""
    values = torch.arange(-128, 128, dtype=torch.int16).to(torch.int8)
    weight = torch.zeros(256, 8, dtype=torch.int8)
    weight[:, 3] = values
    x = torch.zeros(1, 8)
    x[0, 3] = 1.0
    got = K.gemv(x, weight, torch.ones(256))
    assert torch.equal(got[0], values.float())


def test_gemv_rejects_bad_input() -> None:
    w, scale = weights("int8", 16, 32)
    with pytest.raises(ValueError, match="scale"):
        K.gemv(torch.randn(1, 32), w)
    with pytest.raises(ValueError, match="at most"):
        K.gemv(torch.randn(K.GEMV_MAX_ROWS + 1, 32), w.float())
    with pytest.raises(ValueError, match="at most 4 rows with torch.int8"):
        K.gemv(torch.randn(K.ELEMENTWISE_MAX_ROWS + 1, 32), w, scale)
    with pytest.raises(ValueError, match="does not match"):
        K.gemv(torch.randn(1, 33), w, scale)
    with pytest.raises(ValueError, match="float, fp8"):
        K.gemv(torch.randn(1, 32), w.to(torch.int32), scale)
    with pytest.raises(ValueError, match="bias"):
        K.gemv(torch.randn(1, 32), w, scale, torch.randn(15))


def test_kernels_chain_one_row_outside_a_model_and_the_models_rows_within(monkeypatch: pytest.MonkeyPatch) -> None:
    """PDL (kernels/pdl.py) at one row by default; `pdl_max_rows` raises the limit for its block
    only (engine/model.py wraps each forward pass in it)."""
    pdl = importlib.import_module("pdserve.kernels.pdl")
    monkeypatch.setattr(pdl, "supports_pdl", lambda device: True)  # as on an sm_90 GPU
    x = SimpleNamespace(is_cuda=True, device="cuda")
    assert pdl.use_pdl(x, 1) and not pdl.use_pdl(x, 2)
    with pdl.pdl_max_rows(8):
        assert pdl.use_pdl(x, 8) and not pdl.use_pdl(x, 9)
    assert not pdl.use_pdl(x, 2)


# SwiGLU in the one-row kernels' epilogue (weight rows [gate | up]); the tensor-core kernel's rows
# (float weights from DOT_MIN_ROWS) run the projection, then silu_and_mul. n 80 and 34: partial
# tiles of (gate, up) pairs at the rule's tiles; 8-row tiles as the wide outputs' (bf16 gate/up)
CASES_SWIGLU = [
    (kind, x_dtype, m, n, k, tiles)
    for kind, x_dtype in [
        ("fp32", torch.float32),
        ("fp16", torch.float16),
        ("fp8", torch.bfloat16),
        ("int8", torch.float16),
        ("fp8", torch.float32),
    ]
    for m, n, k, tiles in [(1, 80, 96, None), (2, 34, 2112, None), (1, 40, 96, (8, 64, 4, 1))]
]


@pytest.mark.parametrize("kind,x_dtype,m,n,k,tiles", CASES_SWIGLU)
@pytest.mark.parametrize("has_bias", [False, True], ids=["", "bias"])
def test_gemv_swiglu_equals_the_projection_then_silu_and_mul(
    kind: str, x_dtype: torch.dtype, m: int, n: int, k: int, tiles: tuple | None, has_bias: bool
) -> None:
    torch.manual_seed(m * n + k)
    weight, scale = weights(kind, n, k)
    x = torch.randn(m, k).to(x_dtype)
    bias = torch.randn(n).to(x_dtype) if has_bias else None
    fused = K.gemv(x, weight, scale, bias, tiles=tiles, swiglu=True)
    assert fused.shape == (m, n // 2)
    assert torch.equal(fused, K.silu_and_mul(K.gemv(x, weight, scale, bias, tiles=tiles)))
    ref = K.silu_and_mul_ref(K.gemv_ref(x, weight, scale, bias).float())
    torch.testing.assert_close(fused.float(), ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())


def test_gemv_swiglu_rejects_an_odd_weight() -> None:
    with pytest.raises(ValueError, match="even"):
        K.gemv(torch.randn(1, 32), torch.randn(15, 32), swiglu=True)


@pytest.mark.parametrize(
    "gpu,qkv,gate_up,o_proj",
    [
        ("NVIDIA H100 80GB HBM3", (4, 2048, 4, 1), (4, 2048, 4, 1), (4, 2048, 4, 1)),
        ("NVIDIA H200", (2, 1024, 4, 1), (4, 1024, 2, 1), (2, 1024, 4, 1)),
    ],
)
def test_8bit_one_row_tiles_by_gpu(monkeypatch: pytest.MonkeyPatch, gpu: str, qkv: tuple, gate_up: tuple, o_proj: tuple) -> None:
    """A GPU named in LARGE_8BIT_TILES takes its own tile for Llama-3-8B-sized projections (4096
    inputs and outputs and more); small models, a CPU device and other GPUs keep the rule."""
    gemv_module = importlib.import_module("pdserve.kernels.gemv")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: gpu)
    gpus = importlib.import_module("pdserve.kernels.gpus")
    gpus.gpu_name.cache_clear()
    cuda = torch.device("cuda", 0)
    try:
        assert gemv_module.gemv_8bit_tile_sizes(6144, 4096, cuda) == qkv
        assert gemv_module.gemv_8bit_tile_sizes(28672, 4096, cuda) == gate_up
        assert gemv_module.gemv_8bit_tile_sizes(4096, 4096, cuda) == o_proj
        assert gemv_module.gemv_8bit_tile_sizes(4096, 14336, cuda) == o_proj  # down: the same class
        assert gemv_module.gemv_8bit_tile_sizes(896, 4864, cuda) == (2, 2048, 8, 1)  # Qwen2.5-0.5B's down
        assert gemv_module.gemv_8bit_tile_sizes(9728, 896, cuda) == (4, 1024, 2, 1)  # Qwen2.5-0.5B's gate/up
        assert gemv_module.gemv_8bit_tile_sizes(6144, 4096, torch.device("cpu")) == (2, 1024, 4, 1)
    finally:
        gpus.gpu_name.cache_clear()


# The residual add and RMSNorm folded into the one-row float GEMV: k 96 one tile of inputs, 2100
# several (the last partial), 64-input tiles force the loop; swiglu and a bias in its epilogue
CASES_NORM = [
    (dtype, n, k, tiles, swiglu)
    for dtype in (torch.float32, torch.bfloat16, torch.float16)
    for n, k, tiles, swiglu in [
        (40, 96, None, False),
        (70, 2100, None, True),
        (34, 200, (8, 64, 4, 1), True),
        (33, 130, (4, 64, 4, 1), False),
    ]
]


@pytest.mark.parametrize("dtype,n,k,tiles,swiglu", CASES_NORM)
@pytest.mark.parametrize("has_bias", [False, True], ids=["", "bias"])
def test_gemv_add_rms_norm_equals_the_norm_then_the_projection(
    dtype: torch.dtype, n: int, k: int, tiles: tuple | None, swiglu: bool, has_bias: bool
) -> None:
    """The new residual is x + residual as fused_add_rms_norm rounds it, bit for bit, in a new tensor
    (the residual passed in is left as it was); the projection matches the two kernels' to within the
    rounding of the normed row, which the fold skips."""
    torch.manual_seed(n + k)
    x, residual = torch.randn(1, k).to(dtype), torch.randn(1, k).to(dtype)
    norm_weight = (1 + 0.1 * torch.randn(k)).to(dtype)
    weight = (torch.randn(n, k) / k**0.5).to(dtype)
    bias = torch.randn(n).to(dtype) if has_bias else None
    before = residual.clone()
    out, new_residual = K.gemv_add_rms_norm(x, residual, norm_weight, 1e-6, weight, bias, tiles=tiles, swiglu=swiglu)
    normed, ref_residual = K.fused_add_rms_norm(x.clone(), residual.clone(), norm_weight, 1e-6)
    ref = K.gemv(normed, weight, bias=bias, tiles=tiles, swiglu=swiglu)
    assert torch.equal(new_residual, ref_residual) and torch.equal(residual, before)
    assert out.shape == ref.shape == (1, n // 2 if swiglu else n) and out.dtype == dtype
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=tol * ref.abs().max().item())


def test_gemv_add_rms_norm_rejects_what_it_does_not_fold() -> None:
    x, residual, g = torch.randn(1, 32), torch.randn(1, 32), torch.ones(32)
    with pytest.raises(ValueError, match="one row"):
        K.gemv_add_rms_norm(torch.randn(2, 32), torch.randn(2, 32), g, 1e-6, torch.randn(8, 32))
    w, scale = weights("int8", 8, 32)
    with pytest.raises(ValueError, match="float weight"):
        K.gemv_add_rms_norm(x, residual, g, 1e-6, w)
    with pytest.raises(ValueError, match="residual must match"):
        K.gemv_add_rms_norm(x, residual.double(), g, 1e-6, torch.randn(8, 32))
    with pytest.raises(ValueError, match="norm_weight"):
        K.gemv_add_rms_norm(x, residual, torch.ones(31), 1e-6, torch.randn(8, 32))


def test_a_decode_step_s_one_row_folds_the_norm_into_a_short_projection(monkeypatch: pytest.MonkeyPatch) -> None:
    """engine/layers.py `add_norm_project`: one row of a GEMV projection of up to
    FOLDED_NORM_MAX_INPUTS inputs takes the folded kernel and gives what the norm then the
    projection give; two rows, a longer projection and the first layer (no residual yet) keep them apart."""
    layers = importlib.import_module("pdserve.engine.layers")
    monkeypatch.setattr(layers, "use_pdl", lambda x, rows: rows <= 2)  # as a decode step on an sm_90 GPU
    folded = []
    real_fold = K.gemv_add_rms_norm
    monkeypatch.setattr(K, "gemv_add_rms_norm", lambda *a, **kw: folded.append(1) or real_fold(*a, **kw))
    torch.manual_seed(0)
    for hidden, rows, with_residual, folds in [
        (96, 1, True, True),
        (96, 2, True, False),
        (96, 1, False, False),
        (1040, 1, True, False),
    ]:
        norm = layers.RMSNorm(hidden, 1e-6)
        norm.weight.data = 1 + 0.1 * torch.randn(hidden)
        projection = layers.MergedLinear(hidden, {"gate": 24, "up": 24}, bias=False, decode_gemv=True)
        projection.weight.data = torch.randn(48, hidden) / hidden**0.5
        x, residual = torch.randn(rows, hidden), torch.randn(rows, hidden) if with_residual else None
        summed = x.clone() if residual is None else x + residual
        folded.clear()
        out, new_residual = layers.add_norm_project(norm, projection, x, residual, swiglu=True)
        assert bool(folded) == folds
        assert torch.equal(new_residual, summed)
        ref = K.silu_and_mul_ref(K.gemv_ref(K.rms_norm_ref(summed, norm.weight, 1e-6), projection.weight).float())
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
