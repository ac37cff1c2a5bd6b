"""Quantized weights on a CUDA GPU: the Triton 8-bit and 4-bit matmuls against their torch
references at Llama-3-8B sizes, the FP8 tensor-core GEMM against the weight-only result, and the
engine (Triton kernels, CUDA graphs) against the same quantized checkpoints on the CPU.
Run on the lent GPU machine: `pytest -m gpu tests/test_quant_gpu.py`."""

from __future__ import annotations

import gc
import os
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="TRITON_INTERPRET=1 interprets the kernels"),
]

import pdserve.kernels as K  # noqa: E402
from pdserve.engine.quant_formats import quantize_per_channel  # noqa: E402
from pdserve.engine.quant_layers import fp8_gemm, fp8_gemm_kind  # noqa: E402

# (N, K) of Llama-3-8B's projections: qkv, o_proj, gate_up, down
SHAPES = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]
ROWS = [1, 7, 64, 300]


@pytest.fixture(autouse=True)
def release_gpu_memory() -> None:
    yield
    gc.collect()
    torch.cuda.empty_cache()


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert out.shape == ref.shape and torch.isfinite(out).all()
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.int8])
def test_w8_matmul_bf16(n: int, k: int, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    weight, scale = quantize_per_channel(torch.randn(n, k, device="cuda") * 0.02, dtype)
    for m in ROWS:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        ref = K.w8_matmul_ref(x.float(), weight, scale)
        assert rel_err(K.w8_matmul(x, weight, scale), ref) < 1e-2, m


@pytest.mark.parametrize("n,k", [*SHAPES, (896, 4864)])  # and Qwen2.5-0.5B's down (its own tiles)
@pytest.mark.parametrize("kind", ["bf16", "fp8", "int8"])
def test_gemv_bf16(n: int, k: int, kind: str) -> None:
    """Decode rows: 1..4, and for bf16 weights up to 16 (the tensor-core kernel from 2 rows)."""
    torch.manual_seed(0)
    w = torch.randn(n, k, device="cuda") * 0.02
    dtypes = {"fp8": torch.float8_e4m3fn, "int8": torch.int8}
    weight, scale = (w.bfloat16(), None) if kind == "bf16" else quantize_per_channel(w, dtypes[kind])
    for m in (1, 2, 4, 9, 16) if kind == "bf16" else (1, 2, 4):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        ref = K.gemv_ref(x, weight, scale).float()
        assert rel_err(K.gemv(x, weight, scale), ref) < 1e-2, m
        # SwiGLU in the epilogue (rows as [gate | up]): the projection, then silu_and_mul, bit for bit
        assert torch.equal(K.gemv(x, weight, scale, swiglu=True), K.silu_and_mul(K.gemv(x, weight, scale))), m


@pytest.mark.parametrize("n,k,swiglu", [(1152, 896, False), (9728, 896, True), (896, 896, False)])  # Qwen2.5-0.5B's
def test_gemv_add_rms_norm_bf16(n: int, k: int, swiglu: bool) -> None:
    """The norm folded into the one-row GEMV (PDL launches, as in a decode step) against the norm
    kernel then the GEMV: the new residual bit for bit, the projection as close to the exact
    (float64) one as theirs."""
    torch.manual_seed(n)
    x, residual = (torch.randn(1, k, device="cuda") * 4).bfloat16(), torch.randn(1, k, device="cuda").bfloat16()
    norm_weight = (1 + 0.1 * torch.randn(k, device="cuda")).bfloat16()
    weight, bias = (torch.randn(n, k, device="cuda") * 0.02).bfloat16(), (torch.randn(n, device="cuda") * 0.1).bfloat16()
    folded, new_residual = K.gemv_add_rms_norm(x, residual, norm_weight, 1e-6, weight, bias, swiglu=swiglu)
    normed, ref_residual = K.fused_add_rms_norm(x.clone(), residual.clone(), norm_weight, 1e-6)
    separate = K.gemv(normed, weight, bias=bias, swiglu=swiglu)
    assert torch.equal(new_residual, ref_residual)
    h = ref_residual.double()
    exact = (h * torch.rsqrt(h.pow(2).mean() + 1e-6) * norm_weight.double()) @ weight.double().t() + bias.double()
    if swiglu:
        exact = torch.nn.functional.silu(exact[:, : n // 2]) * exact[:, n // 2 :]
    assert rel_err(folded, exact) <= 1.5 * rel_err(separate, exact) + 1e-3


@pytest.mark.parametrize("n,k", SHAPES)
def test_w4_matmul_bf16(n: int, k: int) -> None:
    torch.manual_seed(0)
    group = 128
    qweight = torch.randint(-(2**31), 2**31 - 1, (k // 8, n), dtype=torch.int32, device="cuda")
    scales = (torch.rand(k // group, n, device="cuda") * 0.004 + 0.001).to(torch.bfloat16)
    zeros = torch.randint(0, 16, (k // group, n), dtype=torch.uint8, device="cuda")
    for m in ROWS:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        ref = K.w4_matmul_ref(x.float(), qweight, scales.float(), zeros, group)
        assert rel_err(K.w4_matmul(x, qweight, scales, zeros, group), ref) < 1e-2, m


@pytest.mark.parametrize("n,k", SHAPES)
def test_dequantize_bit_exact(n: int, k: int) -> None:
    """The prefill path's widened weights (kernels/dequantize.py) equal the torch references bit for bit."""
    torch.manual_seed(0)
    for dtype in (torch.float8_e4m3fn, torch.int8):
        weight, scale = quantize_per_channel(torch.randn(n, k, device="cuda") * 0.02, dtype)
        assert torch.equal(K.w8_dequantize(weight, scale, torch.bfloat16), K.w8_dequantize_ref(weight, scale, torch.bfloat16))
    qweight = torch.randint(-(2**31), 2**31 - 1, (k // 8, n), dtype=torch.int32, device="cuda")
    scales = (torch.rand(k // 128, n, device="cuda") * 0.004 + 0.001).half()
    zeros = torch.randint(0, 16, (k // 128, n), dtype=torch.uint8, device="cuda")
    widened = K.w4_dequantize(qweight, scales, zeros, 128, torch.bfloat16)
    assert torch.equal(widened, K.w4_dequantize_ref(qweight, scales, zeros, 128).bfloat16())


def test_quantize_fp8_rows_bit_exact() -> None:
    x = torch.randn(300, 4096, device="cuda", dtype=torch.bfloat16) * 3
    x[7] = 0.0
    codes, scale = K.quantize_fp8_rows(x)
    ref_codes, ref_scale = K.quantize_fp8_rows_ref(x)
    assert torch.equal(scale, ref_scale) and torch.equal(codes.view(torch.uint8), ref_codes.view(torch.uint8))


@pytest.mark.skipif(torch.cuda.is_available() and fp8_gemm_kind(torch.device("cuda")) is None, reason="no FP8 tensor cores")
@pytest.mark.parametrize("kind", ["rowwise", "tensorwise"])
def test_fp8_gemm_close_to_weight_only(kind: str) -> None:
    """Activations quantized to fp8 at run time add e4m3 rounding (~3% of each element)."""
    if kind == "rowwise" and fp8_gemm_kind(torch.device("cuda")) != "rowwise":
        pytest.skip("row-wise scaled FP8 GEMM needs sm90")
    torch.manual_seed(0)
    weight, scale = quantize_per_channel(torch.randn(4096, 4096, device="cuda") * 0.02, torch.float8_e4m3fn)
    x = torch.randn(512, 4096, device="cuda", dtype=torch.bfloat16)
    ref = K.w8_matmul_ref(x.float(), weight, scale)
    assert rel_err(fp8_gemm(x, weight, scale, kind), ref) < 4e-2


@pytest.mark.parametrize("fmt", ["fp8", "ct-int8-channel", "awq", "gptq-sym"])
def test_engine_on_gpu_equals_cpu(fmt: str, tmp_path: Path, demo_model_dir: Path) -> None:
    """fp32 on both devices: Triton kernels and CUDA-graph decode against the torch references."""
    from pdserve.engine import LLM, SamplingParams
    from tests.conftest import write_hf_checkpoint
    from tests.quant_checkpoints import write_quantized_checkpoint

    plain = write_hf_checkpoint(tmp_path / "plain", "llama", demo_model_dir, hidden_size=128, intermediate_size=256)
    path = tmp_path / fmt
    write_quantized_checkpoint(plain, path, fmt)
    prompts = [[(7 * i + 3 * j) % 800 + 1 for j in range(5 + 9 * i)] for i in range(12)]  # 12 prompts: > 64 prefill rows
    greedy = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    outputs: dict[str, list] = {}
    for device in ("cpu", "cuda"):
        llm = LLM(model=str(path), device=device, dtype="float32", num_kv_blocks=256, max_model_len=256, max_num_seqs=16)
        outputs[device] = llm.generate(prompts, greedy)
        # one at a time too: decode steps of one row take the GEMV kernels (kernels/gemv.py)
        outputs[device + "-alone"] = [llm.generate([prompt], greedy)[0] for prompt in prompts[:3]]
        del llm
    for cpu, gpu in zip(outputs["cpu"], outputs["cuda"]):
        assert gpu.outputs[0].token_ids == cpu.outputs[0].token_ids
    for cpu, gpu in zip(outputs["cpu-alone"], outputs["cuda-alone"]):
        assert gpu.outputs[0].token_ids == cpu.outputs[0].token_ids


# -- bf16 models: the serving configuration ---------------------------------------------------------
BF16_FORMATS = ["fp8", "ct-fp8-channel", "ct-int8-channel", "awq", "gptq-sym"]
# The quantized bf16 engine on the GPU is off the fp32 model by the quantization (the same checkpoint
# in fp32 on the CPU) plus bf16's rounding (the unquantized checkpoint in bf16 on the GPU), plus for
# fp8 prefill the activations' rounding to e4m3 (the FP8 GEMM: as much again as the weights').
# A kernel that dequantized wrongly (a scale, a zero, a nibble off) would add KL in whole nats.
KL_SLACK = {"fp8": 3.0, "ct-fp8-channel": 3.0, "ct-int8-channel": 1.5, "awq": 1.5, "gptq-sym": 1.5}


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory, demo_model_dir: Path) -> dict[str, Path]:
    from tests.test_quantization import write_plain_checkpoints

    return write_plain_checkpoints(tmp_path_factory.mktemp("plain"), demo_model_dir)


@pytest.fixture(scope="module")
def quantized(plain: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict:
    from tests.test_quantization import QuantizedCheckpoints

    return QuantizedCheckpoints(plain, tmp_path_factory.mktemp("quantized"))


def engines(path: Path) -> tuple[object, object]:
    """The checkpoint in fp32 on the CPU and in bf16 on the GPU (eager: the tests call the model
    directly), each used for prefill logits (sequence_logits) and decode steps (measure)."""
    from tests.test_quantization import make_llm

    return make_llm(path), make_llm(path, device="cuda", dtype="bfloat16", enforce_eager=True)


@pytest.fixture(scope="module")
def references(plain: dict[str, Path]) -> dict[str, dict]:
    """Per family: the fp32 CPU runner and prefill logits of the unquantized model, and how far its
    bf16 GPU engine strays from them (prefill agreement; decode measure)."""
    from tests.test_kv_fp8_accuracy import PROMPTS as TEXTS
    from tests.test_kv_fp8_accuracy import measure
    from tests.test_quantization import PROMPTS, agreement, sequence_logits

    out = {}
    for family, path in plain.items():
        fp32, bf16 = engines(path)
        logits = sequence_logits(fp32, PROMPTS)
        runner = fp32.engine.core.runner
        prompts = [fp32.get_tokenizer().encode(text) for text in TEXTS]
        out[family] = dict(
            runner=runner,
            prompts=prompts,
            logits=logits,
            prefill=agreement(logits, sequence_logits(bf16, PROMPTS)),
            decode=measure(runner, bf16.engine.core.runner, prompts),
        )
        del bf16
    return out


@pytest.mark.parametrize("fmt", BF16_FORMATS + ["ct-int8-channel-widened", "awq-widened"])
def test_bf16_quantized_engines_lose_only_what_quantization_and_bf16_lose(
    fmt: str, quantized: dict, references: dict[str, dict], monkeypatch: pytest.MonkeyPatch
) -> None:
    """bf16 on the GPU, as served: one 192-row prefill (the FP8 tensor-core GEMM for the fp8
    formats, w8_matmul for int8, w4_matmul for AWQ/GPTQ; "-widened": the weights widened to bf16
    and the bf16 GEMM, as longer prompts take) and decode steps of one row (the
    GEMVs). Against the unquantized fp32 model: KL within KL_SLACK x (the quantization's KL + bf16's
    KL), top-1 agreement no more than 0.1 below the worse of the two, on every family."""
    from pdserve.engine import quant_layers
    from tests.test_kv_fp8_accuracy import measure
    from tests.test_quantization import PROMPTS, agreement, sequence_logits

    if fmt.endswith("-widened"):
        fmt = fmt.removesuffix("-widened")
        for name in ("W8_WIDEN_MIN_ROWS", "W4_WIDEN_MIN_ROWS"):  # the 192-row prefill; decode rows keep the GEMVs
            monkeypatch.setattr(quant_layers, name, 64)

    rows = []
    for family in references:
        ref = references[family]
        fp32, bf16 = engines(quantized[(family, fmt)][0])
        cpu = agreement(ref["logits"], sequence_logits(fp32, PROMPTS))
        gpu = agreement(ref["logits"], sequence_logits(bf16, PROMPTS))
        cpu_decode = measure(ref["runner"], fp32.engine.core.runner, ref["prompts"])
        gpu_decode = measure(ref["runner"], bf16.engine.core.runner, ref["prompts"])
        rows.append((family, cpu, gpu, ref["prefill"], cpu_decode, gpu_decode, ref["decode"]))
        print(
            f"\n{fmt} {family}: prefill top1/KL quantized fp32 {cpu[0]:.3f}/{cpu[2]:.2e}, quantized bf16 GPU "
            f"{gpu[0]:.3f}/{gpu[2]:.2e}, plain bf16 GPU {ref['prefill'][0]:.3f}/{ref['prefill'][2]:.2e}; decode "
            f"{cpu_decode['top1']:.3f}/{cpu_decode['kl']:.2e}, {gpu_decode['top1']:.3f}/{gpu_decode['kl']:.2e}, "
            f"{ref['decode']['top1']:.3f}/{ref['decode']['kl']:.2e}"
        )
    for family, cpu, gpu, bf16, cpu_decode, gpu_decode, bf16_decode in rows:
        assert gpu[2] <= KL_SLACK[fmt] * (cpu[2] + bf16[2]), (family, "prefill", gpu, cpu, bf16)
        assert gpu[0] >= min(cpu[0], bf16[0]) - 0.1, (family, "prefill", gpu, cpu, bf16)
        assert gpu_decode["kl"] <= KL_SLACK[fmt] * (cpu_decode["kl"] + bf16_decode["kl"]), (family, "decode")
        assert gpu_decode["top1"] >= min(cpu_decode["top1"], bf16_decode["top1"]) - 0.1, (family, "decode")
