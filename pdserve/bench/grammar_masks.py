"""Per-step cost of structured output on the CPU: a batch of JSON-schema requests on the demo
tokenizer, each step computing every request's next-token mask (llguidance, in parallel, GIL
released), applying it to the logits (one masked_fill) and advancing the grammars with the tokens.
Then the same batch through the engine: how much of the mask time a step still waits for once it
overlaps the forward pass. `python -m pdserve.bench.grammar_masks [--batch 32] [--steps 64]`"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch

from pdserve.engine.demo_model import default_demo_model_dir
from pdserve.engine.grammar_masks import GrammarMasks, PendingMasks
from pdserve.engine.request import Request
from pdserve.engine.sampling_params import SamplingParams, StructuredOutput
from pdserve.engine.structured_output import GrammarCompiler
from pdserve.engine.tokenizer import Tokenizer

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": "string", "format": "email"},
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 4},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 10}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "address"],
    "additionalProperties": False,
}


def measure_masks(model_dir: Path, batch: int, steps: int, seed: int) -> dict[str, float]:
    """Mask, apply and accept times per step (ms, medians), random allowed tokens for every row."""
    tokenizer = Tokenizer.from_pretrained(model_dir)
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    compiler = GrammarCompiler(tokenizer, vocab, tokenizer.eos_token_ids)
    spec = StructuredOutput("json", json.dumps(SCHEMA))
    params = SamplingParams(structured_output=spec)
    masks = GrammarMasks(pin_memory=False)
    rng = random.Random(seed)
    requests = [Request(str(i), [1], params, grammar=compiler.compile(spec)) for i in range(batch)]
    times: dict[str, list[float]] = {"mask": [], "apply": [], "accept": []}
    for _ in range(steps):
        t0 = time.perf_counter()
        pending = masks.start(requests)
        pending.wait()
        t1 = time.perf_counter()
        logits = pending.apply(torch.randn(batch, vocab))
        t2 = time.perf_counter()
        tokens = [rng.choice(row.isfinite().nonzero().flatten().tolist()) for row in logits]
        t3 = time.perf_counter()
        masks.accept(requests, tokens)
        t4 = time.perf_counter()
        for name, seconds in (("mask", t1 - t0), ("apply", t2 - t1), ("accept", t4 - t3)):
            times[name].append(seconds * 1e3)
        for i, request in enumerate(requests):  # a finished request starts over: the batch stays full
            if request.grammar.is_terminated:
                requests[i] = Request(str(i), [1], params, grammar=compiler.compile(spec))
    return {name: statistics.median(values) for name, values in times.items()}


def measure_engine(model_dir: Path, batch: int, seed: int) -> dict[str, float]:
    """The colocated engine over `batch` JSON requests: step time and the time a step waited for
    its masks after the forward (ms per step, medians over the steps with masks)."""
    from pdserve.engine import LLM

    waits: list[float] = []
    apply = PendingMasks.apply

    def timed_apply(self: PendingMasks, logits: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        self.wait()
        waits.append((time.perf_counter() - t0) * 1e3)
        return apply(self, logits)

    llm = LLM(str(model_dir), device="cpu", max_model_len=1024)
    spec = StructuredOutput("json", json.dumps(SCHEMA), disable_any_whitespace=True)
    params = [SamplingParams(temperature=1.0, seed=seed + i, max_tokens=256, structured_output=spec) for i in range(batch)]
    PendingMasks.apply = timed_apply
    try:
        t0 = time.perf_counter()
        outputs = llm.generate(["Hello"] * batch, params)
        elapsed = time.perf_counter() - t0
    finally:
        PendingMasks.apply = apply
    num_steps = max(len(o.outputs[0].token_ids) for o in outputs)
    return {"step": elapsed / num_steps * 1e3, "mask_wait": statistics.median(waits)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-engine", action="store_true", help="only the mask computation, not the engine run")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model_dir = default_demo_model_dir()
    masks = measure_masks(model_dir, args.batch, args.steps, args.seed)
    print(f"{args.batch} JSON-schema requests, demo tokenizer, {torch.get_num_threads()} torch threads; ms per step (median):")
    print(f"  masks {masks['mask']:.3f}   apply {masks['apply']:.3f}   accept {masks['accept']:.3f}")
    if not args.no_engine:
        engine = measure_engine(model_dir, args.batch, args.seed)
        print(f"  engine step {engine['step']:.2f}   waited for masks after the forward {engine['mask_wait']:.3f}")


if __name__ == "__main__":
    main()
