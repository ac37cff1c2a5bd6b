"""Penalties, logit bias, bad words and allowed tokens (issue 10), in batches mixing requests that
use them with requests that do not: repetition_penalty equal to transformers' `generate`, the
others equal to a reference computed here from transformers' logits with the definitions
vLLM and OpenAI give."""

from __future__ import annotations

import pytest
import torch
import transformers

from pdserve.engine import LLM, SamplingParams
from tests.conftest import FAMILIES
from tests.test_llm_vs_hf import hf_models, random_prompts  # noqa: F401  (fixture)

NUM_TOKENS = 12


def greedy(**extra: object) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=NUM_TOKENS, ignore_eos=True, **extra)


def hf_reference(model: transformers.PreTrainedModel, prompt: list[int], params: SamplingParams) -> list[int]:
    """Greedy tokens with logit bias, then frequency and presence penalties over the output tokens,
    applied to transformers' logits step by step (OpenAI's and vLLM's definitions)."""
    tokens, output = list(prompt), []
    for _ in range(NUM_TOKENS):
        with torch.no_grad():
            logits = model(torch.tensor([tokens])).logits[0, -1].double()
        for token_id, bias in params.logit_bias:
            logits[token_id] += bias
        counts = torch.bincount(torch.tensor(output, dtype=torch.long), minlength=logits.shape[0]).double()
        logits -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).double()
        token = int(logits.argmax())
        tokens.append(token)
        output.append(token)
    return output


@pytest.mark.parametrize("family", list(FAMILIES))
def test_repetition_penalty_equals_transformers_generate(family: str, checkpoints: dict, hf_models: dict) -> None:
    model = hf_models[family]
    llm = LLM(model=str(checkpoints[family]), device="cpu", dtype="float32")
    prompts = random_prompts(model.config.vocab_size, [5, 17, 33], seed=3)
    prompts = [p[:4] * 3 + p for p in prompts]  # repeated tokens: the penalty has something to act on
    params = [greedy(repetition_penalty=1.3), greedy(), greedy(repetition_penalty=0.7)]
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    for prompt, sp, output in zip(prompts, params, outputs):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            want = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=NUM_TOKENS,
                do_sample=False,
                repetition_penalty=sp.repetition_penalty,
            )[0, len(prompt) :].tolist()
        assert output.outputs[0].token_ids == want, sp.repetition_penalty
    unpenalized = llm.generate({"prompt_token_ids": prompts[0]}, greedy())[0].outputs[0].token_ids
    assert outputs[0].outputs[0].token_ids != unpenalized  # the penalty changed something here


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_presence_frequency_penalties_and_logit_bias_equal_the_reference(family: str, checkpoints: dict, hf_models: dict) -> None:
    model = hf_models[family]
    llm = LLM(model=str(checkpoints[family]), device="cpu", dtype="float32")
    prompts = random_prompts(model.config.vocab_size, [9, 21, 14, 6], seed=5)
    params = [
        greedy(frequency_penalty=1.5, logit_bias={17: 6.0}),  # 17 wins until its count outweighs the bias
        greedy(presence_penalty=2.0, logit_bias={7: 3.0, 11: -100.0}),
        greedy(),
        greedy(frequency_penalty=-0.5, presence_penalty=0.75, logit_bias={prompts[3][0]: 5.0}),
    ]
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    for prompt, sp, output in zip(prompts, params, outputs):
        assert output.outputs[0].token_ids == hf_reference(model, prompt, sp)
    assert 1 < outputs[0].outputs[0].token_ids.count(17) < NUM_TOKENS  # frequency, not presence, sent it away


def test_allowed_tokens_and_bad_words_hold_for_sampled_and_greedy_requests(checkpoints: dict) -> None:
    llm = LLM(model=str(checkpoints["llama"]), device="cpu", dtype="float32")
    prompt = {"prompt_token_ids": [5, 9, 13, 2, 7]}
    free = llm.generate(prompt, greedy())[0].outputs[0].token_ids
    banned_word = tuple(free[:2])  # the unconstrained greedy output starts with these two tokens
    allowed = (3, 4, 8, 15, 16, 23, 42)
    params = [
        greedy(bad_words_token_ids=[banned_word]),
        SamplingParams(temperature=1.0, seed=7, max_tokens=30, ignore_eos=True, allowed_token_ids=allowed),
        greedy(bad_words_token_ids=[(free[0],)]),
        greedy(),
    ]
    outputs = [o.outputs[0].token_ids for o in llm.generate([prompt] * 4, params)]
    assert (
        outputs[0][:2] != list(banned_word) and outputs[0][0] == free[0]
    )  # only the word's last token is barred after its first
    assert set(outputs[1]) <= set(allowed) and len(set(outputs[1])) > 1
    assert free[0] not in outputs[2]
    assert outputs[3] == free  # its batch neighbours' constraints do not leak into it


def test_out_of_range_values_are_refused_naming_the_field(checkpoints: dict) -> None:
    from pdserve.engine.sampling_params import InvalidRequestError

    llm = LLM(model=str(checkpoints["llama"]), device="cpu", dtype="float32")
    for kwargs, field in [
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": float("nan")}, "frequency_penalty"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"logit_bias": {3: 150.0}}, "logit_bias"),
        ({"bad_words_token_ids": [()]}, "bad_words"),
    ]:
        with pytest.raises(InvalidRequestError) as caught:
            SamplingParams(**kwargs)
        assert caught.value.param == field
    with pytest.raises(InvalidRequestError, match="logit_bias must be in"):
        llm.generate({"prompt_token_ids": [1, 2]}, SamplingParams(logit_bias={10**6: 1.0}))
    with pytest.raises(InvalidRequestError, match="allowed_token_ids must be in"):
        llm.generate({"prompt_token_ids": [1, 2]}, SamplingParams(allowed_token_ids=[10**6]))


def test_the_sampler_keeps_no_rows_for_finished_requests(checkpoints: dict) -> None:
    llm = LLM(model=str(checkpoints["llama"]), device="cpu", dtype="float32")
    for _ in range(3):
        llm.generate([{"prompt_token_ids": [1, 2, 3]}] * 5, greedy(frequency_penalty=0.5))
    counts = llm.engine.core.runner.sampler.counts
    assert counts is not None and counts.output_counts.shape[0] <= 8  # rows were reused, not grown per request
