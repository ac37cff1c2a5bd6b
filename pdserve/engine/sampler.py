"""Token sampling for a batch: grammar masks, greedy, temperature, top-k, top-p, min-p, per-request
seeds, min_tokens, and top-n logprobs. Rows are independent: a seeded request draws from its own
generator, so its output does not depend on what else is in the batch."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from pdserve.engine.logits_processors import TokenCounts, has_penalties, needs_processing, process, to_device
from pdserve.engine.outputs import TokenLogprobs
from pdserve.engine.request import Request

if TYPE_CHECKING:
    from pdserve.engine.grammar_masks import PendingMasks


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[TokenLogprobs | None]
    # id(request) -> logprobs of the prompt tokens this step computed for it (prompt_logprobs)
    prompt_logprobs: dict[int, list[TokenLogprobs]] = field(default_factory=dict)


def add_prompt_logprobs(request: Request, logprobs: list[TokenLogprobs] | None) -> None:
    """Append a step's prompt logprobs; the first prompt token's entry is None (nothing predicts it)."""
    if logprobs is None:
        return
    if not request.prompt_logprobs:
        request.prompt_logprobs.append(None)
    request.prompt_logprobs += logprobs


class Sampler:
    def __init__(self) -> None:
        self.counts: TokenCounts | None = None  # made on first use, for the logits' vocabulary and device

    def __call__(self, logits: torch.Tensor, requests: list[Request], masks: PendingMasks | None = None) -> SamplerOutput:
        """logits: float32 `[num_requests, vocab]`, one row per request, in order. Logprobs are
        those of the model's own distribution (before penalties and biases), as vLLM reports them;
        under a grammar, of the distribution its mask leaves (vLLM masks before sampling too)."""
        token_ids, logprobs = self.sample_ahead(logits, requests, None, [-1] * len(requests), masks)
        ids = token_ids.tolist()
        if logprobs is None:
            return SamplerOutput(ids, [None] * len(ids))
        return SamplerOutput(ids, logprobs.unpack(ids, requests))

    def sample_ahead(
        self,
        logits: torch.Tensor,
        requests: list[Request],
        in_flight: torch.Tensor | None,
        in_flight_rows: list[int],
        masks: PendingMasks | None = None,
    ) -> tuple[torch.Tensor, LogprobTensors | None]:
        """The tokens and logprobs of `logits` on their device, nothing waited for but the
        grammar masks (`__call__` reads them back; a step launched ahead, later). `in_flight_rows[i] >= 0`:
        request i has a token in flight that the host has not appended yet,
        `in_flight[in_flight_rows[i]]` (the step before's sampled ids, on the device); its
        penalties count that token and its min_tokens include it. A step sampled after the host
        caught up (grammar `masks` need the token before) has no token in flight: all rows -1."""
        if masks is not None:
            logits = masks.apply(logits)
        raw_logprobs = None
        if any(r.params.logprobs is not None for r in requests):
            raw_logprobs = torch.log_softmax(logits, dim=-1)
        logits = _mask_stop_tokens_before_min(logits, requests, [int(row >= 0) for row in in_flight_rows])
        counts = self._counts(logits)
        ahead = [(r, row) for r, row in zip(requests, in_flight_rows) if row >= 0 and has_penalties(r)]
        if ahead:
            assert in_flight is not None, "a step with penalties keeps its sampled ids"
            rows = to_device([row for _, row in ahead], torch.long, logits.device)
            counts.count_ahead([r for r, _ in ahead], in_flight[rows])
        token_ids = draw(process(logits, requests, counts), requests)
        logprobs = LogprobTensors.of(raw_logprobs, token_ids, requests) if raw_logprobs is not None else None
        return token_ids, logprobs

    def _counts(self, logits: torch.Tensor) -> TokenCounts:
        if self.counts is None:
            self.counts = TokenCounts(logits.shape[-1], logits.device)
        return self.counts


def draw(logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
    """The tokens of processed logits, on their device: the argmax for greedy rows, a draw for the
    others. Nothing waits for the device (host values go up through pinned memory)."""
    token_ids = logits.argmax(dim=-1)
    if not all(r.params.is_greedy for r in requests):
        token_ids = torch.where(_greedy_mask(requests, logits.device), token_ids, _sample(logits, requests))
    return token_ids


def skip_first_draw(request: Request, vocab_size: int, device: torch.device) -> None:
    """Advance a seeded request's generator past the draw that sampled its first token elsewhere
    (the prefill worker), so the decode worker continues the same random stream as one engine."""
    if request.generator is not None and not request.params.is_greedy:
        torch.empty(vocab_size, dtype=torch.float32, device=device).exponential_(generator=request.generator)


def only_argmax(requests: list[Request]) -> bool:
    """Whether the batch's tokens are just the argmax: greedy, no logprobs, no stop tokens held
    back, nothing done to the logits, no grammar."""
    return all(
        r.params.is_greedy
        and r.params.logprobs is None
        and len(r.output_token_ids) >= r.params.min_tokens
        and not needs_processing(r)
        and r.grammar is None
        for r in requests
    )


def runs_ahead(request: Request) -> bool:
    """Whether the request's next step can be launched before the host has seen its last token:
    unless a sibling waits to fork from that token. Its sampling then either needs nothing of the
    host (`Sampler.sample_ahead`: penalties count the token in flight on the device, min_tokens
    counts it too, logprobs are read back with the token) or waits for the host to have that
    token (`reads_output`), the step's forward pass launched before."""
    return not request.has_unforked_siblings


def reads_output(request: Request) -> bool:
    """Whether the request's sampling reads its output on the host: a grammar's mask, or a bad
    word of several tokens (banned after its prefix)."""
    return request.grammar is not None or any(len(word) > 1 for word in request.params.bad_words_token_ids or ())


def _greedy_mask(requests: list[Request], device: torch.device) -> torch.Tensor:
    return to_device([r.params.is_greedy for r in requests], torch.bool, device)


def _mask_stop_tokens_before_min(logits: torch.Tensor, requests: list[Request], num_in_flight: list[int]) -> torch.Tensor:
    """Stop tokens (and EOS unless ignored) masked for requests short of min_tokens; a request's
    output counts its `num_in_flight` tokens not appended yet."""
    rows, cols = [], []
    vocab = logits.shape[-1]
    for i, (r, num_ahead) in enumerate(zip(requests, num_in_flight)):
        if len(r.output_token_ids) + num_ahead < r.params.min_tokens:
            banned = set(r.params.stop_token_ids) | (set() if r.params.ignore_eos else set(r.eos_token_ids))
            banned = {t for t in banned if t < vocab}  # out-of-vocab ids are refused at admission anyway
            rows += [i] * len(banned)
            cols += sorted(banned)
    if not rows:
        return logits
    logits = logits.clone()
    logits[to_device(rows, torch.long, logits.device), to_device(cols, torch.long, logits.device)] = float("-inf")
    return logits


def _column(values: list[float], device: torch.device) -> torch.Tensor:
    return to_device(values, torch.float32, device).unsqueeze(1)


def _sample(logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
    device = logits.device
    temperature = _column([r.params.temperature if not r.params.is_greedy else 1.0 for r in requests], device)
    logits = logits / temperature
    if any(r.params.top_k > 0 or r.params.top_p < 1.0 for r in requests):
        logits = _top_k_top_p(logits, requests)
    probs = torch.softmax(logits, dim=-1)
    if any(r.params.min_p > 0 for r in requests):
        min_p = _column([r.params.min_p for r in requests], device)
        probs = probs.masked_fill(probs < min_p * probs.max(dim=-1, keepdim=True).values, 0.0)
    # Exponential race: argmax(p / q), q ~ Exp(1), draws a token with probability p.
    q = torch.empty_like(probs).exponential_()
    for i, r in enumerate(requests):
        if r.generator is not None:
            q[i].exponential_(generator=r.generator)
    return (probs / q.clamp_(min=1e-10)).argmax(dim=-1)


def _top_k_top_p(logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
    device, vocab = logits.device, logits.shape[-1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    # a top_k past the vocabulary keeps every token (as in vLLM), whatever its size
    top_k = to_device([min(r.params.top_k, vocab) if r.params.top_k > 0 else vocab for r in requests], torch.long, device)
    sorted_logits = sorted_logits.masked_fill(torch.arange(vocab, device=device) >= top_k.unsqueeze(1), float("-inf"))
    top_p = _column([r.params.top_p for r in requests], device)
    sorted_probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # probability of the tokens ranked above
    sorted_logits = sorted_logits.masked_fill(mass_before >= top_p, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter_(-1, order, sorted_logits)


@dataclass
class LogprobTensors:
    """A step's logprobs, computed on the logits' device: each row's sampled token's logprob and
    rank, and the row's top-n; read as `TokenLogprobs` once on the host (`unpack`)."""

    chosen: torch.Tensor  # float32 [rows]
    ranks: torch.Tensor  # int64 [rows]: 1 + the tokens more likely than the sampled one
    top_values: torch.Tensor  # float32 [rows, n], n the batch's largest request
    top_ids: torch.Tensor  # int64 [rows, n]

    @classmethod
    def of(cls, logprobs: torch.Tensor, token_ids: torch.Tensor, requests: list[Request]) -> LogprobTensors:
        """`logprobs`: log_softmax of the logits `[rows, vocab]`; `token_ids` the sampled tokens."""
        num_top = max(r.params.logprobs or 0 for r in requests)
        top_values, top_ids = logprobs.topk(num_top, dim=-1) if num_top else (logprobs[:, :0], token_ids[:, None][:, :0])
        chosen = logprobs.gather(1, token_ids.unsqueeze(1))
        ranks = (logprobs > chosen).sum(dim=-1) + 1
        return cls(chosen.squeeze(1), ranks, top_values, top_ids)

    def to_host(self) -> LogprobTensors:
        """Copies to the host, queued behind the step (pinned memory: nothing waits); read them
        once the step is done."""
        return LogprobTensors(*(t.to("cpu", non_blocking=True) for t in (self.chosen, self.ranks, self.top_values, self.top_ids)))

    def unpack(self, token_ids: list[int], requests: list[Request]) -> list[TokenLogprobs | None]:
        chosen, ranks = self.chosen.tolist(), self.ranks.tolist()
        top_values, top_ids = self.top_values.tolist(), self.top_ids.tolist()
        out: list[TokenLogprobs | None] = []
        for i, r in enumerate(requests):
            n = r.params.logprobs
            if n is None:
                out.append(None)
                continue
            top = tuple(zip(top_ids[i][:n], top_values[i][:n]))
            out.append(TokenLogprobs(token_ids[i], chosen[i], ranks[i], top))
        return out
