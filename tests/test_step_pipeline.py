"""Decode steps launched ahead of the host (engine/step_pipeline.py): the tokens, finish reasons and
token counts are those of the synchronous engine (and of HF transformers), whatever ends a request
(length, stop token, stop string, abort, preemption); the blocks of a request that ends while a
step is in flight are held until that step is done; nothing leaks."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest
import torch
import transformers

from pdserve.engine import LLM, SamplingParams
from pdserve.engine.model_runner import ModelRunner
from pdserve.engine.sampling_params import StructuredOutput
from tests.test_llm_vs_hf import hf_greedy, random_prompts


@pytest.fixture
def launches(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The batch size of every step launched ahead (negative: its input ids came from the
    previous step's argmax on the device, never read by the host first)."""
    sizes: list[int] = []
    launch = ModelRunner.launch

    def counting(self: ModelRunner, batch, previous):  # type: ignore[no-untyped-def]
        step = launch(self, batch, previous)
        relayed = previous is not None and previous.on_device and step.on_device
        sizes.append(-len(batch) if relayed else len(batch))
        return step

    monkeypatch.setattr(ModelRunner, "launch", counting)
    return sizes


def _llm(path: Path, run_ahead: bool, **engine_args: object) -> LLM:
    return LLM(model=str(path), device="cpu", dtype="float32", async_scheduling=run_ahead, **engine_args)


def _outputs(llm: LLM, prompts: list[list[int]], params: list[SamplingParams]) -> list[tuple[list[int], str | None, object]]:
    return [(o.outputs[0].token_ids, o.outputs[0].finish_reason, o.outputs[0].stop_reason) for o in llm.generate(prompts, params)]


def _assert_no_blocks_left(llm: LLM) -> None:
    blocks = llm.engine.core.block_manager
    assert blocks.num_held_blocks == 0
    assert blocks.num_free_blocks == blocks.num_blocks
    assert not llm.engine.has_unfinished_requests()


def _assert_same_logprobs(actual: list | None, expected: list | None) -> None:
    """The same tokens and ranks, the values equal up to float rounding (a stale row of a request
    that just stopped makes a step ahead one row larger than the synchronous engine's, and a CPU
    matmul of another shape rounds differently)."""
    assert (actual is None) == (expected is None)
    for a, e in zip(actual or [], expected or [], strict=True):
        assert {t: lp.rank for t, lp in a.items()} == {t: lp.rank for t, lp in e.items()}
        assert all(abs(lp.logprob - e[t].logprob) < 1e-4 for t, lp in a.items())


def test_greedy_run_ahead_equals_sync_and_hf(checkpoints: dict[str, Path], launches: list[int]) -> None:
    path = checkpoints["llama"]
    model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    prompts = random_prompts(model.config.vocab_size, [5, 17, 9, 30, 3], seed=3)
    lengths = [12, 1, 20, 7, 15]
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in lengths]
    ahead = _outputs(_llm(path, True), prompts, params)
    assert launches, "no step ran ahead"
    for prompt, n, (tokens, reason, _) in zip(prompts, lengths, ahead):
        assert tokens == hf_greedy(model, prompt, n)
        assert reason == "length"


