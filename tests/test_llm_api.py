"""The offline API's options as a vLLM user relies on them: sharded checkpoints, dtypes, stop
strings and stop tokens, logprobs, per-prompt params, chat, and seeded sampling."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers

from pdserve.engine import LLM, SamplingParams
from tests.test_llm_vs_hf import GREEDY, hf_greedy, random_prompts


@pytest.fixture(scope="module")
def llm(checkpoints: dict[str, Path]) -> LLM:
    return LLM(model=str(checkpoints["qwen2"]), device="cpu", dtype="float32")


def test_sharded_checkpoint_loads_and_matches(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoints["llama"], dtype=torch.float32)
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((checkpoints["llama"] / name).read_bytes())
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # really sharded
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    sharded = LLM(model=str(tmp_path), device="cpu", dtype="float32")
    prompts = random_prompts(model.config.vocab_size, [9, 21], seed=11)
    for prompt, output in zip(prompts, sharded.generate(prompts, GREEDY)):
        assert output.outputs[0].token_ids == hf_greedy(model, prompt)


def test_dtype_is_honoured(checkpoints: dict[str, Path]) -> None:
    half = LLM(model=str(checkpoints["llama"]), device="cpu", dtype="bfloat16")
    runner = half.engine.core.runner
    assert runner.kv_cache.dtype == torch.bfloat16
    assert {p.dtype for p in runner.model.parameters()} == {torch.bfloat16}
    [out] = half.generate([[5, 6, 7, 8]], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    assert len(out.outputs[0].token_ids) == 4


def test_stop_strings_truncate_the_text_and_say_why(llm: LLM) -> None:
    prompt = [11, 12, 13, 14]
    [full] = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
    text = full.outputs[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    assert stop.strip(), "the test needs visible text to stop on"
    [cut] = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[stop]))
    assert cut.outputs[0].text == text[: text.index(stop)]
    assert cut.outputs[0].finish_reason == "stop" and cut.outputs[0].stop_reason == stop
    assert len(cut.outputs[0].token_ids) < 24
    [kept] = llm.generate(
        [prompt], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[stop], include_stop_str_in_output=True)
    )
    assert kept.outputs[0].text == text[: text.index(stop) + len(stop)]
    assert llm.engine.core.block_manager.num_used_blocks == 0


def test_stop_token_ids_and_min_tokens(llm: LLM) -> None:
    prompt = [21, 22, 23]
    [full] = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
    tokens = full.outputs[0].token_ids
    stop_token = tokens[3]
    [cut] = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, stop_token_ids=[stop_token]))
    first = tokens.index(stop_token)
    assert cut.outputs[0].token_ids == tokens[: first + 1]
    assert cut.outputs[0].finish_reason == "stop" and cut.outputs[0].stop_reason == stop_token
    tokenizer = llm.get_tokenizer()
    assert cut.outputs[0].text == tokenizer.decode(tokens[:first])  # the stop token's text is left out (vLLM's)
    kept_params = SamplingParams(
        temperature=0, max_tokens=16, ignore_eos=True, stop_token_ids=[stop_token], include_stop_str_in_output=True
    )
    [kept] = llm.generate([prompt], kept_params)
    assert kept.outputs[0].text == tokenizer.decode(tokens[: first + 1])
    [held] = llm.generate(
        [prompt], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, stop_token_ids=[stop_token], min_tokens=first + 2)
    )
    assert len(held.outputs[0].token_ids) > first + 1 and stop_token not in held.outputs[0].token_ids[: first + 2]


def test_logprobs_match_a_full_forward(llm: LLM, checkpoints: dict[str, Path]) -> None:
    hf = transformers.AutoModelForCausalLM.from_pretrained(checkpoints["qwen2"], dtype=torch.float32)
    prompt = [31, 32, 33, 34, 35]
    [out] = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, logprobs=3))
    completion = out.outputs[0]
    with torch.no_grad():
        logits = hf(torch.tensor([prompt + completion.token_ids])).logits[0]
    reference = torch.log_softmax(logits[len(prompt) - 1 : -1], dim=-1)
    assert len(completion.logprobs) == 5
    for step, (token, entries) in enumerate(zip(completion.token_ids, completion.logprobs)):
        assert abs(entries[token].logprob - reference[step, token].item()) < 1e-4
        assert entries[token].rank == 1
        top = reference[step].topk(3).indices.tolist()
        assert set(top) <= set(entries)
    assert (
        abs(completion.cumulative_logprob - sum(e[t].logprob for t, e in zip(completion.token_ids, completion.logprobs))) < 1e-5
    )


def test_params_per_prompt_and_seeded_sampling(llm: LLM) -> None:
    prompts = [[41, 42], [43, 44, 45]]
    params = [
        SamplingParams(temperature=0, max_tokens=3, ignore_eos=True),
        SamplingParams(temperature=1.0, seed=7, max_tokens=6, ignore_eos=True),
    ]
    first = llm.generate(prompts, params)
    again = llm.generate(list(reversed(prompts)), list(reversed(params)))
    assert [len(o.outputs[0].token_ids) for o in first] == [3, 6]
    assert first[1].outputs[0].token_ids == again[0].outputs[0].token_ids  # the seed reproduces, whatever the batch
    with pytest.raises(ValueError, match="SamplingParams for"):
        llm.generate(prompts, params[:1])
    with pytest.raises(ValueError, match="got 0 SamplingParams for 2 prompts"):  # not the defaults, silently
        llm.generate(prompts, [])


def test_the_engine_seed_reproduces_requests_without_their_own(demo_model_dir: Path) -> None:
    """EngineConfig.seed (`pdserve serve --seed`, vLLM's): each engine, a worker's too, seeds the
    sampling of requests that give no seed from it: the same seed, the same text."""
    from pdserve.engine.config import EngineConfig
    from pdserve.engine.llm_engine import LLMEngine

    def sample(seed: int) -> list[int]:
        torch.manual_seed(1234)  # whatever ran in this process before the engine started
        engine = LLMEngine.from_config(
            EngineConfig(model=str(demo_model_dir), device="cpu", seed=seed, max_model_len=128, num_kv_blocks=32)
        )
        request = engine.add_request("r", [41, 42, 43], SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True))
        while engine.has_unfinished_requests():
            engine.step()
        return list(request.output_token_ids)

    assert sample(5) == sample(5) != sample(6)


def test_a_hub_id_is_read_from_the_download_dir_at_its_revision(offline_hub_cache: Path, demo_model_dir: Path) -> None:
    """LLM(model=HUB_ID, revision=..., download_dir=...), as vLLM's LLM takes them (the Hub offline:
    the cache answers); the same text as the checkpoint's own directory gives."""
    from tests.conftest import HUB_COMMIT

    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    want = LLM(model=str(demo_model_dir), device="cpu", max_model_len=128).generate([[41, 42, 43]], greedy)
    for revision in (None, HUB_COMMIT):
        llm = LLM(model="org/demo", revision=revision, download_dir=str(offline_hub_cache), device="cpu", max_model_len=128)
        assert llm.generate([[41, 42, 43]], greedy)[0].outputs[0].token_ids == want[0].outputs[0].token_ids
    with pytest.raises(ValueError, match="could not be fetched"):
        LLM(model="org/demo", revision="v9", download_dir=str(offline_hub_cache), device="cpu")


