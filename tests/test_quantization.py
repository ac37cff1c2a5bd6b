"""Quantized weights, end to end on the CPU: checkpoints of every supported format written by the
independent quantizer/packer in tests/quant_checkpoints.py (from the formats' descriptions), for
the four families; online fp8/int8 quantization of the plain checkpoints.

(a) the engine's dequantized weights equal the format's own dequantization, bit for bit;
(b) the engine's quantized model equals HF transformers running those dequantized weights
    (transformers itself loads only the compressed-tensors ones here, through that library: checked
    weight for weight too; fp8 needs accelerate and a GPU or its dequantize fallback, awq/gptq
    gptqmodel and a GPU);
(c) accuracy against the unquantized fp32 model over a fixed prompt set: top-1 agreement and
    mean KL(p_fp32 || p_quantized) of the next-token distributions, teacher-forced.
And the strict loader: unknown tensors, missing scales, configs it cannot honour, named."""

from __future__ import annotations

import copy
import importlib
import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from pdserve import kernels
from pdserve.engine import LLM, SamplingParams
from pdserve.engine.config import ConfigError
from pdserve.engine.quant_formats import quantize_per_channel
from pdserve.engine.quant_layers import W4Linear, W8Linear, fp8_gemm
from pdserve.engine.request import Request, ScheduledRequest
from pdserve.kernels.pdl import PDL_MAX_ROWS
from tests.conftest import FAMILIES, write_hf_checkpoint
from tests.quant_checkpoints import (
    AWQ_ORDER,
    CONFIGS,
    edit_config,
    edit_tensors,
    pack_along_columns,
    unpack_columns,
    write_quantized_checkpoint,
)

FORMATS = list(
    CONFIGS
)  # fp8 (per tensor, per channel), compressed-tensors fp8/int8 (per channel, per tensor), awq, gptq (sym, asym, v2, group 64, whole rows)
ONLINE = ["fp8", "int8"]
# Accuracy bounds, teacher-forced over PROMPTS on each family. KL: llama.cpp's KL-divergence runs
# against fp16 (Llama-3-8B) give ~0.001 for 8-bit (Q8_0) and ~0.03-0.1 for 4-bit (Q4_K_M .. Q4_0);
# we measure int8 2e-4, fp8 (3 mantissa bits: ~4x int8's rounding noise) 3-4e-3, W4 g128 RTN
# 0.045-0.061, and bound each at ~3x. Top-1: random tiny models have flat next-token distributions
# (the top two logits close), so a given logit noise flips far more argmaxes than on a trained
# model (where 8-bit keeps ~99% and 4-bit ~90% of top-1); measured int8 0.93-0.98, fp8 0.77-0.89,
# W4 0.40-0.50, bounded ~0.05-0.1 below; and the quantized top-1 must stay in the reference's top 5
# (vLLM's check_logprobs_close criterion): measured >= 0.995 for 8 bits, 0.80-0.89 for W4.
MIN_TOP1 = {"int8": 0.90, "fp8": 0.70, "w4": 0.35}
MIN_IN_TOP5 = {"int8": 0.99, "fp8": 0.98, "w4": 0.75}
MAX_KL = {"int8": 0.001, "fp8": 0.012, "w4": 0.15}
# gptq-asym and ct-fp8-tensor round exactly as awq and fp8 do (only the packing differs, checked
# bit for bit above): their accuracy is theirs.
ACCURACY_FORMATS = ["fp8", "ct-fp8-channel", "ct-int8-channel", "awq", "gptq-sym", "online-fp8", "online-int8"]


def random_prompts(vocab_size: int, num: int = 8, length: int = 24, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab_size) for _ in range(length)] for _ in range(num)]


PROMPTS = random_prompts(832)  # within the demo tokenizer's vocabulary: 8 x 24 positions a family


def write_plain_checkpoints(root: Path, demo_model_dir: Path) -> dict[str, Path]:
    """Unquantized fp32 checkpoints wide enough for 128-input groups (hidden 128, intermediate 256).
    Qwen3's heads are 64 wide, so its q/k/v and o projections are not square (q 256 x 128, o 128 x 256)."""
    wider_heads = {"qwen3": {"head_dim": 64}}
    return {
        family: write_hf_checkpoint(
            root / family, family, demo_model_dir, hidden_size=128, intermediate_size=256, **wider_heads.get(family, {})
        )
        for family in FAMILIES
    }


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory, demo_model_dir: Path) -> dict[str, Path]:
    return write_plain_checkpoints(tmp_path_factory.mktemp("plain"), demo_model_dir)