def test_every_way_of_ending_matches_sync(checkpoints: dict[str, Path], launches: list[int]) -> None:
    """Stop tokens and EOS end a request one step after the next was launched (its row is dropped),
    stop strings end it from the detokenizer, and a KV cache this small preempts requests."""
    path = checkpoints["qwen2"]
    sync_llm = _llm(path, False, num_kv_blocks=24, block_size=4, max_model_len=96)
    ahead_llm = _llm(path, True, num_kv_blocks=24, block_size=4, max_model_len=96)
    prompts = random_prompts(sync_llm.get_tokenizer().vocab_size, [6, 11, 4, 19, 8, 13], seed=5)
    free = [SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True) for _ in prompts]
    reference = _outputs(sync_llm, prompts, free)
    assert not launches
    assert _outputs(ahead_llm, prompts, free) == reference
    assert launches
    penalized = [
        SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, frequency_penalty=0.8, repetition_penalty=1.2)
    ] * 6
    assert _outputs(ahead_llm, prompts, penalized) == _outputs(sync_llm, prompts, penalized) != reference
    # the small cache really preempts, in both
    assert sync_llm.engine.scheduler.num_preemptions > 0 and ahead_llm.engine.scheduler.num_preemptions > 0
    # A stop token that comes mid-way through each greedy output, a stop string likewise, and EOS
    params = []
    tokenizer = sync_llm.get_tokenizer()
    for i, (tokens, _, _) in enumerate(reference):
        if i % 3 == 0:
            params.append(SamplingParams(temperature=0.0, max_tokens=40, stop_token_ids=[tokens[len(tokens) // 2]]))
        elif i % 3 == 1:
            text = tokenizer.decode(tokens[len(tokens) // 2 : len(tokens) // 2 + 2])
            params.append(SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, stop=[text]))
        else:
            params.append(SamplingParams(temperature=0.0, max_tokens=40, min_tokens=3))
    expected = _outputs(sync_llm, prompts, params)
    assert _outputs(ahead_llm, prompts, params) == expected
    assert any(reason == "stop" for _, reason, _ in expected)
    _assert_no_blocks_left(sync_llm)
    _assert_no_blocks_left(ahead_llm)


def test_sampling_runs_ahead_whatever_it_reads(checkpoints: dict[str, Path], launches: list[int]) -> None:
    """Seeded sampling, logprobs, penalties (which count the token still in flight on the device),
    logit bias, allowed tokens, one-token bad words and min_tokens all run ahead: the same tokens,
    draws and logprobs as the synchronous engine. A bad word of several tokens reads the output
    on the host: its step runs ahead too, sampled once the host has the token before."""
    path = checkpoints["llama"]
    prompts = random_prompts(200, [7, 12, 5, 9, 6, 11, 8, 10], seed=9)
    greedy = _llm(path, False).generate(prompts, SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True))
    first = [o.outputs[0].token_ids[0] for o in greedy]
    # min_tokens=12 with a stop token that greedy decoding gives at index 12 and not before: the
    # request ends right there (13 tokens), if min_tokens counts the token in flight at launch
    held = next(o.outputs[0].token_ids for o in greedy if o.outputs[0].token_ids[12] not in o.outputs[0].token_ids[:12])
    prompts[7] = prompts[[o.outputs[0].token_ids for o in greedy].index(held)]
    params = [
        SamplingParams(temperature=0.8, seed=4, max_tokens=25, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=2, repetition_penalty=1.3),
        SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True, frequency_penalty=1.5, presence_penalty=0.5),
        SamplingParams(
            temperature=1.0,
            top_k=20,
            top_p=0.9,
            min_p=0.01,
            seed=8,
            max_tokens=30,
            ignore_eos=True,
            allowed_token_ids=range(0, 200, 2),
        ),
        SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, logprobs=3),
        SamplingParams(temperature=0.7, seed=5, max_tokens=18, ignore_eos=True, logprobs=0, presence_penalty=2.0),
        SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, logit_bias={7: 5.0}, bad_words_token_ids=[[first[6]]]),
        SamplingParams(temperature=0.0, max_tokens=22, ignore_eos=True, min_tokens=12, stop_token_ids=[held[12]], logprobs=1),
    ]
    expected = _llm(path, False).generate(prompts, params)
    assert not launches
    actual = _llm(path, True).generate(prompts, params)
    for e, a in zip(expected, actual):
        assert a.outputs[0].token_ids == e.outputs[0].token_ids
        _assert_same_logprobs(a.outputs[0].logprobs, e.outputs[0].logprobs)
        assert a.outputs[0].finish_reason == e.outputs[0].finish_reason
    assert [len(o.outputs[0].logprobs or []) for o in actual][:7] == [0, 24, 0, 0, 20, 18, 0]
    assert all(len(top) in (3, 4) for top in actual[4].outputs[0].logprobs)  # the top 3, and the token if not in them
    # the penalties changed the output (so counting the token in flight mattered), the bias and the
    # ban too, and min_tokens held the stop tokens back
    assert [o.outputs[0].token_ids for o in actual[1:3]] != [
        g.outputs[0].token_ids[: len(o.outputs[0].token_ids)] for o, g in zip(actual[1:3], greedy[1:3])
    ]
    assert actual[6].outputs[0].token_ids[0] != first[6] and all(t % 2 == 0 for t in actual[3].outputs[0].token_ids)
    assert actual[7].outputs[0].token_ids == held[:13] and actual[7].outputs[0].finish_reason == "stop"
    assert launches and max(abs(n) for n in launches) == len(prompts)  # every request ran ahead
    # A bad word of two tokens, the first pair of request 1's greedy output seen at k >= 2: banned
    # right after its prefix, which the host has only once the token in flight is read (that
    # step's sampling waits for it)
    launches.clear()
    greedy_1 = greedy[1].outputs[0].token_ids
    pairs = list(zip(greedy_1, greedy_1[1:]))
    k = next(k for k in range(2, len(pairs)) if pairs[k] not in pairs[:k])
    words = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, bad_words_token_ids=[pairs[k]])
    mixed = [params[2], words, params[4]]
    expected = _llm(path, False).generate(prompts[:3], mixed)
    actual = _llm(path, True).generate(prompts[:3], mixed)
    assert [o.outputs[0].token_ids for o in actual] == [o.outputs[0].token_ids for o in expected]
    assert (
        actual[1].outputs[0].token_ids[: k + 1] == greedy_1[: k + 1] and actual[1].outputs[0].token_ids[k + 1] != greedy_1[k + 1]
    )
    assert max(abs(n) for n in launches) == 3  # with the two-token bad word


