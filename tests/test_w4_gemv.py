"""The 4-bit decode GEMV (kernels/w4_gemv.py) against w4_matmul_ref: on CPU tensors in Triton's
interpreter (shapes small enough for it, tile sizes forced to what a GPU would pick), and, marked
gpu, on a CUDA GPU at Llama-3-8B sizes (`pytest -m gpu tests/test_w4_gemv.py`)."""

from __future__ import annotations

import importlib
import os
import types

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first `import triton` (as in conftest)

import pdserve.kernels as K  # noqa: E402
from pdserve.kernels.w4_gemv import gemv_tile_sizes  # noqa: E402
from pdserve.kernels.w4_matmul import n_major  # noqa: E402

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
interpreter = pytest.mark.skipif(not INTERPRETED, reason="CPU-interpreter test (TRITON_INTERPRET=1)")

# (BLOCK_N, BLOCK_K8, BLOCK_G, num_warps, num_stages, splits) that gemv_tile_sizes picks on 132 SMs
# for groups of 128 (the interpreter sees one SM and would always pick the first), 8-warp tiles, and
# K split over 2 and 3 programs
GPU_TILES = [
    (64, 16, 1, 4, 4, 1),
    (32, 16, 2, 4, 4, 1),
    (16, 16, 4, 4, 4, 1),
    (32, 16, 4, 8, 4, 1),
    (16, 16, 8, 8, 4, 1),
    (32, 16, 2, 4, 4, 2),
    (16, 16, 1, 4, 4, 3),
]


