"""`EngineCore`: what every worker loads (model, KV cache, block pool, tokenizer, stop tokens) and
how a request is validated and created. Schedulers are composed on top by each kind of worker."""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from pdserve.engine.block_manager import BlockManager
from pdserve.engine.config import ConfigError, EngineConfig, ModelConfig, generation_defaults
from pdserve.engine.fingerprint import model_fingerprint
from pdserve.engine.loader import resolve_model_path, tokenizer_dir
from pdserve.engine.model_runner import ModelRunner
from pdserve.engine.request import Request
from pdserve.engine.sampling_params import InvalidRequestError, SamplingParams, check_logprobs, with_vocab_logprobs
from pdserve.engine.structured_output import GrammarCompiler
from pdserve.engine.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


@dataclass
class EngineCore:
    config: EngineConfig
    model_config: ModelConfig
    tokenizer: Tokenizer
    runner: ModelRunner
    block_manager: BlockManager
    eos_token_ids: frozenset[int]
    model_id: str  # checkpoint fingerprint (config + every weight's content): KV moves only between workers that agree on it
    grammars: GrammarCompiler
    generation_defaults: dict[str, float] = field(default_factory=dict)  # the checkpoint's generation_config.json

    @classmethod
    def load(cls, config: EngineConfig) -> EngineCore:
        """`config.load_format == "dummy"`: the checkpoint's shapes with random weights (benchmarks)."""
        random_weights = config.load_format == "dummy"
        torch.manual_seed(config.seed)  # requests without a seed of their own sample from this
        model_dir = resolve_model_path(config.model, config.revision, config.download_dir)
        model_config = ModelConfig.from_pretrained(model_dir)
        tokenizer = Tokenizer.from_pretrained(tokenizer_dir(config, model_dir), model_dir)
        with ThreadPoolExecutor(max_workers=1) as pool:  # hashing the weight files overlaps loading them
            fingerprint = pool.submit(model_fingerprint, model_dir, config.seed if random_weights else None)
            runner = ModelRunner(config, model_config, None if random_weights else model_dir)
            model_id = fingerprint.result()
        if runner.num_kv_blocks * config.block_size < runner.max_model_len:
            raise ConfigError(
                f"the KV cache holds {runner.num_kv_blocks * config.block_size} tokens, fewer than max_model_len "
                f"{runner.max_model_len}: give it more memory or lower max_model_len"
            )
        block_manager = BlockManager(runner.num_kv_blocks, config.block_size, config.enable_prefix_caching)
        eos = frozenset(tokenizer.eos_token_ids) | frozenset(model_config.eos_token_ids)
        model_id += f"-{config.quantization}" if config.quantization else ""  # the same weights, other numerics
        grammars = GrammarCompiler(tokenizer, model_config.vocab_size, eos)
        return cls(
            config, model_config, tokenizer, runner, block_manager, eos, model_id, grammars, generation_defaults(model_dir)
        )

    def is_device_healthy(self) -> bool:
        """Whether the device still runs work: after a sticky CUDA error (a device-side assert)
        every later launch fails, and the worker must stop taking requests."""
        try:
            torch.ones(1, device=self.runner.device).add_(1).cpu()
            return True
        except RuntimeError:
            return False

    @property
    def max_model_len(self) -> int:
        return self.runner.max_model_len

    @property
    def max_logprobs(self) -> int:
        """The most logprobs (or prompt_logprobs) a request may ask for: --max-logprobs, -1 the vocabulary."""
        limit = self.config.max_logprobs
        return self.model_config.vocab_size if limit == -1 else limit

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Everything about a request that depends on the model; raises InvalidRequestError."""
        self.validate_prompt(prompt_token_ids)
        vocab = self.model_config.vocab_size
        check_logprobs(params, self.max_logprobs, vocab)
        if any(t >= vocab for t in params.stop_token_ids):
            raise InvalidRequestError(f"stop_token_ids must be in [0, {vocab})", "stop_token_ids")
        for name, token_ids in (
            ("logit_bias", [t for t, _ in params.logit_bias]),
            ("allowed_token_ids", params.allowed_token_ids),
            ("bad_words", [t for word in params.bad_words_token_ids for t in word]),
        ):
            if any(t >= vocab for t in token_ids):
                raise InvalidRequestError(f"token ids in {name} must be in [0, {vocab})", name)
        if params.priority != 0 and self.config.scheduling_policy != "priority":
            raise InvalidRequestError(
                f"priority {params.priority} needs --scheduling-policy priority (this server serves first come, first served)",
                "priority",
            )
        if params.structured_output is not None:
            self.grammars.compile(params.structured_output)  # cached: `new_request` copies it

    async def compile_grammar(self, params: SamplingParams) -> None:
        """Compile (and cache) a request's grammar on a worker thread, so that `new_request` on the
        engine thread finds it ready: a first compile can take a while (the very first builds the
        grammar library's tokenizer, ~1 s for 150K tokens). Raises InvalidRequestError."""
        if params.structured_output is not None:
            await asyncio.to_thread(self.grammars.compile, params.structured_output)

    def validate_prompt(self, prompt_token_ids: list[int]) -> None:
        if not prompt_token_ids:
            raise InvalidRequestError("the prompt is empty", "prompt")
        if len(prompt_token_ids) >= self.max_model_len:
            raise InvalidRequestError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, your prompt has "
                f"{len(prompt_token_ids)} tokens, which leaves no room for a completion.",
                "prompt",
            )
        vocab = self.model_config.vocab_size
        if min(prompt_token_ids) < 0 or max(prompt_token_ids) >= vocab:
            raise InvalidRequestError(f"prompt token ids must be in [0, {vocab})", "prompt")

    def new_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> Request:
        """The request's first sequence; with n > 1 it carries the other n - 1 as siblings, which
        share its prompt's KV (computed once) and start from samples of the same logits. With a
        seed, sequence i draws from seed + i: distinct, and reproducible. A logprobs count of -1
        becomes the vocabulary's size."""
        self.validate(prompt_token_ids, params)
        params = with_vocab_logprobs(params, self.model_config.vocab_size)
        request = self._sequence(request_id, prompt_token_ids, params, 0)
        for index in range(1, params.n):
            sibling = self._sequence(f"{request_id}#{index}", prompt_token_ids, params, index)
            sibling.parent = request
            request.siblings.append(sibling)
        return request

    def _sequence(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, index: int) -> Request:
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self.runner.device).manual_seed(params.seed + index)
        spec = params.structured_output
        return Request(
            request_id=request_id,
            prompt_token_ids=list(prompt_token_ids),
            params=params,
            eos_token_ids=self.eos_token_ids,
            generator=generator,
            index=index,
            grammar=None if spec is None else self.grammars.compile(spec),
        )