def test_grammar_steps_run_ahead_and_are_sampled_once_the_grammar_has_the_token(
    tool_checkpoint: Path, launches: list[int]
) -> None:
    """A step with grammar requests is launched ahead, its sampling deferred until the host has the
    step before's tokens and the grammars took them: the same outputs as the synchronous engine,
    every one matching its grammar, ended by the grammar ("stop") where it completes."""
    schema = {"type": "object", "properties": {"on": {"type": "boolean"}, "n": {"type": "integer"}}, "required": ["on", "n"]}
    specs = [
        StructuredOutput("regex", "(ab|cd){2,6}x"),
        StructuredOutput("json", json.dumps(schema)),
        StructuredOutput("choice", json.dumps(["light is on", "light is off"])),
    ]
    params = [SamplingParams(temperature=1.0, seed=i, max_tokens=48, structured_output=specs[i % 3]) for i in range(3)]
    params += [  # penalties count each token once, whether it was in flight at the launch or not
        SamplingParams(
            temperature=0.0, max_tokens=48, structured_output=specs[i % 3], frequency_penalty=2.0, presence_penalty=1.0
        )
        for i in range(3, 6)
    ]
    params.append(SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True))
    prompts = ["Hello"] * 6 + ["Plain"]
    # a plain row with min_tokens=7 and, as stop token, the one greedy decoding gives at index 6
    # and not before: held back there (7 tokens is one too few), whatever else the batch holds
    plain = _llm(tool_checkpoint, False).generate(
        [f"Plain {i}" for i in range(20)], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    )
    held = next(o for o in plain if o.outputs[0].token_ids[6] not in o.outputs[0].token_ids[:6])
    params.append(SamplingParams(temperature=0.0, max_tokens=30, min_tokens=7, stop_token_ids=[held.outputs[0].token_ids[6]]))
    prompts.append(held.prompt)
    expected = [o.outputs[0] for o in _llm(tool_checkpoint, False).generate(prompts, params)]
    assert not launches
    actual = [o.outputs[0] for o in _llm(tool_checkpoint, True).generate(prompts, params)]
    assert [(o.token_ids, o.finish_reason) for o in actual] == [(o.token_ids, o.finish_reason) for o in expected]
    for i, o in enumerate(actual[:6]):
        if i % 3 == 0:
            assert re.fullmatch("(ab|cd){2,6}x", o.text) and o.finish_reason == "stop", o.text
        elif i % 3 == 2:
            assert o.text in ("light is on", "light is off") and o.finish_reason == "stop"
    assert actual[-1].token_ids[:6] == held.outputs[0].token_ids[:6] and len(actual[-1].token_ids) > 7
    assert launches and max(abs(n) for n in launches) == len(prompts)  # with the grammar rows


