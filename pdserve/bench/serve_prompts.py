"""Random-token prompts of exact token lengths for `pdserve bench`, built with the server's own
tokenizer (`POST /tokenize`, `POST /detokenize`): no local tokenizer, no Hub download."""

from __future__ import annotations

import asyncio
import random
import string

import httpx

NUM_POOL_WORDS = 400  # random words whose tokens make up the id pool
NUM_POOL_SAMPLE = 4000  # random ids tried for a round trip through the tokenizer
NUM_SAMPLES = 4  # fresh random ids per prompt before giving up
NUM_ADJUSTMENTS = 6  # length corrections per sample
NUM_PARALLEL = 16  # tokenizer calls in flight while building prompts


class PromptError(Exception):
    """The server cannot tokenize, or no prompt of exactly the asked length could be built."""


async def build_prompts(
    client: httpx.AsyncClient,
    endpoint: str,
    num_prompts: int,
    input_len: int,
    output_len: int,
    seed: int,
    prefix_len: int = 0,
    num_prefixes: int = 1,
) -> list[str]:
    """`num_prompts` texts the `endpoint` ("completions" or "chat") counts as exactly `input_len`
    tokens; with `prefix_len`, prompt i starts with the text of shared prefix i % `num_prefixes`,
    `prefix_len` random tokens long, and goes on with text of its own."""
    num_overhead, max_model_len = await count_tokens(client, endpoint, "")
    if input_len + output_len > max_model_len:
        raise PromptError(f"input_len + output_len = {input_len + output_len} exceeds the server's max_model_len {max_model_len}")
    num_body = input_len - num_overhead
    if num_body < 1:
        raise PromptError(f"input_len {input_len} leaves no room for text: {endpoint} counts {num_overhead} for an empty prompt")
    pool = await token_pool(client, random.Random(f"{seed}-pool"))
    limit = asyncio.Semaphore(NUM_PARALLEL)
    heads = [""]
    if prefix_len > 0:
        rng = random.Random(f"{seed}-prefixes")
        heads = [await detokenize(client, [rng.choice(pool) for _ in range(prefix_len)]) for _ in range(num_prefixes)]

    async def one(index: int) -> str:
        head = heads[index % len(heads)]
        async with limit:
            return head + await exact_prompt(
                client, endpoint, pool, random.Random(f"{seed}-{index}"), input_len, num_body - prefix_len, head
            )

    return list(await asyncio.gather(*(one(i) for i in range(num_prompts))))


async def exact_prompt(
    client: httpx.AsyncClient,
    endpoint: str,
    pool: list[int],
    rng: random.Random,
    input_len: int,
    num_body: int,
    head: str = "",
) -> str:
    """Random ids -> text -> the server's own tokens of that text; then the first k of those, k
    corrected by how far the endpoint's count is off, until `head` + it counts exactly `input_len`."""
    closest = None
    for _ in range(NUM_SAMPLES):
        text = await detokenize(client, [rng.choice(pool) for _ in range(2 * num_body + 8)])
        tokens = await tokenize(client, text)
        num_kept = num_body
        for _ in range(NUM_ADJUSTMENTS):
            if not 1 <= num_kept <= len(tokens):
                break
            prompt = await detokenize(client, tokens[:num_kept])
            count, _ = await count_tokens(client, endpoint, head + prompt)
            if count == input_len:
                return prompt
            closest = count if closest is None or abs(count - input_len) < abs(closest - input_len) else closest
            num_kept += input_len - count
    raise PromptError(f"no prompt of exactly {input_len} tokens for the {endpoint} endpoint (closest: {closest})")


async def token_pool(client: httpx.AsyncClient, rng: random.Random) -> list[int]:
    """Ids that decode to plain text and come back as themselves: those the server's tokenizer gives
    for ordinary random words and, since a word-level vocabulary maps such words to one unknown
    id, those of a random sample of the whole vocabulary that survive a round trip."""
    words = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 9))) for _ in range(NUM_POOL_WORDS)]
    from_words = set(await tokenize(client, " ".join(words)))
    vocab_size = await find_vocab_size(client)
    sample = rng.sample(range(vocab_size), min(vocab_size, NUM_POOL_SAMPLE))
    round_trip = set(await tokenize(client, await detokenize(client, sample))) & set(sample)
    return sorted(round_trip if len(round_trip) >= len(from_words) else from_words)


async def find_vocab_size(client: httpx.AsyncClient) -> int:
    """The vocabulary's size, by bisection on which ids /detokenize accepts (it refuses the others)."""
    low, high = 1, 1 << 24  # ids [0, low) are accepted; `high` is not
    while high - low > 1:
        middle = (low + high) // 2
        response = await client.post("/detokenize", json={"tokens": [middle - 1]})
        low, high = (middle, high) if response.status_code == 200 else (low, middle)
    return low


async def tokenize(client: httpx.AsyncClient, text: str) -> list[int]:
    """The server's tokens of `text` alone (no special tokens)."""
    return (await post(client, "/tokenize", {"prompt": text, "add_special_tokens": False}))["tokens"]


async def count_tokens(client: httpx.AsyncClient, endpoint: str, text: str) -> tuple[int, int]:
    """(prompt tokens as `endpoint` will count `text`, max_model_len): with the special tokens a
    completion adds, or inside the chat template as the one user message."""
    if endpoint == "chat":
        body = {"messages": [{"role": "user", "content": text}], "add_generation_prompt": True}
    else:
        body = {"prompt": text}
    answer = await post(client, "/tokenize", body)
    return answer["count"], answer["max_model_len"]


async def detokenize(client: httpx.AsyncClient, tokens: list[int]) -> str:
    return (await post(client, "/detokenize", {"tokens": tokens}))["prompt"]


async def post(client: httpx.AsyncClient, path: str, body: dict) -> dict:
    """No `model` field: a server serves one model and tokenizes with it, so a wrong --model name
    shows up in the benchmark's requests (as failures), not here."""
    try:
        response = await client.post(path, json=body)
    except httpx.HTTPError as exc:
        raise PromptError(f"{path}: {type(exc).__name__}: {exc}") from exc
    if response.status_code != 200:
        raise PromptError(f"{path} answered {response.status_code}: {response.text[:300]}")
    return response.json()
