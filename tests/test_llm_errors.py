"""Bad input to the offline API gets a clear error and changes nothing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pdserve.engine import LLM, SamplingParams
from pdserve.engine.config import ConfigError
from pdserve.engine.sampling_params import InvalidRequestError


@pytest.fixture(scope="module")
def llm(checkpoints: dict[str, Path]) -> LLM:
    return LLM(model=str(checkpoints["llama"]), device="cpu", dtype="float32", max_model_len=64)


@pytest.mark.parametrize(
    "field, kwargs",
    [
        ("max_tokens", {"max_tokens": 0}),
        ("max_tokens", {"max_tokens": -3}),
        ("temperature", {"temperature": -0.5}),
        ("top_p", {"top_p": 0.0}),
        ("top_p", {"top_p": 1.5}),
        ("top_k", {"top_k": 0}),
        ("min_p", {"min_p": 2.0}),
        ("logprobs", {"logprobs": -2}),  # more than the engine allows: EngineCore.validate (tests/test_max_logprobs.py)
        ("min_tokens", {"min_tokens": 5, "max_tokens": 2}),
    ],
)
def test_invalid_sampling_params_name_the_field(field: str, kwargs: dict) -> None:
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(**kwargs)
    assert info.value.param == field
    assert field in str(info.value)


def test_prompt_longer_than_the_context_is_refused_and_nothing_runs(llm: LLM) -> None:
    ok = [1, 2, 3]
    with pytest.raises(InvalidRequestError, match="maximum context length is 64"):
        llm.generate([ok, list(range(1, 80))], SamplingParams(max_tokens=4))
    assert not llm.engine.has_unfinished_requests()  # the valid prompt was not queued either
    assert llm.engine.core.block_manager.num_used_blocks == 0
    [out] = llm.generate([ok], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    assert len(out.outputs[0].token_ids) == 4


def test_generation_stops_at_the_context_limit(llm: LLM) -> None:
    [out] = llm.generate([list(range(1, 60))], SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))
    assert len(out.outputs[0].token_ids) == 5 and out.outputs[0].finish_reason == "length"


def test_out_of_vocabulary_token_ids_are_refused(llm: LLM) -> None:
    with pytest.raises(InvalidRequestError, match="token ids"):
        llm.generate([[1, 10**7]], SamplingParams())


def test_an_interrupted_generate_leaves_nothing_behind(llm: LLM, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C (or a failed step) mid-`generate`: its requests are aborted and their blocks freed, so
    the next call on the same LLM answers as a fresh one would (it once failed with KeyError)."""
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12]]
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, n=2)
    expected = [[c.token_ids for c in out.outputs] for out in llm.generate(prompts, params)]
    step, num_steps = llm.engine.step, [0]

    def interrupted_step() -> list:
        num_steps[0] += 1
        if num_steps[0] == 3:
            raise KeyboardInterrupt
        return step()

    monkeypatch.setattr(llm.engine, "step", interrupted_step)
    with pytest.raises(KeyboardInterrupt):
        llm.generate(prompts, params)
    monkeypatch.undo()
    assert not llm.engine.has_unfinished_requests() and llm.engine.core.block_manager.num_used_blocks == 0
    assert [[c.token_ids for c in out.outputs] for out in llm.generate(prompts, params)] == expected


def test_unknown_checkpoint_path() -> None:
    with pytest.raises(ConfigError, match="/no/such/model"):
        LLM(model="/no/such/model", device="cpu")


def test_unknown_hub_id_offline_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="no-such-org/no-such-model"):
        LLM(model="no-such-org/no-such-model", device="cpu")


def test_unknown_architecture_is_named(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    target = tmp_path / "gpt"
    shutil.copytree(checkpoints["llama"], target)
    config = json.loads((target / "config.json").read_text())
    config["architectures"] = ["GPTNeoXForCausalLM"]
    (target / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="GPTNeoXForCausalLM"):
        LLM(model=str(target), device="cpu")


def test_missing_weights_are_named(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    target = tmp_path / "partial"
    shutil.copytree(checkpoints["llama"], target)
    weights = load_file(target / "model.safetensors")
    del weights["model.layers.1.mlp.down_proj.weight"]
    save_file(weights, target / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConfigError, match="layers.1.mlp.down_proj"):
        LLM(model=str(target), device="cpu")