class QuantizedCheckpoints(dict):
    """(family, format) -> (checkpoint directory, dequantized weights by HF module name), written
    on first use."""

    def __init__(self, plain: dict[str, Path], root: Path) -> None:
        super().__init__()
        self.plain, self.root = plain, root

    def __missing__(self, key: tuple[str, str]) -> tuple[Path, dict[str, np.ndarray]]:
        family, fmt = key
        target = self.root / f"{family}-{fmt}"
        self[key] = (target, write_quantized_checkpoint(self.plain[family], target, fmt))
        return self[key]


@pytest.fixture(scope="module")
def quantized(plain: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> QuantizedCheckpoints:
    return QuantizedCheckpoints(plain, tmp_path_factory.mktemp("quantized"))


def make_llm(path: Path, **kwargs: object) -> LLM:
    settings = dict(device="cpu", dtype="float32", num_kv_blocks=64, max_model_len=256, enable_prefix_caching=False)
    return LLM(model=str(path), **(settings | kwargs))


@torch.inference_mode()
def sequence_logits(llm: LLM, prompts: list[list[int]]) -> torch.Tensor:
    """fp32 logits [sum of lengths, vocab] of every position of every prompt, one batched
    prefill through the engine's model and KV cache."""
    core = llm.engine.core
    batch = []
    for i, tokens in enumerate(prompts):
        request = Request(f"logits-{i}", tokens, SamplingParams(max_tokens=1))
        request.block_table = core.block_manager.allocate(tokens).block_table
        batch.append(ScheduledRequest(request, len(tokens)))
    inputs = core.runner.prepare_inputs(batch)
    hidden = core.runner.model(inputs.input_ids, inputs.positions, core.runner.kv_cache, inputs.meta)
    for item in batch:
        core.block_manager.free(item.request.block_table)
    return core.runner.model.compute_logits(hidden).float().cpu()


def engine_weights(llm: LLM) -> dict[str, np.ndarray]:
    """Each HF projection's weight [N, K] as the engine computes with it, dequantized."""
    weights = {}
    for name, module in llm.engine.core.runner.model.named_modules():
        if isinstance(module, W8Linear):
            full = module.weight.double() * module.weight_scale.double()[:, None]
        elif isinstance(module, W4Linear):
            full = kernels.w4_dequantize_ref(module.qweight, module.scales, module.zeros, module.group_size).double().t()
        else:
            continue
        prefix, _, ours = name.rpartition(".")
        shards = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}.get(ours)
        for (start, size), hf in zip(module.shard_ranges.values(), shards or []):
            weights[f"{prefix}.{hf}"] = full[start : start + size].numpy()
        if not shards:
            weights[name] = full.numpy()
    return weights


def hf_logits_with(path: Path, weights: dict[str, np.ndarray], tokens: list[int]) -> torch.Tensor:
    """transformers' model of the unquantized checkpoint `path` with `weights` put in its projections."""
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    state = {f"{name}.weight": torch.from_numpy(w).float() for name, w in weights.items()}
    model.load_state_dict(state, strict=False)
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].float()


# -- (a) and (b): the formats as specified --------------------------------------------------------
@pytest.mark.parametrize("fmt", FORMATS)
def test_checkpoint_weights_dequantize_as_the_format_specifies(fmt: str, quantized: dict, plain: dict[str, Path]) -> None:
    family = list(FAMILIES)[FORMATS.index(fmt) % len(FAMILIES)]
    path, expected = quantized[(family, fmt)]
    llm = make_llm(path)
    got = engine_weights(llm)
    assert sorted(got) == sorted(expected)  # every projection quantized, fused shards included
    for name, weight in expected.items():
        # Exact: per-tensor scales of fused q/k/v and gate/up shards are kept per shard.
        np.testing.assert_allclose(got[name], weight, rtol=1e-6, atol=0, err_msg=name)
    tokens = random_prompts(llm.engine.core.model_config.vocab_size, num=1, length=20)[0]
    torch.testing.assert_close(
        sequence_logits(llm, [tokens]), hf_logits_with(plain[family], expected, tokens), rtol=1e-4, atol=1e-4
    )