def test_chat_applies_the_template(llm: LLM) -> None:
    messages = [{"role": "user", "content": "Hello there"}]
    [chat] = llm.chat(messages, SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    tokenizer = llm.get_tokenizer()
    ids = tokenizer.encode(tokenizer.apply_chat_template(messages), add_special_tokens=False)
    assert chat.prompt_token_ids == ids
    [plain] = llm.generate({"prompt_token_ids": ids}, SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    assert chat.outputs[0].token_ids == plain.outputs[0].token_ids


def test_chat_and_generate_take_vllm_s_arguments(llm: LLM) -> None:
    """vLLM scripts pass `use_tqdm` (no bar is drawn here) and `LLM.chat(chat_template=...)`, a
    template of their own instead of the checkpoint's."""
    greedy = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    messages = [{"role": "user", "content": "Hello there"}]
    template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}<a>{% endif %}"
    )
    [chat] = llm.chat(messages, greedy, use_tqdm=False, chat_template=template)
    ids = llm.get_tokenizer().encode("<user>Hello there\n<a>", add_special_tokens=False)
    assert chat.prompt_token_ids == ids
    [plain] = llm.generate({"prompt_token_ids": ids}, greedy, use_tqdm=False)
    assert chat.outputs[0].token_ids == plain.outputs[0].token_ids


def test_generate_without_sampling_params_follows_the_checkpoint_s_generation_config(
    demo_model_dir: Path, tmp_path: Path
) -> None:
    """vLLM's LLM.generate(prompts): sampling as generation_config.json recommends (here greedy, 5
    tokens), else SamplingParams' own defaults."""
    import shutil

    checkpoint = shutil.copytree(demo_model_dir, tmp_path / "model")
    config = json.loads((checkpoint / "generation_config.json").read_text())
    (checkpoint / "generation_config.json").write_text(json.dumps({**config, "temperature": 0.0, "max_new_tokens": 5}))
    llm = LLM(model=str(checkpoint), device="cpu", dtype="float32", max_model_len=256)
    assert (llm.get_default_sampling_params().temperature, llm.get_default_sampling_params().max_tokens) == (0.0, 5)
    [defaulted] = llm.generate("The valley road")
    [greedy] = llm.generate("The valley road", SamplingParams(temperature=0.0, max_tokens=5))
    assert defaulted.outputs[0].token_ids == greedy.outputs[0].token_ids and len(greedy.outputs[0].token_ids) <= 5
