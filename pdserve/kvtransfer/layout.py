"""`KVLayout`: everything two workers must agree on before KV bytes can move between their caches
(docs/contracts.md: `kv_cache: [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]`),
an fp8 cache's per-layer K/V scales included: blocks move as raw bytes, so both ends must read
them with the same scales."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

LAYOUT_NAME = "LAYER_KV_BLOCK_SLOT_HEAD_DIM"
DTYPES = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
    "float8_e4m3fn": torch.float8_e4m3fn,
}
QUANTIZED_DTYPES = ("float8_e4m3fn",)  # the dtypes whose layout carries scales
KVScales = tuple[tuple[float, ...], tuple[float, ...]]  # (K scale per layer, V scale per layer); () unquantized


class KVLayoutMismatchError(ValueError):
    """Two workers' caches cannot exchange KV; the message names every differing field."""

    PREFIX = "KV layout mismatch: "

    def __init__(self, mismatches: list[str]) -> None:
        super().__init__(self.PREFIX + "; ".join(mismatches))
        self.mismatches = mismatches


@dataclass(frozen=True)
class KVLayout:
    model_id: str  # checkpoint identity (path/name + config hash)
    dtype: str  # "bfloat16" | "float16" | "float32" | "float8_e4m3fn"
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    layout: str = LAYOUT_NAME
    k_scales: tuple[float, ...] = ()  # fp8: value = stored * scale, one per layer; () otherwise
    v_scales: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        num_scales = self.num_layers if self.dtype in QUANTIZED_DTYPES else 0
        if len(self.k_scales) != num_scales or len(self.v_scales) != num_scales:
            raise ValueError(
                f"a {self.dtype} KV layout of {self.num_layers} layers carries {num_scales} K and V scales, "
                f"got {len(self.k_scales)} and {len(self.v_scales)}"
            )

    @classmethod
    def of(cls, kv_cache: torch.Tensor, model_id: str, kv_scales: KVScales = ((), ())) -> KVLayout:
        """The layout of a worker's cache `[num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]`
        read with `kv_scales` (fp8 only)."""
        if kv_cache.dim() != 6 or kv_cache.shape[1] != 2:
            raise ValueError(
                f"kv_cache must be [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim], "
                f"got shape {tuple(kv_cache.shape)}"
            )
        names = {dtype: name for name, dtype in DTYPES.items()}
        if kv_cache.dtype not in names:
            raise ValueError(f"kv_cache dtype {kv_cache.dtype} is not one of {sorted(DTYPES)}")
        num_layers, _, _, block_size, num_kv_heads, head_dim = kv_cache.shape
        k_scales, v_scales = (tuple(float(s) for s in scales) for scales in kv_scales)
        return cls(
            model_id,
            names[kv_cache.dtype],
            num_layers,
            num_kv_heads,
            head_dim,
            block_size,
            k_scales=k_scales,
            v_scales=v_scales,
        )

    def mismatches(self, other: KVLayout) -> list[str]:
        """Every field that differs, as 'field: ours X != theirs Y' (ours = self). Scales are
        compared only between caches of one dtype (they follow from it otherwise)."""
        is_same_dtype = self.dtype == other.dtype
        return [
            f"{field.name}: ours {getattr(self, field.name)!r} != theirs {getattr(other, field.name)!r}"
            for field in dataclasses.fields(self)
            if getattr(self, field.name) != getattr(other, field.name)
            and (is_same_dtype or field.name not in ("k_scales", "v_scales"))
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