def test_penalty_counts_are_the_host_tokens_and_the_one_in_flight(tool_checkpoint: Path) -> None:
    """After every step, each request's penalty counts (TokenCounts) are those of the tokens the
    host holds (up to those counted so far), plus the token of the step in flight when one was
    counted ahead: never one twice, none lost, none of a row that was dropped, through stop
    tokens, EOS, aborts, n > 1 siblings, requests arriving mid-run, preemptions and grammars
    (whose steps are sampled once the host has the tokens before)."""
    rng = random.Random(11)
    llm = _llm(tool_checkpoint, True, num_kv_blocks=16, block_size=4, max_model_len=64)
    grammars = [None, None, StructuredOutput("regex", "(ab|cd){2,9}x"), StructuredOutput("choice", json.dumps(["on", "off"]))]
    engine = llm.engine
    requests, num_checked = [], 0

    def add() -> None:
        params = SamplingParams(
            max_tokens=rng.randint(1, 25),
            temperature=rng.choice([0.0, 0.9]),
            seed=rng.randrange(99),
            frequency_penalty=rng.choice([0.5, 1.0]),
            presence_penalty=rng.choice([0.0, 0.5]),
            repetition_penalty=rng.choice([1.0, 1.2]),
            ignore_eos=rng.random() < 0.5,
            n=rng.choice([1, 1, 2, 3]),
            stop_token_ids=[rng.randrange(200) for _ in range(8)] if rng.random() < 0.4 else None,
            structured_output=rng.choice(grammars),
        )
        prompt = [rng.randrange(200) for _ in range(rng.randint(2, 12))]
        requests.append(engine.add_request(f"r{len(requests)}", prompt, params))

    for _ in range(5):
        add()
    while engine.has_unfinished_requests():
        engine.step()
        counts, in_flight = engine.core.runner.sampler.counts, engine.pipeline._in_flight
        rows_in_flight = in_flight.row_of() if in_flight is not None else {}
        for request, row in (counts._rows if counts is not None else {}).items():
            if request.is_finished:
                continue
            tokens, counted = list(request.output_token_ids), counts._counted[request]
            assert counted <= len(tokens) + 1
            if counted == len(tokens) + 1:  # counted ahead
                tokens.append(int(in_flight.host_ids[rows_in_flight[id(request)]]))
            tokens = tokens[:counted]  # the rest is counted when next asked for
            expected = torch.bincount(torch.tensor(tokens, dtype=torch.long), minlength=counts.vocab_size).to(torch.int32)
            assert torch.equal(counts.output_counts[row], expected), request.request_id
            num_checked += 1
        if rng.random() < 0.05 and (live := [r for r in requests if not r.is_finished]):
            engine.abort_request(rng.choice(live).root_id)
        elif rng.random() < 0.1 and len(requests) < 14:
            add()
    assert num_checked > 100 and engine.scheduler.num_preemptions > 0
    _assert_no_blocks_left(llm)


def test_abort_while_a_step_is_in_flight(checkpoints: dict[str, Path]) -> None:
    """The aborted request gets no token after the abort; its blocks are held while the step that
    still has its row runs, then freed."""
    llm = _llm(checkpoints["llama"], True, block_size=4)
    engine = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=25, ignore_eos=True)
    requests = [engine.add_request(str(i), prompt, params) for i, prompt in enumerate(random_prompts(200, [9, 14, 6], seed=2))]
    engine.step()  # the prompts (synchronous)
    engine.step()  # the first decode step is launched
    engine.step()  # the second is launched, the first read back
    victim = requests[1]
    assert engine.pipeline._in_flight is not None and any(item.request is victim for item in engine.pipeline._in_flight.batch)
    blocks = engine.core.block_manager
    num_tokens, num_blocks, free_before = len(victim.output_token_ids), len(victim.block_table), blocks.num_free_blocks
    engine.abort_request("1")
    assert victim.finish_reason == "abort"
    assert blocks.num_held_blocks == num_blocks  # a step in flight still writes one of its slots
    assert blocks.num_free_blocks == free_before
    engine.step()  # that step is read back: the blocks are freed
    assert blocks.num_held_blocks == 0
    while engine.has_unfinished_requests():
        engine.step()
    assert len(victim.output_token_ids) == num_tokens
    assert [len(r.output_token_ids) for r in (requests[0], requests[2])] == [25, 25]
    _assert_no_blocks_left(llm)


def test_more_sequences_than_max_num_seqs(checkpoints: dict[str, Path], launches: list[int]) -> None:
    """n > 1 siblings may outnumber max_num_seqs once forked; such a batch still runs ahead."""
    path, prompt = checkpoints["llama"], [[1, 2, 3, 4, 5]]
    params = SamplingParams(n=4, temperature=0.8, seed=1, max_tokens=6, ignore_eos=True)
    expected = _llm(path, False, max_num_seqs=2).generate(prompt, params)
    ahead_llm = _llm(path, True, max_num_seqs=2)
    actual = ahead_llm.generate(prompt, params)
    assert [c.token_ids for c in actual[0].outputs] == [c.token_ids for c in expected[0].outputs]
    assert 4 in [abs(n) for n in launches]
    _assert_no_blocks_left(ahead_llm)


