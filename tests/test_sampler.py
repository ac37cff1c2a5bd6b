"""Sampler behaviour a user relies on: seeds reproduce, top-k/top-p/min-p never pick outside their
set, min_tokens holds stop tokens back, logprobs are the model's log-softmax."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pdserve.engine.logits_processors import TokenCounts
from pdserve.engine.request import Request
from pdserve.engine.sampler import Sampler
from pdserve.engine.sampling_params import SamplingParams

VOCAB = 50


def make_request(params: SamplingParams, eos: frozenset[int] = frozenset(), num_outputs: int = 0) -> Request:
    generator = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
    request = Request("r", [1, 2, 3], params, eos_token_ids=eos, generator=generator)
    request.output_token_ids = [7] * num_outputs
    return request


def sample_many(logits: torch.Tensor, params: SamplingParams, num_draws: int = 400) -> list[int]:
    sampler = Sampler()
    requests = [make_request(params) for _ in range(num_draws)]
    return sampler(logits.expand(num_draws, -1).contiguous(), requests).token_ids


def test_greedy_picks_the_argmax() -> None:
    logits = torch.randn(4, VOCAB)
    requests = [make_request(SamplingParams(temperature=0.0)) for _ in range(4)]
    assert Sampler()(logits, requests).token_ids == logits.argmax(-1).tolist()


def test_seeded_sampling_is_reproducible_and_independent_of_the_batch() -> None:
    torch.manual_seed(0)
    logits = torch.randn(6, VOCAB)
    params = SamplingParams(temperature=1.0, seed=1234)

    def run(rows: list[int], seeded_row: int) -> int:
        requests = [make_request(params if i == seeded_row else SamplingParams(temperature=1.0)) for i in rows]
        return Sampler()(logits[rows], requests).token_ids[rows.index(seeded_row)]

    draws = [run([0, 1, 2, 3], 2), run([2], 2), run([5, 4, 2, 0, 1], 2)]
    assert len(set(draws)) == 1
    # Successive draws from one seeded request follow its own stream: the same sequence again.
    first, second = make_request(params), make_request(params)
    seq_a = [Sampler()(logits[2:3], [first]).token_ids[0] for _ in range(20)]
    seq_b = [Sampler()(logits[2:3], [second]).token_ids[0] for _ in range(20)]
    assert seq_a == seq_b
    assert len(set(seq_a)) > 1  # it really samples


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31), top_k=st.integers(1, 10), temperature=st.floats(0.3, 3.0))
def test_top_k_never_picks_outside_the_k_best(seed: int, top_k: int, temperature: float) -> None:
    logits = torch.randn(VOCAB, generator=torch.Generator().manual_seed(seed))
    best = logits.topk(top_k)
    picks = sample_many(logits, SamplingParams(temperature=temperature, top_k=top_k))
    assert set(picks) <= set(best.indices.tolist())
    kept = torch.softmax(best.values / temperature, -1)
    if kept[0].item() ** len(picks) < 1e-9:  # the other kept tokens' share: never drawing them is no chance
        assert len(set(picks)) > 1


def test_a_top_k_past_the_vocabulary_keeps_every_token() -> None:
    logits = torch.randn(VOCAB, generator=torch.Generator().manual_seed(7))
    every = sample_many(logits, SamplingParams(temperature=1.0, seed=99))
    for top_k in (VOCAB, VOCAB + 1, 2**63, 2**70):  # past int64 too
        assert sample_many(logits, SamplingParams(temperature=1.0, seed=99, top_k=top_k)) == every


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31), top_p=st.floats(0.05, 0.95), temperature=st.floats(0.5, 2.0))
def test_top_p_never_picks_outside_the_nucleus(seed: int, top_p: float, temperature: float) -> None:
    logits = torch.randn(VOCAB, generator=torch.Generator().manual_seed(seed)) * 2
    probs = torch.softmax(logits / temperature, -1)
    order = probs.argsort(descending=True).tolist()
    nucleus, mass = set(), 0.0
    for token in order:  # smallest top set whose mass reaches top_p (with float slack)
        nucleus.add(token)
        mass += probs[token].item()
        if mass >= top_p + 1e-6:
            break
    picks = sample_many(logits, SamplingParams(temperature=temperature, top_p=top_p))
    assert set(picks) <= nucleus


def test_min_p_drops_unlikely_tokens() -> None:
    logits = torch.tensor([5.0, 4.5, 0.0, -1.0] + [-5.0] * (VOCAB - 4))
    probs = torch.softmax(logits, -1)
    allowed = {i for i in range(VOCAB) if probs[i] >= 0.1 * probs.max()}
    picks = sample_many(logits, SamplingParams(temperature=1.0, min_p=0.1))
    assert set(picks) <= allowed and len(set(picks)) == 2


def test_min_tokens_holds_back_eos_and_stop_tokens() -> None:
    logits = torch.full((1, VOCAB), -10.0)
    logits[0, 3] = 10.0  # eos is by far the best
    logits[0, 4] = 9.0  # then a stop token
    logits[0, 5] = 1.0  # then an ordinary token
    params = SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=[4])
    early = make_request(params, eos=frozenset({3}), num_outputs=1)
    late = make_request(params, eos=frozenset({3}), num_outputs=2)
    assert Sampler()(logits, [early]).token_ids == [5]
    assert Sampler()(logits, [late]).token_ids == [3]


def test_logprobs_are_the_models_log_softmax() -> None:
    logits = torch.randn(2, VOCAB)
    requests = [make_request(SamplingParams(temperature=0.0, logprobs=5)), make_request(SamplingParams(temperature=0.0))]
    out = Sampler()(logits, requests)
    reference = torch.log_softmax(logits[0], -1)
    lp = out.logprobs[0]
    assert lp.token_id == out.token_ids[0] and lp.rank == 1
    assert abs(lp.logprob - reference[lp.token_id].item()) < 1e-6
    assert [t for t, _ in lp.top] == reference.topk(5).indices.tolist()
    assert all(abs(v - reference[t].item()) < 1e-6 for t, v in lp.top)
    assert out.logprobs[1] is None


def test_a_token_counted_ahead_is_counted_once_when_another_request_catches_up() -> None:
    """Penalty counts: request b's token in flight is counted on the device at launch; request a,
    in the same batch, has a host token not counted yet (it joined the batch): counting a's must
    not make b's token count again once the host appends it."""
    counts = TokenCounts(VOCAB, torch.device("cpu"))
    a, b = make_request(SamplingParams(frequency_penalty=1.0)), make_request(SamplingParams(frequency_penalty=1.0))
    a.output_token_ids, b.output_token_ids = [2], [3]
    counts.rows([a, b])
    counts.count_ahead([b], torch.tensor([4]))  # b's next token, still on the device
    a.output_token_ids.append(5)
    counts.rows([a, b])  # a's new token counted; b's in flight is already
    b.output_token_ids.append(4)  # the host appends b's token
    rows = counts.rows([a, b])
    expected = [torch.bincount(torch.tensor(r.output_token_ids), minlength=VOCAB).tolist() for r in (a, b)]
    assert counts.output_counts[rows].tolist() == expected