def random_w4(
    k: int, n: int, group_size: int, device: str = "cpu", max_zero: int = 15, layout: str = "columns"
) -> tuple[torch.Tensor, ...]:
    """qweight [K / 8, N], scales and zeros [K / group, N]; contiguous in N ("columns", as checkpoints
    store them) or N-major."""
    qweight = torch.randint(-(2**31), 2**31 - 1, (k // 8, n), dtype=torch.int32, device=device)
    scales = (torch.rand(k // group_size, n, device=device) * 0.01 + 0.001).half()  # stored as checkpoints do
    zeros = torch.randint(0, max_zero + 1, (k // group_size, n), dtype=torch.uint8, device=device)
    if layout == "n_major":
        return n_major(qweight), n_major(scales), n_major(zeros)
    return qweight, scales, zeros


LAYOUTS = ["columns", "n_major"]


def reference(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """In float64 from x's own values: the kernel computes in fp32 and rounds once, to x's dtype."""
    return K.w4_matmul_ref(x.double(), qweight, scales.double(), zeros, group_size)


def assert_close(out: torch.Tensor, ref: torch.Tensor, rel: float) -> None:
    """Each element within rel of the output's magnitude (sums of products cancel: no per-element rtol)."""
    assert out.shape == ref.shape and torch.isfinite(out).all()
    scale = ref.abs().max().item()
    torch.testing.assert_close(out.double(), ref, rtol=rel, atol=rel * scale)


@interpreter
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("m", [1, 2, 4])
@pytest.mark.parametrize(
    "k,n,group_size",
    [(256, 40, 32), (256, 72, 64), (384, 100, 128), (512, 24, 256), (96, 16, 48)],  # N not a multiple of the tile
)
def test_matches_reference(m: int, k: int, n: int, group_size: int, layout: str) -> None:
    torch.manual_seed(m * k + n)
    qweight, scales, zeros = random_w4(k, n, group_size, layout=layout)
    assert (qweight.stride(0) == 1) == (layout == "n_major")
    x = torch.randn(m, k)
    out = K.w4_gemv(x, qweight, scales, zeros, group_size)
    assert out.dtype == torch.float32
    assert_close(out, reference(x, qweight, scales, zeros, group_size), 1e-5)
    torch.testing.assert_close(
        out, K.w4_matmul_ref(x, qweight, scales, zeros, group_size), rtol=1e-5, atol=1e-5 * out.abs().max()
    )
    xb = x.bfloat16()
    out = K.w4_gemv(xb, qweight, scales, zeros, group_size)
    assert out.dtype == torch.bfloat16
    assert_close(out, reference(xb, qweight, scales, zeros, group_size), 1e-2)


@interpreter
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("tiles", GPU_TILES)
@pytest.mark.parametrize("m,k", [(1, 512), (3, 384)])  # 4 and 3 slices of 16 packed rows: even and not
def test_gpu_tile_sizes(tiles: tuple[int, int, int, int, int], m: int, k: int, layout: str) -> None:
    """Slices side by side (BLOCK_G > 1), the last tile of slices partly past K, padded row blocks."""
    torch.manual_seed(m + k)
    qweight, scales, zeros = random_w4(k, 40, 128, layout=layout)
    for dtype, rel in ((torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 1e-2)):
        x = torch.randn(m, k).to(dtype)
        out = K.w4_gemv(x, qweight, scales, zeros, 128, tile_sizes=tiles)
        assert_close(out, reference(x, qweight, scales, zeros, 128), rel)


@interpreter
def test_exact_for_exact_inputs() -> None:
    """Integer inputs, power-of-two scales, zero points over the whole uint8 range: every product and
    partial sum is an integer times the scale below 2^24, so the unpacking (the mantissa trick, the
    magic numbers) must be exact for the result to equal the float64 one bit for bit."""
    torch.manual_seed(0)
    k, n, group_size = 256, 24, 64
    qweight, _, _ = random_w4(k, n, group_size)
    scales = 2.0 ** -torch.randint(0, 6, (k // group_size, n)).float()
    zeros = torch.randint(0, 256, (k // group_size, n), dtype=torch.uint8)
    zeros[0] = 255
    x = torch.randint(-8, 9, (2, k)).float()
    out = K.w4_gemv(x, qweight, scales, zeros, group_size)
    torch.testing.assert_close(out.double(), reference(x, qweight, scales, zeros, group_size), rtol=0, atol=0)


@interpreter
def test_split_k_partials_merge_and_counters_reset() -> None:
    """K over 3 programs: the last to finish adds the fp32 partials in split order and resets its
    counter, so a second launch (a graph replay) merges as the first did."""
    from pdserve.kernels.split_counters import split_counters

    torch.manual_seed(3)
    k, n = 768, 40  # 6 slices of 16 packed rows: 2 a split
    qweight, scales, zeros = random_w4(k, n, 128)
    x = torch.randn(2, k)
    whole = K.w4_gemv(x, qweight, scales, zeros, 128, tile_sizes=(16, 16, 1, 4, 4, 1))
    for _ in range(2):
        split = K.w4_gemv(x, qweight, scales, zeros, 128, tile_sizes=(16, 16, 1, 4, 4, 3))
        torch.testing.assert_close(split, whole, rtol=1e-6, atol=1e-6 * whole.abs().max().item())
        assert not split_counters("w4_gemv", x.device, 1).any()
    uneven = K.w4_gemv(x, qweight, scales, zeros, 128, tile_sizes=(16, 16, 2, 4, 4, 4))  # splits of 2, 2, 2 slices
    torch.testing.assert_close(uneven, whole, rtol=1e-6, atol=1e-6 * whole.abs().max().item())


@interpreter
def test_rows_beyond_one_program_and_strided_input() -> None:
    """6 rows: two row blocks of 4, the second padded. A bf16 x that is a column slice (odd element
    offset) cannot be read as int32 pairs in place: it is copied first."""
    torch.manual_seed(1)
    k, n = 256, 40
    qweight, scales, zeros = random_w4(k, n, 128)
    x = torch.randn(6, k)
    assert_close(K.w4_gemv(x, qweight, scales, zeros, 128), reference(x, qweight, scales, zeros, 128), 1e-5)
    wide = torch.randn(2, k + 1).bfloat16()
    x = wide[:, 1:]
    assert x.storage_offset() % 2 == 1
    assert_close(K.w4_gemv(x, qweight, scales, zeros, 128), reference(x, qweight, scales, zeros, 128), 1e-2)


@interpreter
def test_refuses_bad_shapes_and_dtypes() -> None:
    qweight, scales, zeros = random_w4(128, 16, 64)
    with pytest.raises(ValueError, match="qweight"):
        K.w4_gemv(torch.randn(2, 64), qweight, scales, zeros, 64)  # K != 8 * packed rows
    with pytest.raises(ValueError, match="need x"):
        K.w4_gemv(torch.randn(128), qweight, scales, zeros, 64)  # 1-D x
    with pytest.raises(ValueError, match="scales"):
        K.w4_gemv(torch.randn(2, 128), qweight, scales, zeros, 32)  # scales of another group size
    with pytest.raises(ValueError, match="multiple of 16"):
        K.w4_gemv(torch.randn(2, 128), qweight, scales, zeros, 24)
    with pytest.raises(ValueError, match="int32 qweight"):
        K.w4_gemv(torch.randn(2, 128), qweight.to(torch.int64), scales, zeros, 64)
    with pytest.raises(ValueError, match="uint8 zeros"):
        K.w4_gemv(torch.randn(2, 128), qweight, scales, zeros.to(torch.int32), 64)
    for kernel in (K.w4_gemv, K.w4_matmul):  # one layout for all three
        with pytest.raises(ValueError, match="N-major"):
            kernel(torch.randn(2, 128), n_major(qweight), scales, zeros, 64)
        with pytest.raises(ValueError, match="N-major"):
            kernel(torch.randn(2, 128), qweight[:, ::2], scales[:, ::2], zeros[:, ::2], 64)


def test_tile_sizes_follow_the_sm_count(monkeypatch: pytest.MonkeyPatch) -> None:
    gpus = importlib.import_module("pdserve.kernels.gpus")
    monkeypatch.setattr(gpus, "_properties", lambda index: types.SimpleNamespace(multi_processor_count=132))
    monkeypatch.setattr(gpus, "gpu_name", lambda index: "NVIDIA H200")  # the rule's wide tile
    cuda = torch.device("cuda", 0)
    assert gemv_tile_sizes(4096, 4096, cuda) == (16, 16, 4, 4, 4, 1)  # 256 programs of 16 columns
    assert gemv_tile_sizes(28672, 4096, cuda) == (32, 16, 8, 4, 4, 1)  # 896 programs: wide tiles
    assert gemv_tile_sizes(4096, 4096, cuda, group_size=64) == (16, 8, 4, 4, 4, 1)
    assert gemv_tile_sizes(896, 4864, cuda).splits == 2  # 56 column tiles, 9 iterations: K over 2 (4 iterations each at least)
    assert gemv_tile_sizes(896, 512, cuda).splits == 1  # 2 iterations: too short to split
    assert gemv_tile_sizes(4096, 4096, cuda, block_m=4)[:3] == (16, 16, 2)  # 4 rows: 2 slices
    assert gemv_tile_sizes(4096, 4096, torch.device("cpu")).block_n == 32  # one "SM": wide tiles
    monkeypatch.setattr(gpus, "gpu_name", lambda index: "NVIDIA H100 80GB HBM3")  # WIDE_ONE_ROW_TILES' entry
    assert gemv_tile_sizes(28672, 4096, cuda) == (64, 16, 1, 4, 4, 1)  # one row: the GPU's own wide tile
    assert gemv_tile_sizes(28672, 4096, cuda, block_m=2)[:3] == (32, 16, 8)  # two: the rule's
    assert gemv_tile_sizes(4096, 4096, cuda)[:3] == (16, 16, 4)  # narrow outputs: the rule's


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or INTERPRETED, reason="needs a CUDA GPU (and TRITON_INTERPRET unset)")
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("n,k", [(6144, 4096), (4096, 14336), (28672, 4096)])  # Llama-3-8B's qkv, down_proj, gate_up
def test_llama_shapes_on_gpu(n: int, k: int, layout: str) -> None:
    torch.manual_seed(0)
    qweight, scales, zeros = random_w4(k, n, 128, device="cuda", layout=layout)
    for m in (1, 2, 4):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        ref = K.w4_matmul_ref(x.float(), qweight, scales.float(), zeros, 128).double()
        out = K.w4_gemv(x, qweight, scales, zeros, 128)
        assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
        assert ((out.double() - ref).norm() / ref.norm()).item() < 1e-2, m
        assert_close(out, ref, 1e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or INTERPRETED, reason="needs a CUDA GPU (and TRITON_INTERPRET unset)")
def test_split_k_in_a_cuda_graph() -> None:
    """A launch with K split over 3 programs, captured once and replayed three
    times: each replay's last program finds its counter at zero and merges."""
    torch.manual_seed(0)
    qweight, scales, zeros = random_w4(4864, 896, 128, device="cuda")  # Qwen2.5-0.5B's down_proj
    x = torch.randn(1, 4864, device="cuda", dtype=torch.bfloat16)
    tiles = (16, 16, 2, 4, 4, 3)
    ref = K.w4_matmul_ref(x.float(), qweight, scales.float(), zeros, 128).double()
    eager = K.w4_gemv(x, qweight, scales, zeros, 128, tile_sizes=tiles)  # compiles, sizes the counters
    assert_close(eager, ref, 1e-2)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = K.w4_gemv(x, qweight, scales, zeros, 128, tile_sizes=tiles)
    for _ in range(3):
        out.zero_()
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(out, eager, rtol=0, atol=0)