@pytest.mark.parametrize("fmt", ["ct-fp8-channel", "ct-fp8-tensor", "ct-int8-channel", "ct-int8-tensor"])
def test_compressed_tensors_checkpoints_load_as_their_library_decompresses_them(fmt: str, quantized: dict) -> None:
    """The format's own code: transformers with the compressed-tensors library decompresses each
    checkpoint into dense weights, computing in the scales' dtype (bf16, as llm-compressor writes
    them); they are the engine's weights rounded to bf16, element for element, on every family."""
    from transformers import CompressedTensorsConfig

    for family in FAMILIES:
        path = quantized[(family, fmt)][0]
        model = transformers.AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float32, quantization_config=CompressedTensorsConfig(dequantize=True)
        )
        library = {name.removesuffix(".weight"): w for name, w in model.state_dict().items()}
        ours = engine_weights(make_llm(path))
        assert len(ours) == 7 * model.config.num_hidden_layers
        for name, weight in ours.items():
            expected = torch.from_numpy(weight).bfloat16().float()
            torch.testing.assert_close(library[name], expected, rtol=0, atol=0, msg=f"{family} {name}")


@pytest.mark.parametrize("method", ONLINE)
def test_online_quantization_is_per_output_channel(method: str, plain: dict[str, Path]) -> None:
    """--quantization fp8|int8 on a plain checkpoint: each row scaled so its largest |w| is the
    format's largest value (448 / 127), rounded to nearest."""
    from safetensors.torch import load_file

    path = plain["llama"]
    llm = make_llm(path, quantization=method)
    original = load_file(path / "model.safetensors")
    got = engine_weights(llm)
    assert len(got) == 7 * 2
    limit = 448.0 if method == "fp8" else 127.0
    for name, weight in got.items():
        w = original[f"{name}.weight"].double()
        scale = w.abs().amax(dim=1, keepdim=True) / limit
        q = (w / scale).float()
        q = q.to(torch.float8_e4m3fn).double() if method == "fp8" else q.round().double()
        np.testing.assert_allclose(weight, (q * scale).numpy(), rtol=1e-6, atol=1e-12, err_msg=name)


# -- (c) accuracy ----------------------------------------------------------------------------------
def agreement(reference: torch.Tensor, candidate: torch.Tensor) -> tuple[float, float, float]:
    """(top-1 agreement, the candidate's top-1 within the reference's top 5, mean KL(p_ref || p_candidate))
    over the positions of the prompt set; logits [positions, vocab]."""
    top1 = (reference.argmax(-1) == candidate.argmax(-1)).double().mean().item()
    in_top5 = (reference.topk(5, dim=-1).indices == candidate.argmax(-1, keepdim=True)).any(-1).double().mean().item()
    kl = torch.nn.functional.kl_div(candidate.log_softmax(-1), reference.log_softmax(-1), log_target=True, reduction="batchmean")
    return top1, in_top5, kl.item()


@pytest.fixture(scope="module")
def reference_logits(plain: dict[str, Path]) -> dict[str, torch.Tensor]:
    return {family: sequence_logits(make_llm(path), PROMPTS) for family, path in plain.items()}


@pytest.mark.parametrize("fmt", ACCURACY_FORMATS)
def test_accuracy_close_to_unquantized(
    fmt: str, reference_logits: dict[str, torch.Tensor], quantized: dict, plain: dict[str, Path]
) -> None:
    scheme = "w4" if fmt in ("awq", "gptq-sym") else "int8" if "int8" in fmt else "fp8"
    rows = []
    for family in FAMILIES:
        if fmt.startswith("online-"):
            candidate = make_llm(plain[family], quantization=fmt.removeprefix("online-"))
        else:
            candidate = make_llm(quantized[(family, fmt)][0])
        rows.append((family, *agreement(reference_logits[family], sequence_logits(candidate, PROMPTS))))
    print(f"\n{fmt}: " + "  ".join(f"{f} top1 {t:.3f} top5 {t5:.3f} KL {k:.4f}" for f, t, t5, k in rows))
    for family, top1, in_top5, kl in rows:
        assert top1 >= MIN_TOP1[scheme] and in_top5 >= MIN_IN_TOP5[scheme] and kl <= MAX_KL[scheme], (family, top1, in_top5, kl)


