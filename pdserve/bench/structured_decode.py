"""Decode steps of replies under a grammar against the same steps without one: the engine step
(`LLMEngine.step`: CUDA graphs, the next step launched before the last one's tokens are read),
random weights in a real shape, every request holding `context` tokens of KV. Three batches, all
sampled at temperature 1 with the same logit bias, so the sampling work is the same:

- free: no grammar, the ceiling;
- thinking: a grammar under a reasoning parser (`Thinking`), the reply still thinking (its
  `</think>` biased away): no token constrained, but the step must switch to the grammar's mask
  the step after a `</think>`;
- answer: the grammar constraining every token (`(w[0-9]+)*`, which every word of the benchmark's
  vocabulary continues, so no reply ends): each step waits for the host's mask.

    python -m pdserve.bench.structured_decode --model qwen2.5-0.5b --batch-sizes 1 16 64 --context 1024

The grammar library needs a tokenizer it can read bytes from: the benchmark shape's own (one
word a token, WordPiece's decoder) is given a byte-level twin with the same words for the grammars."""

from __future__ import annotations

import argparse
import dataclasses
import random

import torch

from pdserve.bench.ceilings import describe_gpu
from pdserve.bench.decode import decoding_request, load_decode_core, time_steps
from pdserve.bench.shapes import SHAPES
from pdserve.engine.sampling_params import SamplingParams, StructuredOutput, Thinking
from pdserve.engine.structured_output import GrammarCompiler
from pdserve.engine.tokenizer import Tokenizer

KINDS = ("free", "thinking", "answer")
THINK, END_THINK = 1000, 1001  # two words of the vocabulary (above the ids the prompts hold) stand for `<think>` and `</think>`


def byte_level_twin(vocab_size: int, eos_id: int) -> Tokenizer:
    """The benchmark vocabulary's words ("w0", "w1", ...) under a byte-level decoder."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    backend = HFTokenizer(models.BPE(vocab={f"w{i}": i for i in range(vocab_size)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return Tokenizer(backend, {"eos_token": f"w{eos_id}"})


@torch.inference_mode()
def bench(name: str, batch_sizes: list[int], context: int, num_steps: int) -> list[tuple[int, str, float]]:
    """(batch, kind, step ms) rows."""
    from pdserve.engine.llm_engine import LLMEngine

    shape = SHAPES[name]
    core = load_decode_core(name, max(batch_sizes), context, num_steps)
    eos = shape["eos_token_id"]
    core.grammars = GrammarCompiler(byte_level_twin(shape["vocab_size"], eos), shape["vocab_size"], frozenset([eos]))
    grammar = StructuredOutput("regex", "(w[0-9]+)*")
    specs = {
        "free": None,
        "thinking": dataclasses.replace(grammar, thinking=Thinking(THINK, END_THINK, starts_thinking=True)),
        "answer": grammar,
    }
    rng = random.Random(0)
    rows = []
    for bs in batch_sizes:
        for kind in KINDS:
            spec = specs[kind]
            params = SamplingParams(
                temperature=1.0, max_tokens=None, ignore_eos=True, logit_bias={END_THINK: -100.0}, structured_output=spec
            )
            requests = []
            for i in range(bs):
                grammar_of = None if spec is None else core.grammars.compile(spec)
                request = decoding_request(core, f"{kind}{i}", params, context, rng, grammar=grammar_of)
                if grammar_of is not None:
                    grammar_of.accept(request.output_token_ids[0])  # the thinking's first token, or the answer's
                requests.append(request)
            engine = LLMEngine(core)
            for r in requests:
                engine.scheduler.add_running(r)
            rows.append((bs, kind, time_steps(engine.step, num_steps)))
            engine.pipeline.run_ahead = False
            engine.step()  # reads back the step in flight, launches none
            for r in requests:
                core.block_manager.free(r.block_table)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(SHAPES), default="qwen2.5-0.5b")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    rows = bench(args.model, args.batch_sizes, args.context, args.steps)
    print(f"\nGPU: {describe_gpu()}   {args.model}, context {args.context}, engine step ms (median of 5 x {args.steps} steps)")
    print("| batch | free (ceiling) | thinking | vs free | answer | vs free |")
    print("|---|---|---|---|---|---|")
    table = {(bs, kind): ms for bs, kind, ms in rows}
    for bs in args.batch_sizes:
        free, thinking, answer = (table[bs, kind] for kind in KINDS)
        print(
            f"| {bs} | {free:.3f} | {thinking:.3f} | {100 * free / thinking:.1f}% | {answer:.3f} | {100 * free / answer:.1f}% |"
        )


if __name__ == "__main__":
    main()
