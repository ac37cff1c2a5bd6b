"""`KVLayout`: everything two workers must agree on before KV bytes can move between their caches
(docs/contracts.md: `kv_cache: [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]`)."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

LAYOUT_NAME = "LAYER_KV_BLOCK_SLOT_HEAD_DIM"
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class KVLayoutMismatchError(ValueError):
    """Two workers' caches cannot exchange KV; the message names every differing field."""

    PREFIX = "KV layout mismatch: "

    def __init__(self, mismatches: list[str]) -> None:
        super().__init__(self.PREFIX + "; ".join(mismatches))
        self.mismatches = mismatches


@dataclass(frozen=True)
class KVLayout:
    model_id: str  # checkpoint identity (path/name + config hash)
    dtype: str  # "bfloat16" | "float16" | "float32"
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    layout: str = LAYOUT_NAME

    @classmethod
    def of(cls, kv_cache: torch.Tensor, model_id: str) -> KVLayout:
        """The layout of a worker's cache `[num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]`."""
        if kv_cache.dim() != 6 or kv_cache.shape[1] != 2:
            raise ValueError(
                f"kv_cache must be [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim], "
                f"got shape {tuple(kv_cache.shape)}"
            )
        names = {dtype: name for name, dtype in DTYPES.items()}
        if kv_cache.dtype not in names:
            raise ValueError(f"kv_cache dtype {kv_cache.dtype} is not one of {sorted(DTYPES)}")
        num_layers, _, _, block_size, num_kv_heads, head_dim = kv_cache.shape
        return cls(model_id, names[kv_cache.dtype], num_layers, num_kv_heads, head_dim, block_size)

    def mismatches(self, other: KVLayout) -> list[str]:
        """Every field that differs, as 'field: ours X != theirs Y' (ours = self)."""
        return [
            f"{field.name}: ours {getattr(self, field.name)!r} != theirs {getattr(other, field.name)!r}"
            for field in dataclasses.fields(self)
            if getattr(self, field.name) != getattr(other, field.name)
        ]

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def chunk_shape(self, num_layers: int, num_blocks: int) -> tuple[int, ...]:
        """Shape of `kv_cache[l0:l1, :, block_ids]` for `num_layers` layers and `num_blocks` blocks."""
        return (num_layers, 2, num_blocks, self.block_size, self.num_kv_heads, self.head_dim)

    def chunk_num_bytes(self, num_layers: int, num_blocks: int) -> int:
        item_size = torch.empty((), dtype=self.torch_dtype).element_size()
        return math.prod(self.chunk_shape(num_layers, num_blocks)) * item_size