def test_a_failed_launch_leaves_no_block_held(checkpoints: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """A launch that raises (a CUDA error, say) with a step in flight: the engine's error path
    (`reset`, then every request aborted, as AsyncEngine._fail_all does) frees every block, and the
    engine serves the next request."""
    llm = _llm(checkpoints["llama"], True, block_size=4)
    engine = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    for i in range(2):
        engine.add_request(str(i), [1, 2, 3, 4, 5, 6, 7], params)
    engine.step()  # the prompts
    engine.step()  # the first decode step is launched
    engine.abort_request("1")  # its blocks held behind the step in flight
    launch = ModelRunner.launch

    def failing(self, batch, previous):  # type: ignore[no-untyped-def]
        raise RuntimeError("CUDA error: out of memory")

    monkeypatch.setattr(ModelRunner, "launch", failing)
    with pytest.raises(RuntimeError, match="out of memory"):
        engine.step()
    monkeypatch.setattr(ModelRunner, "launch", launch)
    engine.pipeline.reset()
    engine.abort_request("0")
    _assert_no_blocks_left(llm)
    output = llm.generate([[9, 8, 7]], params)[0].outputs[0]
    assert len(output.token_ids) == 20
    _assert_no_blocks_left(llm)


def test_a_recomputed_one_token_chunk_is_not_a_decode_step(checkpoints: dict[str, Path]) -> None:
    """A preempted request recomputes its tokens in chunks; a chunk of one token that is not its
    last known token must be computed as such, not launched as a decode step."""

    def run(run_ahead: bool) -> list[int]:
        llm = _llm(checkpoints["llama"], run_ahead, block_size=4, max_num_batched_tokens=2, max_model_len=64)
        engine = llm.engine
        params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
        engine.add_request("a", [5, 6, 7], params)
        b = engine.add_request("b", [8, 9, 10], params)
        while len(b.output_token_ids) < 12:
            engine.step()
        engine.pipeline.run_ahead = False
        engine.step()  # reads back the step in flight
        engine.pipeline.run_ahead = run_ahead
        engine.scheduler.running.remove(b)  # preempted, as Scheduler._grow does when blocks run out
        engine.scheduler._preempt(b)
        while engine.has_unfinished_requests():
            engine.step()
        return b.output_token_ids

    assert run(True) == run(False)


def test_decoded_blocks_enter_the_prefix_cache(checkpoints: dict[str, Path]) -> None:
    """Full blocks of prompt + output are cached as the synchronous engine caches them."""
    cached = []
    for run_ahead in (False, True):
        llm = _llm(checkpoints["llama"], run_ahead, block_size=4)
        tokens = [5, 6, 7] + llm.generate([[5, 6, 7]], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))[0].outputs[
            0
        ].token_ids
        cached.append(llm.engine.core.block_manager.match_prefix(tokens))
    assert cached == [4, 4]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_run_ahead_through_cuda_graphs(checkpoints: dict[str, Path], launches: list[int]) -> None:
    """On a GPU each step's input ids come from the last graph replay's argmax, on the device:
    the tokens still equal HF's and the synchronous engine's, stop tokens included."""
    path = checkpoints["llama"]
    model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    prompts = random_prompts(model.config.vocab_size, [5, 17, 9, 30, 3, 12, 8], seed=7)
    lengths = [12, 1, 20, 7, 15, 30, 2]
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in lengths]
    gpu = LLM(model=str(path), device="cuda", dtype="float32", kv_cache_memory_gib=0.5)
    ahead = _outputs(gpu, prompts, params)
    for prompt, n, (tokens, _, _) in zip(prompts, lengths, ahead):
        assert tokens == hf_greedy(model, prompt, n)
    assert any(n < 0 for n in launches)  # relayed on the device
    stops = [SamplingParams(temperature=0.0, max_tokens=30, stop_token_ids=[t[len(t) // 2]]) for t, _, _ in ahead]
    sync = LLM(model=str(path), device="cuda", dtype="float32", kv_cache_memory_gib=0.5, async_scheduling=False)
    assert _outputs(gpu, prompts, stops) == _outputs(sync, prompts, stops)
    seeded = [SamplingParams(temperature=0.9, top_p=0.95, seed=i, max_tokens=20, ignore_eos=True) for i in range(len(prompts))]
    launches.clear()
    assert _outputs(gpu, prompts, seeded) == _outputs(sync, prompts, seeded)
    assert any(n < 0 for n in launches)
    # penalties count the token in flight on the device; logprobs come back with the tokens
    penalized = [
        SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, frequency_penalty=1.0, presence_penalty=0.5, logprobs=2)
    ] * len(prompts)
    launches.clear()
    actual, expected = gpu.generate(prompts, penalized), sync.generate(prompts, penalized)
    assert [o.outputs[0].token_ids for o in actual] == [o.outputs[0].token_ids for o in expected]
    for a, e in zip(actual, expected):
        _assert_same_logprobs(a.outputs[0].logprobs, e.outputs[0].logprobs)
    assert any(n < 0 for n in launches)
    _assert_no_blocks_left(gpu)
