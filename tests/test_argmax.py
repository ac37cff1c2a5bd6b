"""The greedy step's argmax kernel against torch's: the same index for every row, ties to the
lowest index (the first chunk holding the maximum, then the first entry in it), any vocabulary
size, bf16/fp16/fp32 logits, a row whose maximum sits in its last, partial chunk, strided rows.
On the CPU under TRITON_INTERPRET=1, on a GPU otherwise (`pytest -m gpu`)."""

from __future__ import annotations

import os

import pytest
import torch

from pdserve.kernels.argmax import argmax

IS_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() and not IS_INTERPRETED else "cpu"
pytestmark = [
    pytest.mark.skipif(DEVICE == "cpu" and not IS_INTERPRETED, reason="TRITON_INTERPRET=1 or a GPU"),
    *([pytest.mark.gpu] if DEVICE == "cuda" else []),
]


@pytest.mark.parametrize("vocab", [17, 4096, 4097, 32000, 128256, 151936])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_argmax_equals_torch(vocab: int, dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(vocab)
    logits = (torch.randn(5, vocab, generator=generator) * 4).to(dtype)
    logits[1, -1] = 100.0  # the maximum in the last (partial) chunk
    logits[2, 0] = 100.0  # ... in the first entry
    logits[3].fill_(-1.0)  # all tied: index 0
    logits = logits.to(DEVICE)
    assert torch.equal(argmax(logits).cpu(), logits.argmax(dim=-1).cpu())


def test_ties_go_to_the_lowest_index_across_and_within_chunks() -> None:
    logits = torch.zeros(3, 20000)
    logits[0, [9000, 5000, 5001, 19999]] = 7.0  # three chunks hold the maximum
    logits[1, [4095, 4096]] = 3.0  # the two sides of a chunk edge
    logits[2, [12, 13]] = float("inf")
    logits = logits.to(DEVICE)
    assert argmax(logits).tolist() == [5000, 4095, 12] == logits.argmax(dim=-1).tolist()


def test_into_a_strided_out_and_from_strided_rows() -> None:
    wide = torch.randn(4, 2 * 5000).to(DEVICE)
    logits = wide[:, :5000]  # rows 10000 apart
    buffer = torch.full((2, 8), -1, dtype=torch.int64, device=DEVICE)
    result = argmax(logits, out=buffer[0, :4])
    assert result.data_ptr() == buffer.data_ptr()
    assert torch.equal(buffer[0, :4], logits.argmax(dim=-1)) and (buffer[0, 4:] == -1).all() and (buffer[1] == -1).all()
    assert argmax(logits[:0]).shape == (0,)


def test_bad_input_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="float logits"):
        argmax(torch.zeros(3, dtype=torch.int64, device=DEVICE))
    with pytest.raises(ValueError, match="contiguous"):
        argmax(torch.zeros(8, 4, device=DEVICE).t())
    with pytest.raises(ValueError, match="out must be int64"):
        argmax(torch.zeros(2, 8, device=DEVICE), out=torch.zeros(2, dtype=torch.int32, device=DEVICE))
