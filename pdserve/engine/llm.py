"""The offline API in the shape vLLM users know: `LLM(model=...).generate(prompts, params)`."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

from pdserve.engine.config import EngineConfig
from pdserve.engine.detokenizer import IncrementalDetokenizer
from pdserve.engine.llm_engine import LLMEngine
from pdserve.engine.outputs import CompletionOutput, Logprob, RequestOutput, TokenLogprobs
from pdserve.engine.request import Request
from pdserve.engine.sampling_params import InvalidRequestError, SamplingParams
from pdserve.engine.tokenizer import Tokenizer

PromptType = str | list[int] | dict


class LLM:
    def __init__(
        self,
        model: str | None = None,
        device: str = "auto",
        dtype: str = "auto",
        load_format: str = "auto",
        kv_cache_dtype: str = "auto",
        **engine_args: Any,
    ) -> None:
        """`model`: a local HF checkpoint directory or a Hub id; None serves the demo model.
        `load_format="dummy"`: the checkpoint's shapes with random weights (vLLM's name for it).
        `kv_cache_dtype="fp8"`: an e4m3 KV cache (twice the blocks in the same memory).
        `engine_args`: the other `EngineConfig` fields (block_size, max_model_len, num_kv_blocks, ...)."""
        if model is None:
            from pdserve.engine.demo_model import default_demo_model_dir

            model = str(default_demo_model_dir())
        config = EngineConfig(
            model=model, device=device, dtype=dtype, load_format=load_format, kv_cache_dtype=kv_cache_dtype, **engine_args
        )
        self.engine = LLMEngine.from_config(config)
        self._ids = itertools.count()

    def get_tokenizer(self) -> Tokenizer:
        return self.engine.core.tokenizer

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """One `RequestOutput` per prompt, in order. A prompt is a string, a list of token ids, or
        a dict with `prompt` or `prompt_token_ids`. `use_tqdm` is taken for vLLM's scripts; no
        progress bar is drawn."""
        prompts = _as_prompt_list(prompts)
        params = _as_params_list(self.get_default_sampling_params() if sampling_params is None else sampling_params, len(prompts))
        encoded = [self._encode(p) for p in prompts]
        for (_, token_ids), p in zip(encoded, params):  # validate everything before anything is queued
            self.engine.core.validate(token_ids, p)
        families: list[list[_Run]] = []
        try:
            for (text, token_ids), p in zip(encoded, params):
                request = self.engine.add_request(str(next(self._ids)), token_ids, p)
                families.append(
                    [
                        _Run(sequence, text, IncrementalDetokenizer.for_request(self.get_tokenizer(), p))
                        for sequence in request.family
                    ]
                )
            by_id = {run.request.request_id: run for runs in families for run in runs}
            while self.engine.has_unfinished_requests():
                for request in self.engine.step():
                    by_id[request.request_id].on_token(self.engine)
        except BaseException:  # Ctrl-C, a failed step: none of this call's requests stays queued, nor its blocks used
            self.engine.pipeline.reset()
            for runs in families:
                self.engine.abort_request(runs[0].request.request_id)
            raise
        return [_output(runs, self.get_tokenizer()) for runs in families]

    def get_default_sampling_params(self) -> SamplingParams:
        """vLLM's: the sampling the checkpoint's generation_config.json recommends (temperature,
        top_p, top_k, min_p, repetition_penalty, max_new_tokens), on SamplingParams' own defaults."""
        return SamplingParams(**self.engine.core.generation_defaults)

    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        *,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        tools: list[dict] | None = None,
        chat_template_kwargs: dict | None = None,
    ) -> list[RequestOutput]:
        """vLLM's `LLM.chat` (its keyword arguments): each conversation through the chat template
        (`chat_template`, a Jinja source, instead of the checkpoint's; `chat_template_kwargs`
        override the others), then generated from."""
        conversations = messages if messages and isinstance(messages[0], list) else [messages]
        tokenizer = self.get_tokenizer()
        options = {
            "add_generation_prompt": add_generation_prompt,
            "continue_final_message": continue_final_message,
            "tools": tools,
            "chat_template": chat_template,
            **(chat_template_kwargs or {}),
        }
        prompts = [
            {"prompt_token_ids": tokenizer.encode(tokenizer.apply_chat_template(c, **options), add_special_tokens=False)}
            for c in conversations
        ]
        return self.generate(prompts, sampling_params, use_tqdm)

    def _encode(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.get_tokenizer().encode(prompt)
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
            return prompt["prompt"], self.get_tokenizer().encode(prompt["prompt"])
        return None, list(prompt)


class _Run:
    """One prompt's generation: the engine request plus its incremental detokenizer."""

    def __init__(self, request: Request, prompt: str | None, detokenizer: IncrementalDetokenizer) -> None:
        self.request = request
        self.prompt = prompt
        self.detokenizer = detokenizer
        self.text = ""

    def on_token(self, engine: LLMEngine) -> None:
        delta, stopped = self.detokenizer.step(self.request.output_token_ids[-1:])
        self.text += delta
        if stopped:
            if not self.request.is_finished:
                engine.stop_sequence(self.request)  # frees its blocks
            self.request.finish("stop", self.detokenizer.stop_reason)
        elif self.request.is_finished:
            self.text += self.detokenizer.flush(self.request.finish_reason)

    def completion(self, tokenizer: Tokenizer) -> CompletionOutput:
        r = self.request
        logprobs = None
        cumulative = None
        if r.params.logprobs is not None:
            logprobs = [_logprob_dict(lp, tokenizer) for lp in r.output_logprobs]
            cumulative = sum(lp.logprob for lp in r.output_logprobs)
        return CompletionOutput(
            index=r.index,
            text=self.text,
            token_ids=list(r.output_token_ids),
            cumulative_logprob=cumulative,
            logprobs=logprobs,
            finish_reason=r.finish_reason,
            stop_reason=r.stop_reason,
        )


def _output(runs: list[_Run], tokenizer: Tokenizer) -> RequestOutput:
    """One request's output: a completion for each of its n sequences."""
    first = runs[0]
    r = first.request
    completions = [run.completion(tokenizer) for run in runs]
    prompt_logprobs = None
    if r.params.prompt_logprobs is not None:
        prompt_logprobs = [None if lp is None else _logprob_dict(lp, tokenizer) for lp in r.prompt_logprobs]
    return RequestOutput(
        r.request_id, first.prompt, r.prompt_token_ids, completions, True, r.num_cached_tokens, prompt_logprobs=prompt_logprobs
    )


def _logprob_dict(lp: TokenLogprobs, tokenizer: Tokenizer) -> dict[int, Logprob]:
    entries = {lp.token_id: Logprob(lp.logprob, lp.rank, tokenizer.decode([lp.token_id], skip_special_tokens=False))}
    for rank, (token_id, value) in enumerate(lp.top, start=1):
        entries.setdefault(token_id, Logprob(value, rank, tokenizer.decode([token_id], skip_special_tokens=False)))
    return entries


def _as_prompt_list(prompts: PromptType | Sequence[PromptType]) -> list[PromptType]:
    if isinstance(prompts, (str, dict)):
        return [prompts]
    prompts = list(prompts)
    if prompts and all(isinstance(t, int) for t in prompts):
        return [prompts]  # one prompt given as token ids
    return prompts


def _as_params_list(params: SamplingParams | Sequence[SamplingParams] | None, n: int) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams()] * n
    if isinstance(params, SamplingParams):
        return [params] * n
    params = list(params)
    if len(params) != n:
        raise InvalidRequestError(f"got {len(params)} SamplingParams for {n} prompts", "sampling_params")
    return params