def test_the_accuracy_bounds_catch_a_wrong_nibble_order(
    reference_logits: dict[str, torch.Tensor], quantized: dict, tmp_path: Path
) -> None:
    """An AWQ checkpoint whose nibbles were packed in GPTQ's sequential order (each group of 8 output
    columns permuted, as a loader with the wrong order would read it) must fail the W4 bounds, or
    they would not notice a mis-decoded format."""
    path = copy_of(quantized[("llama", "awq")][0], tmp_path)

    def repack(tensors: dict[str, torch.Tensor]) -> None:
        for name in [n for n in tensors if n.endswith(".qweight")]:
            tensors[name] = pack_along_columns(unpack_columns(tensors[name], AWQ_ORDER), list(range(8)))

    edit_tensors(path, repack)
    top1, in_top5, kl = agreement(reference_logits["llama"], sequence_logits(make_llm(path), PROMPTS))
    print(f"\nawq in the wrong nibble order: top1 {top1:.3f} top5 {in_top5:.3f} KL {kl:.4f}")
    assert top1 < MIN_TOP1["w4"] or in_top5 < MIN_IN_TOP5["w4"] or kl > MAX_KL["w4"]


# -- the fp8 KV cache on quantized weights -----------------------------------------------------------
@pytest.fixture(scope="module")
def fp8_kv_on_plain(plain: dict[str, Path]) -> dict[str, dict[str, float]]:
    """test_kv_fp8_accuracy's measure of an fp8 cache against a full-precision one, on the plain checkpoints."""
    from tests.test_kv_fp8_accuracy import load_runner, measure

    return {family: measure(load_runner(path, "auto")[0], *load_runner(path, "fp8")) for family, path in plain.items()}


@pytest.mark.parametrize("fmt", ["fp8", "ct-int8-channel", "awq", "gptq-asym"])
def test_fp8_kv_cache_on_quantized_weights_stays_as_close_as_on_plain_ones(
    fmt: str, quantized: dict, fp8_kv_on_plain: dict[str, dict[str, float]]
) -> None:
    """The two savings compose: on each family's quantized checkpoint, an fp8 KV cache costs about
    what it costs the plain weights (mean KL within 2x of theirs, top-1 agreement at most 0.05
    below), flipping the top-1 and greedy outputs only at near-ties; each against the same weights
    over a full-precision cache (test_kv_fp8_accuracy's measure)."""
    from tests.test_kv_fp8_accuracy import MIN_TOP1_AGREEMENT, NEAR_TIE, load_runner, measure

    for family in FAMILIES:
        path = quantized[(family, fmt)][0]
        reference, prompts = load_runner(path, "auto")
        fp8, _ = load_runner(path, "fp8")
        assert fp8.kv_cache.dtype == torch.float8_e4m3fn
        m, on_plain = measure(reference, fp8, prompts), fp8_kv_on_plain[family]
        print(f"\n{fmt} {family}: " + ", ".join(f"{k} {v:.3g} (plain {on_plain[k]:.3g})" for k, v in m.items()))
        assert m["kl"] <= 2 * on_plain["kl"], (family, m, on_plain)
        assert m["top1"] >= min(MIN_TOP1_AGREEMENT, on_plain["top1"] - 0.05), (family, m, on_plain)
        assert m["max_flip_margin"] < NEAR_TIE and m["max_divergence_margin"] < NEAR_TIE, (family, m)


