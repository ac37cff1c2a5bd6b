"""The engine against HF transformers (fp32, CPU) on tiny checkpoints transformers wrote: greedy
tokens equal `generate`, logits within 1e-4, with prefix-cache hits, chunked prefill and preemption."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
import transformers

from pdserve.engine import LLM, SamplingParams, model_runner
from pdserve.engine.request import ScheduledRequest
from tests.conftest import FAMILIES

MAX_NEW_TOKENS = 12
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_NEW_TOKENS, ignore_eos=True)


def random_prompts(vocab_size: int, lengths: list[int], seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab_size) for _ in range(n)] for n in lengths]


@pytest.fixture(scope="module")
def hf_models(checkpoints: dict[str, Path]) -> dict[str, transformers.PreTrainedModel]:
    models = {}
    for family, path in checkpoints.items():
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        model.generation_config.eos_token_id = None
        model.generation_config.pad_token_id = 0
        models[family] = model
    return models


def hf_greedy(model: transformers.PreTrainedModel, prompt: list[int], num_tokens: int = MAX_NEW_TOKENS) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=num_tokens, do_sample=False)
    return out[0, len(prompt) :].tolist()


def hf_logits(model: transformers.PreTrainedModel, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].float()


def record_logits(llm: LLM) -> list[tuple[list[str], list[int], torch.Tensor]]:
    """Wrap the runner so each step's (request ids, positions, logits) is kept (steps that compute
    logits: not those launched ahead)."""
    runner = llm.engine.core.runner
    original = runner.compute_logits
    steps: list[tuple[list[str], list[int], torch.Tensor]] = []

    def compute_logits(batch: list[ScheduledRequest], on_layer: object = None):  # noqa: ANN202
        positions = [s.request.num_computed_tokens + s.num_tokens - 1 for s in batch if s.is_sampled]
        step = original(batch, on_layer)
        steps.append(([r.request_id for r in step.requests], positions, step.logits.clone()))
        return step

    runner.compute_logits = compute_logits
    return steps


@pytest.mark.parametrize("layout", ["cublas", "decode-gemv"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_greedy_and_logits_match_transformers(
    family: str, layout: str, checkpoints: dict, hf_models: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Synchronous steps: each computes its logits (a step launched ahead keeps only its tokens);
    # tests/test_step_pipeline.py checks the tokens of steps launched ahead against HF.
    # "decode-gemv": o_proj, gate_up and down loaded [out, in], as on an sm_90 GPU, where steps of
    # a few rows run our GEMV; "cublas": [in, out], as on the CPU and other GPUs.
    monkeypatch.setattr(model_runner, "uses_decode_gemv", lambda device: layout == "decode-gemv")
    llm = LLM(model=str(checkpoints[family]), device="cpu", dtype="float32", async_scheduling=False)
    assert llm.engine.core.runner.model.model.layers[0].mlp.down_proj.transposed == (layout == "cublas")
    hf = hf_models[family]
    prompts = random_prompts(hf.config.vocab_size, [1, 7, 16, 33, 70])
    steps = record_logits(llm)
    outputs = llm.generate(prompts, GREEDY)

    for prompt, output in zip(prompts, outputs):
        assert output.outputs[0].token_ids == hf_greedy(hf, prompt)
        assert output.outputs[0].finish_reason == "length"
    # Every logits row the engine produced (prefill and decode steps) equals HF's at that position.
    by_id = {o.request_id: o for o in outputs}
    num_checked = 0
    for request_ids, positions, logits in steps:
        for row, (request_id, position) in enumerate(zip(request_ids, positions)):
            out = by_id[request_id]
            tokens = out.prompt_token_ids + out.outputs[0].token_ids
            reference = hf_logits(hf, tokens[: position + 1])[position]
            assert torch.allclose(logits[row], reference, atol=1e-4, rtol=0), (family, request_id, position)
            num_checked += 1
    assert num_checked == len(prompts) * MAX_NEW_TOKENS
    assert llm.engine.core.block_manager.num_used_blocks == 0


def test_string_prompt_and_text(checkpoints: dict, hf_models: dict) -> None:
    llm = LLM(model=str(checkpoints["llama"]), device="cpu", dtype="float32")
    tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoints["llama"])
    prompt = "The quick brown fox jumps over the lazy dog."
    [output] = llm.generate(prompt, GREEDY)
    ids = tokenizer(prompt).input_ids
    assert output.prompt_token_ids == ids
    expected = hf_greedy(hf_models["llama"], ids)
    assert output.outputs[0].token_ids == expected
    assert output.outputs[0].text == tokenizer.decode(expected, skip_special_tokens=True)


def test_prefix_cache_hits_give_the_same_tokens(checkpoints: dict, hf_models: dict) -> None:
    llm = LLM(model=str(checkpoints["qwen2"]), device="cpu", dtype="float32", block_size=8)
    hf = hf_models["qwen2"]
    shared = random_prompts(hf.config.vocab_size, [40], seed=1)[0]
    tails = random_prompts(hf.config.vocab_size, [0, 3, 9, 17], seed=2)
    prompts = [shared + tail for tail in tails]
    [first] = llm.generate([prompts[0]], GREEDY)  # fills the prefix cache
    assert first.num_cached_tokens == 0
    outputs = llm.generate(prompts, GREEDY)
    assert all(o.num_cached_tokens >= 32 for o in outputs)  # 4 full blocks of the 40 shared tokens
    for prompt, output in zip(prompts, outputs):
        assert output.outputs[0].token_ids == hf_greedy(hf, prompt)
    assert llm.engine.core.block_manager.num_used_blocks == 0


def test_chunked_prefill_matches(checkpoints: dict, hf_models: dict) -> None:
    llm = LLM(model=str(checkpoints["qwen3"]), device="cpu", dtype="float32", max_num_batched_tokens=24)
    hf = hf_models["qwen3"]
    prompts = random_prompts(hf.config.vocab_size, [90, 5, 50], seed=3)
    outputs = llm.generate(prompts, GREEDY)
    for prompt, output in zip(prompts, outputs):
        assert output.outputs[0].token_ids == hf_greedy(hf, prompt)


def test_tiny_kv_pool_forces_preemption_and_still_matches(checkpoints: dict, hf_models: dict) -> None:
    # 16 blocks of 4 tokens = 64 slots; eight requests of up to 40 tokens cannot all fit.
    llm = LLM(
        model=str(checkpoints["mistral"]),
        device="cpu",
        dtype="float32",
        block_size=4,
        num_kv_blocks=16,
        max_model_len=64,
    )
    hf = hf_models["mistral"]
    prompts = random_prompts(hf.config.vocab_size, [10, 14, 18, 6, 12, 9, 16, 11], seed=4)
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    outputs = llm.generate(prompts, params)
    assert llm.engine.scheduler.num_preemptions > 0
    for prompt, output in zip(prompts, outputs):
        assert output.outputs[0].token_ids == hf_greedy(hf, prompt, 20)
    assert llm.engine.core.block_manager.num_used_blocks == 0


@pytest.mark.parametrize("layout", ["cublas", "decode-gemv"])
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_attention_bias_checkpoints_load_and_match_transformers(
    family: str, layout: str, demo_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`attention_bias: true` gives Llama and Qwen3 biases on q, k, v and o_proj (Qwen2: q, k, v only);
    such a checkpoint was refused for its o_proj.bias."""
    from tests.conftest import write_hf_checkpoint

    monkeypatch.setattr(model_runner, "uses_decode_gemv", lambda device: layout == "decode-gemv")
    path = write_hf_checkpoint(tmp_path / family, family, demo_model_dir, attention_bias=True)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert hf.model.layers[0].self_attn.o_proj.bias is not None
    hf.generation_config.eos_token_id, hf.generation_config.pad_token_id = None, 0
    llm = LLM(model=str(path), device="cpu", dtype="float32")
    prompts = random_prompts(hf.config.vocab_size, [5, 21])
    for prompt, output in zip(prompts, llm.generate(prompts, GREEDY)):
        assert output.outputs[0].token_ids == hf_greedy(hf, prompt)


def test_a_config_without_architectures_is_read_by_its_model_type(checkpoints: dict, hf_models: dict, tmp_path: Path) -> None:
    """transformers reads such a config by its `model_type`; so do we."""
    import json
    import shutil

    path = Path(shutil.copytree(checkpoints["qwen2"], tmp_path / "qwen2"))
    config = json.loads((path / "config.json").read_text())
    del config["architectures"]
    (path / "config.json").write_text(json.dumps(config))
    prompt = random_prompts(hf_models["qwen2"].config.vocab_size, [9])[0]
    [output] = LLM(model=str(path), device="cpu", dtype="float32").generate([prompt], GREEDY)
    assert output.outputs[0].token_ids == hf_greedy(hf_models["qwen2"], prompt)
    (path / "config.json").write_text(json.dumps({**config, "model_type": "gemma"}))
    with pytest.raises(ValueError, match="architecture 'gemma' is not supported"):
        LLM(model=str(path), device="cpu", dtype="float32")
