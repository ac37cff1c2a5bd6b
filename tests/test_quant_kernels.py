"""The quantized-weight matmul kernels (Triton, run on CPU tensors by the interpreter) against their
torch references, and the references against a naive dequantization written from the layouts'
definition, element by element."""

from __future__ import annotations

import importlib
import os
import unittest.mock

import numpy as np
import pytest
import torch

if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("CPU-interpreter tests; tests/test_quant_gpu.py covers the kernels here", allow_module_level=True)
os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first `import triton`

import pdserve.kernels as K  # noqa: E402
from pdserve.engine.quant_formats import quantize_per_channel  # noqa: E402
from pdserve.kernels.w4_matmul import n_major  # noqa: E402
from tests.test_kv_fp8_kernels import assert_fp8_codes_match  # noqa: E402


def naive_w4_weight(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> np.ndarray:
    """W[k, n] = (nibble k % 8 of qweight[k // 8, n] - zeros[k // g, n]) * scales[k // g, n], in float64."""
    words = qweight.numpy().view(np.uint32)
    k_total, n_total = 8 * words.shape[0], words.shape[1]
    out = np.empty((k_total, n_total))
    for k in range(k_total):
        q = (words[k // 8] >> np.uint32(4 * (k % 8))) & np.uint32(0xF)
        out[k] = (q.astype(np.float64) - zeros[k // group_size].numpy()) * scales[k // group_size].double().numpy()
    return out


def random_w4(k: int, n: int, group_size: int) -> tuple[torch.Tensor, ...]:
    qweight = torch.randint(-(2**31), 2**31 - 1, (k // 8, n), dtype=torch.int32)
    scales = torch.rand(k // group_size, n) * 0.01 + 0.001
    zeros = torch.randint(0, 17, (k // group_size, n), dtype=torch.uint8)  # 16: classic GPTQ's stored 15 + 1
    return qweight, scales, zeros


@pytest.mark.parametrize("m", [1, 5, 70])
@pytest.mark.parametrize("k,n,group_size", [(128, 48, 32), (256, 40, 128), (384, 24, 384), (96, 16, 48)])
def test_w4_matmul_matches_reference_and_naive_dequantization(m: int, k: int, n: int, group_size: int) -> None:
    torch.manual_seed(m * k + n)
    qweight, scales, zeros = random_w4(k, n, group_size)
    weight = K.w4_dequantize_ref(qweight, scales, zeros, group_size)
    np.testing.assert_allclose(weight.double().numpy(), naive_w4_weight(qweight, scales, zeros, group_size), rtol=1e-6, atol=0)
    x = torch.randn(m, k)
    ref = K.w4_matmul_ref(x, qweight, scales, zeros, group_size)
    torch.testing.assert_close(ref, x.double().matmul(weight.double()).float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(K.w4_matmul(x, qweight, scales, zeros, group_size), ref, rtol=1e-5, atol=1e-5)
    n_major_weights = [n_major(t) for t in (qweight, scales, zeros)]  # the other layout: the same values
    torch.testing.assert_close(K.w4_matmul(x, *n_major_weights, group_size), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("m,k,splits", [(5, 768, 3), (17, 896, 4), (70, 768, 2)])
def test_w4_matmul_split_k_merges_partials_and_resets_counters(m: int, k: int, splits: int) -> None:
    """K over several programs (6 or 7 tiles of 128 inputs: 3 splits of 2, 4 splits of 2, 2, 2, 1):
    the last program of each output tile adds the fp32 partials and resets its counter, so a second
    launch (a graph replay) merges again; the result matches the reference."""
    from pdserve.kernels.split_counters import split_counters

    torch.manual_seed(k + splits)
    qweight, scales, zeros = random_w4(k, 72, 128)
    x = torch.randn(m, k)
    ref = K.w4_matmul_ref(x, qweight, scales, zeros, 128)
    for _ in range(2):
        got = K.w4_matmul(x, qweight, scales, zeros, 128, splits=splits)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
        assert not split_counters("w4_matmul", x.device, 1).any()


def test_w4_matmul_splits_k_where_column_tiles_leave_sms_idle() -> None:
    """The decode rule (132 SMs): below 64 rows at least two programs an SM, at 64 rows at most two.
    Llama-3-8B's o (4096 columns, 32 tiles of K) and down (112 tiles) split; q/k/v (6144 columns)
    splits below 64 rows only; gate/up (28672 columns) and prefill rows do not."""
    w4 = importlib.import_module("pdserve.kernels.w4_matmul")
    with unittest.mock.patch.object(w4, "num_sms", lambda device: 132):
        cuda = torch.device("cuda", 0)
        assert w4.tile_sizes(16, 4096, cuda, 32) == (16, 32, 4, 3, 3)
        assert w4.tile_sizes(64, 4096, cuda, 112) == (64, 32, 4, 5, 2)
        assert w4.tile_sizes(64, 6144, cuda, 32)[4] == 1
        assert w4.tile_sizes(16, 6144, cuda, 32)[4] == 2
        assert w4.tile_sizes(16, 28672, cuda, 32)[4] == 1
        assert w4.tile_sizes(256, 4096, cuda, 32)[4] == 1
        assert w4.tile_sizes(16, 4096, cuda, 4)[4] == 1  # too few tiles of K to split


@pytest.mark.parametrize("m", [1, 5, 70])
@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.int8])
def test_w8_matmul_matches_reference_and_naive_dequantization(m: int, dtype: torch.dtype) -> None:
    torch.manual_seed(m)
    n, k = 40, 200  # neither a multiple of the tiles
    weight = (torch.randn(n, k) * 40).clamp(-127, 127).to(dtype)
    scale = torch.rand(n) * 0.01
    x = torch.randn(m, k)
    naive = x.double() @ (weight.double() * scale.double()[:, None]).t()
    ref = K.w8_matmul_ref(x, weight, scale)
    torch.testing.assert_close(ref, naive.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(K.w8_matmul(x, weight, scale), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.int8])
def test_w8_dequantize_equals_reference_and_naive_dequantization(dtype: torch.dtype) -> None:
    """fp32 and fp16 bit for bit (the interpreter casts to bf16 by truncation: within one bf16 step;
    tests/test_quant_gpu.py checks bf16 bit for bit)."""
    torch.manual_seed(1)
    n, k = 40, 300  # neither a multiple of the tiles
    weight, scale = quantize_per_channel(torch.randn(n, k), dtype)
    naive = weight.double() * scale.double()[:, None]
    torch.testing.assert_close(K.w8_dequantize_ref(weight, scale, torch.float32).double(), naive, rtol=1e-7, atol=0)
    for out_dtype in (torch.float32, torch.float16):
        assert torch.equal(K.w8_dequantize(weight, scale, out_dtype), K.w8_dequantize_ref(weight, scale, out_dtype))
    widened = K.w8_dequantize(weight, scale, torch.bfloat16).double()
    torch.testing.assert_close(widened, naive, rtol=2**-7, atol=0)


@pytest.mark.parametrize("k,n,group_size", [(128, 48, 32), (256, 200, 128), (96, 16, 48)])
def test_w4_dequantize_equals_naive_dequantization_in_both_layouts(k: int, n: int, group_size: int) -> None:
    torch.manual_seed(k + n)
    qweight, scales, zeros = random_w4(k, n, group_size)
    naive = torch.from_numpy(naive_w4_weight(qweight, scales, zeros, group_size))
    for layout in (lambda t: t, n_major):
        weights = [layout(t) for t in (qweight, scales, zeros)]
        torch.testing.assert_close(K.w4_dequantize(*weights, group_size, torch.float32).double(), naive, rtol=1e-6, atol=0)
        assert torch.equal(K.w4_dequantize(*weights, group_size, torch.float16), naive.to(torch.float16))
    with pytest.raises(ValueError, match="qweight"):
        K.w4_dequantize(qweight, scales[:1], zeros, group_size, torch.bfloat16)
    with pytest.raises(ValueError, match="output dtype"):
        K.w4_dequantize(qweight, scales, zeros, group_size, torch.int8)


def test_w8_matmul_half_precision_input() -> None:
    torch.manual_seed(0)
    weight = torch.randn(32, 64).to(torch.float8_e4m3fn)
    scale = torch.rand(32)
    x = torch.randn(3, 64).to(torch.float16)
    torch.testing.assert_close(K.w8_matmul(x, weight, scale), K.w8_matmul_ref(x, weight, scale), rtol=2e-3, atol=2e-3)


def test_wrappers_refuse_bad_shapes_and_dtypes() -> None:
    qweight, scales, zeros = random_w4(128, 16, 64)
    with pytest.raises(ValueError, match="qweight"):
        K.w4_matmul(torch.randn(2, 64), qweight, scales, zeros, 64)
    with pytest.raises(ValueError, match="int32 qweight"):
        K.w4_matmul(torch.randn(2, 128), qweight.to(torch.int64), scales, zeros, 64)
    with pytest.raises(ValueError, match="weight"):
        K.w8_matmul(torch.randn(2, 64), torch.zeros(8, 64, dtype=torch.int16), torch.ones(8))


@pytest.mark.parametrize("m,k", [(1, 16), (3, 100), (4, 4100)])
def test_quantize_fp8_rows_matches_reference(m: int, k: int) -> None:
    """Scales exactly; codes as the interpreter's fp8 cast allows (tests/test_quant_gpu.py: bit for bit)."""
    torch.manual_seed(k)
    x = (torch.randn(m, k) * 3).to(torch.bfloat16)
    x[0, :4] = 0.0
    if m > 1:
        x[1] = 0.0  # an all-zero row: the scale floor, all codes 0
    codes, scale = K.quantize_fp8_rows(x)
    ref_codes, ref_scale = K.quantize_fp8_rows_ref(x)
    assert torch.equal(scale, ref_scale)
    assert_fp8_codes_match(codes, ref_codes)


@pytest.mark.parametrize("split_k", [2, 3, 8])
@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.int8])
def test_w8_matmul_split_k_sums_every_input_once(split_k: int, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    """Decode-sized rows (two row tiles, the second partial) with the inputs split in ranges of whole
    tiles, the last shorter and itself cut by K: the partial sums add up to the unsplit product."""
    module = importlib.import_module("pdserve.kernels.w8_matmul")  # the package's w8_matmul is the function
    weight, scale = quantize_per_channel(torch.randn(70, 1000), dtype)
    x = torch.randn(20, 1000)
    monkeypatch.setattr(module, "tile_sizes", lambda m, n, k, device: (16, 64, 128, 4, split_k))
    torch.testing.assert_close(K.w8_matmul(x, weight, scale), K.w8_matmul_ref(x, weight, scale), rtol=1e-5, atol=1e-4)


def test_w8_matmul_splits_decode_rows_over_narrow_outputs() -> None:
    module = importlib.import_module("pdserve.kernels.w8_matmul")
    cuda = torch.device("cuda", 0)
    with unittest.mock.patch.object(module, "num_sms", lambda device: 132):
        assert module.tile_sizes(64, 4096, 4096, cuda)[4] == 5  # 64 column tiles: 5 ranges of 7 input tiles
        assert module.tile_sizes(1, 28672, 4096, cuda)[4] == 1  # 448 column tiles fill the GPU
        assert module.tile_sizes(300, 4096, 4096, cuda)[4] == 1  # prefill