# -- quantization with random weights (benchmarks) ---------------------------------------------------
@pytest.mark.parametrize("method,layer", [("fp8", W8Linear), ("int8", W8Linear), ("awq", W4Linear), ("gptq", W4Linear)])
def test_dummy_weights_quantized_in_bf16(method: str, layer: type, plain: dict[str, Path]) -> None:
    """Random quantized weights (benchmarks); the q/k/v bias and every activation stay in the model's dtype."""
    llm = make_llm(plain["qwen2"], quantization=method, load_format="dummy", dtype="bfloat16")
    model = llm.engine.core.runner.model
    qkv = model.model.layers[0].self_attn.qkv_proj
    assert isinstance(qkv, layer) and isinstance(model.model.layers[1].mlp.down_proj, layer)
    assert qkv.bias.dtype == torch.bfloat16
    assert qkv(torch.randn(3, 128, dtype=torch.bfloat16)).dtype == torch.bfloat16
    out = llm.generate([[1, 2, 3]], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 4


@pytest.mark.parametrize("method,rows", [(None, PDL_MAX_ROWS), ("fp8", 2), ("int8", 2), ("awq", 1), ("gptq", 1)])
def test_forward_passes_chain_the_rows_their_projections_allow(
    method: str | None, rows: int, plain: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every forward pass runs under its model's PDL row limit (kernels/pdl.py): bf16 projections
    PDL_MAX_ROWS, 8-bit weights 2 (their GEMV's rows), 4-bit weights 1."""
    pdl = importlib.import_module("pdserve.kernels.pdl")
    llm = make_llm(plain["qwen2"], quantization=method, load_format="dummy", dtype="bfloat16")
    model = llm.engine.core.runner.model
    down = model.model.layers[0].mlp.down_proj
    limits = []
    forward = down.forward
    monkeypatch.setattr(down, "forward", lambda x: (limits.append(pdl._max_rows.get()), forward(x))[1])
    llm.generate([[1, 2, 3], [4, 5]], SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True))
    assert model.pdl_max_rows == rows and limits and set(limits) == {rows}


@pytest.mark.parametrize("kind", ["rowwise", "tensorwise"])
def test_fp8_gemm_close_to_weight_only(kind: str) -> None:
    """The prefill path for fp8 weights (torch._scaled_mm; it runs on the CPU too): activations
    quantized to e4m3 at run time add ~2.5% relative error over the weight-only product."""
    torch.manual_seed(0)
    weight, scale = quantize_per_channel(torch.randn(96, 256) * 0.02, torch.float8_e4m3fn)
    x = torch.randn(80, 256).bfloat16()
    x[3] *= 50  # an outlier token: per-token scales keep the other rows' precision
    ref = kernels.w8_matmul_ref(x.float(), weight, scale)
    out = fp8_gemm(x, weight, scale, kind).float()
    assert ((out - ref).norm() / ref.norm()).item() < 0.04
    if kind == "rowwise":
        row_errors = (out - ref).norm(dim=1) / ref.norm(dim=1)
        assert row_errors.max().item() < 0.06


def test_cli_flag_reaches_the_engine_config() -> None:
    from pdserve.deploy.cli import build_parser, serve_config

    config = serve_config(build_parser().parse_args(["serve", "--quantization", "int8"]))
    assert config.engine.quantization == "int8"


# -- the strict loader -------------------------------------------------------------------------------
def copy_of(path: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(path, tmp_path / path.name))


def test_unknown_tensor_name_is_an_error_naming_it(plain: dict[str, Path], tmp_path: Path) -> None:
    path = copy_of(plain["llama"], tmp_path)
    edit_tensors(path, lambda t: t.__setitem__("model.layers.0.self_attn.q_prj.weight", torch.zeros(128, 128)))
    with pytest.raises(ConfigError, match=r"model\.layers\.0\.self_attn\.q_prj\.weight"):
        make_llm(path)


@pytest.mark.parametrize(
    "name", ["model.layers.7.self_attn.k_scale", "model.self_attn.v_scale", "model.layers.9.self_attn.rotary_emb.inv_freq"]
)
def test_a_skipped_kind_of_tensor_of_no_layer_is_an_error_naming_it(name: str, plain: dict[str, Path], tmp_path: Path) -> None:
    """KV scales and old rotary tables are skipped as weights, but only those of a real attention layer."""
    path = copy_of(plain["llama"], tmp_path)
    edit_tensors(path, lambda t: t.__setitem__(name, torch.tensor(0.5)))
    with pytest.raises(ConfigError, match=name.replace(".", r"\.")):
        make_llm(path)

    def of_a_real_layer(tensors: dict[str, torch.Tensor]) -> None:
        del tensors[name]
        tensors["model.layers.1.self_attn.rotary_emb.inv_freq"] = torch.ones(16)  # an old checkpoint's table: skipped

    edit_tensors(path, of_a_real_layer)
    make_llm(path)


def test_scale_in_an_unquantized_checkpoint_is_an_error_naming_it(plain: dict[str, Path], tmp_path: Path) -> None:
    path = copy_of(plain["mistral"], tmp_path)
    edit_tensors(path, lambda t: t.__setitem__("model.layers.1.self_attn.o_proj.weight_scale", torch.tensor(0.1)))
    with pytest.raises(ConfigError, match=r"model\.layers\.1\.self_attn\.o_proj\.weight_scale"):
        make_llm(path)


@pytest.mark.parametrize(
    "fmt,dropped",
    [
        ("fp8", "model.layers.1.self_attn.o_proj.weight_scale"),
        ("ct-fp8-channel", "model.layers.0.self_attn.k_proj.weight_scale"),
        ("ct-fp8-tensor", "model.layers.1.mlp.gate_proj.weight_scale"),
        ("ct-int8-channel", "model.layers.0.self_attn.q_proj.weight_scale"),
        ("awq", "model.layers.0.mlp.up_proj.qzeros"),
        ("awq", "model.layers.1.self_attn.o_proj.scales"),
        ("gptq-sym", "model.layers.1.mlp.down_proj.scales"),
        ("gptq-asym", "model.layers.0.self_attn.k_proj.qzeros"),
        ("gptq-v2", "model.layers.1.self_attn.v_proj.qweight"),
    ],
)
def test_missing_scale_is_an_error_naming_it(fmt: str, dropped: str, quantized: dict, tmp_path: Path) -> None:
    path = copy_of(quantized[("llama", fmt)][0], tmp_path)
    edit_tensors(path, lambda t: t.pop(dropped))
    with pytest.raises(ConfigError, match=dropped.replace(".", r"\.")):
        make_llm(path)


def _ct_with(group: dict | None = None, weights: dict | None = None, groups: int = 1) -> dict:
    """CONFIGS["ct-fp8-channel"] with its config group's (or its weights') fields changed, or its group repeated."""
    config = copy.deepcopy(CONFIGS["ct-fp8-channel"])
    group_0 = config["config_groups"]["group_0"]
    group_0.update(group or {})
    group_0["weights"].update(weights or {})
    config["config_groups"] = {f"group_{i}": group_0 for i in range(groups)}
    return config


@pytest.mark.parametrize(
    "fmt,changes,named",
    [
        ("gptq-sym", {"desc_act": True}, "desc_act"),
        ("gptq-sym", {"bits": 3}, "bits"),
        ("gptq-sym", {"lm_head": True}, "lm_head"),
        ("gptq-sym", {"checkpoint_format": "marlin"}, "checkpoint_format"),
        ("gptq-sym", {"group_size": 40}, "group_size"),
        ("awq", {"version": "gemv"}, "version"),
        ("awq", {"bits": 8}, "bits"),
        ("fp8", {"weight_block_size": [128, 128]}, "weight_block_size"),
        ("fp8", {"activation_scheme": "per-token"}, "activation_scheme"),
        ("fp8", {"quant_method": "bitsandbytes"}, "bitsandbytes"),
        ("ct-fp8-channel", {"format": "pack-quantized"}, "pack-quantized"),
        ("ct-fp8-channel", {"kv_cache_scheme": {"num_bits": 8, "type": "float"}}, "kv_cache_scheme"),
        ("ct-fp8-channel", _ct_with(groups=2), "config_groups"),
        ("ct-fp8-channel", _ct_with(group={"targets": ["Attention"]}), "targets"),
        ("ct-fp8-channel", _ct_with(weights={"num_bits": 4, "type": "int"}), "4-bit int"),
        ("ct-fp8-channel", _ct_with(weights={"strategy": "group", "group_size": 128}), "strategy"),
        ("ct-fp8-channel", _ct_with(weights={"symmetric": False}), "symmetric"),
        ("ct-fp8-channel", _ct_with(weights={"dynamic": True}), "static"),
    ],
)
def test_unsupported_quantization_config_is_an_error_naming_it(
    fmt: str, changes: dict, named: str, quantized: dict, tmp_path: Path
) -> None:
    path = copy_of(quantized[("llama", fmt)][0], tmp_path)
    edit_config(path, quantization_config=CONFIGS[fmt] | changes)
    with pytest.raises(ConfigError, match=named):
        make_llm(path)


@pytest.mark.parametrize(
    "fmt,name,replace,named",
    [
        # an fp8 checkpoint's weight in bf16, as a half-converted checkpoint would hold it
        ("fp8", "model.layers.0.mlp.down_proj.weight", lambda t: t.bfloat16(), "bfloat16"),
        ("ct-int8-channel", "model.layers.1.self_attn.q_proj.weight_scale", lambda t: t[: t.shape[0] // 2], "weight_scale"),
        ("fp8", "model.layers.0.self_attn.v_proj.input_scale", lambda t: t.reshape(1).repeat(2), "input_scale"),
        ("awq", "model.layers.1.mlp.gate_proj.qweight", lambda t: t.float(), "qweight"),
        ("gptq-asym", "model.layers.0.self_attn.o_proj.scales", lambda t: t[:, :8], "scales"),
    ],
)
def test_a_malformed_quantized_tensor_is_an_error_naming_it(
    fmt: str, name: str, replace: Callable[[torch.Tensor], torch.Tensor], named: str, quantized: dict, tmp_path: Path
) -> None:
    path = copy_of(quantized[("llama", fmt)][0], tmp_path)
    edit_tensors(path, lambda t: t.__setitem__(name, replace(t[name]).contiguous()))
    with pytest.raises(ConfigError, match=name.replace(".", r"\.")) as error:
        make_llm(path)
    assert named in str(error.value)


def test_act_order_g_idx_is_an_error_naming_it(quantized: dict, tmp_path: Path) -> None:
    path = copy_of(quantized[("qwen3", "gptq-asym")][0], tmp_path)
    name = "model.layers.0.mlp.down_proj.g_idx"  # two groups of 128 inputs
    edit_tensors(path, lambda t: t.__setitem__(name, t[name].flip(0).contiguous()))
    with pytest.raises(ConfigError, match=name.replace(".", r"\.")):
        make_llm(path)


def test_quantization_flag_must_match_the_checkpoint(quantized: dict, plain: dict[str, Path]) -> None:
    with pytest.raises(ConfigError, match="awq"):
        make_llm(quantized[("llama", "gptq-sym")][0], quantization="awq")
    with pytest.raises(ConfigError, match="no quantization_config"):
        make_llm(plain["llama"], quantization="gptq")
    qkv = (
        make_llm(quantized[("llama", "gptq-sym")][0], quantization="gptq")
        .engine.core.runner.model.model.layers[0]
        .self_attn.qkv_proj
    )
    assert isinstance(qkv, W4Linear) and qkv.checkpoint_format == "gptq"


def test_tied_embeddings_and_rotary_tables_still_load(plain: dict[str, Path], tmp_path: Path) -> None:
    path = copy_of(plain["qwen2"], tmp_path)  # tied: no lm_head.weight in the file
    edit_tensors(path, lambda t: t.__setitem__("model.layers.0.self_attn.rotary_emb.inv_freq", torch.ones(16)))
    llm = make_llm(path)
    model = llm.engine.core.runner.model
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_ignored_modules_stay_unquantized(quantized: QuantizedCheckpoints, plain: dict[str, Path], tmp_path: Path) -> None:
    """compressed-tensors `ignore`: those projections load as plain weights; a fused layer must be
    ignored whole (q/k/v, gate/up run as one matmul)."""
    from safetensors.torch import load_file

    path = copy_of(quantized[("mistral", "ct-fp8-channel")][0], tmp_path)
    original = load_file(plain["mistral"] / "model.safetensors")
    mlp = [f"model.layers.0.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")]

    def unquantize(tensors: dict[str, torch.Tensor]) -> None:
        for module in mlp:
            tensors.pop(f"{module}.weight_scale")
            tensors[f"{module}.weight"] = original[f"{module}.weight"]

    edit_tensors(path, unquantize)
    config = CONFIGS["ct-fp8-channel"]
    edit_config(path, quantization_config=config | {"ignore": ["lm_head", "re:.*layers\\.0\\.mlp\\..*"]})
    layer0 = make_llm(path).engine.core.runner.model.model.layers[0]
    assert type(layer0.mlp.gate_up_proj).__name__ == "MergedLinear" and isinstance(layer0.self_attn.qkv_proj, W8Linear)
    edit_config(path, quantization_config=config | {"ignore": ["lm_head", "model.layers.0.mlp.gate_proj"]})
    with pytest.raises(ConfigError, match="gate_proj"):
        make_llm(path)
