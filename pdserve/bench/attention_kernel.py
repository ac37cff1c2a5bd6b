"""Paged attention kernels on a CUDA GPU: decode as bandwidth (the bytes it reads: bf16 or fp8 KV)
against a device-to-device copy measured in the same run, prefill as causal TFLOP/s. Median of
triton.testing.do_bench, rotating over input sets larger than L2.
Run: `python -m pdserve.bench.attention_kernel [--no-sweep | --splits-sweep] [--kv-cache-dtypes auto fp8]`."""

from __future__ import annotations

import argparse
import dataclasses
import itertools
from collections.abc import Callable

import torch
import triton
from triton.testing import do_bench_cudagraph

from pdserve import kernels
from pdserve.bench.ceilings import copy_bandwidth_gbs, median_ms
from pdserve.kernels.kv_quant import FP8_DTYPE
from pdserve.kernels.paged_decode_attention import DecodeLaunch, launch_decode, launch_for
from pdserve.kernels.paged_prefill_attention import PrefillLaunch, launch_prefill
from pdserve.kernels.paged_prefill_attention import choose_launch as choose_prefill_launch

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16
DTYPE = torch.bfloat16
KV_DTYPES = {"auto": DTYPE, "fp8": FP8_DTYPE}  # --kv-cache-dtype: the cache's element type
DEVICE = "cuda"
SCALE = HEAD_DIM**-0.5
HEADLINE_DECODE = (32, 4096)  # (batch, context_len)
DECODE_SHAPES = [HEADLINE_DECODE, (1, 4096), (8, 4096), (64, 4096), (32, 1024), (128, 1024), (8, 16384)]
PREFILL_LENS = [512, 2048, 8192]


def graph_median_ms(fn: Callable[[], object]) -> float:
    """Median time per call of `fn` replayed from a CUDA graph, as the engine's decode step runs it:
    kernels alone, without Python launch overhead (which exceeds small decode kernels' run time).
    do_bench_cudagraph runs `fn` on a stream of its own, which does not wait for the default stream:
    the inputs must be written first (block tables still being written read as garbage block ids,
    an illegal address)."""
    torch.cuda.synchronize()
    return do_bench_cudagraph(fn, rep=200, return_mode="median")


def num_rotation_sets(bytes_per_set: int) -> int:
    l2_bytes = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20)
    return max(2, min(64, triton.cdiv(4 * l2_bytes, bytes_per_set)))


def paged_kv(
    num_sets: int, num_seqs: int, context_len: int, kv_dtype: torch.dtype = DTYPE
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A K/V cache holding num_sets x num_seqs requests in scattered blocks, and their block tables
    [num_sets, num_seqs, blocks_per_seq]."""
    blocks_per_seq = triton.cdiv(context_len, BLOCK_SIZE)
    num_blocks = num_sets * num_seqs * blocks_per_seq
    kv_cache = torch.empty(2, num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM, dtype=kv_dtype, device=DEVICE)
    for half in kv_cache:  # random values, cast per half (fp8 has no randn)
        half.copy_(torch.randn(half.shape, dtype=DTYPE, device=DEVICE))
    block_ids = torch.randperm(num_blocks, device=DEVICE).to(torch.int32)
    return kv_cache[0], kv_cache[1], block_ids.view(num_sets, num_seqs, blocks_per_seq)


# ---- decode -------------------------------------------------------------------------------------


@dataclasses.dataclass
class DecodeCase:
    num_seqs: int
    context_len: int
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    block_tables: torch.Tensor  # [num_sets, num_seqs, blocks_per_seq]
    q: torch.Tensor  # [num_sets, num_seqs, num_heads, head_dim]
    out: torch.Tensor
    context_lens: torch.Tensor

    @property
    def kv_dtype(self) -> torch.dtype:
        return self.k_cache.dtype

    @property
    def bytes_moved(self) -> int:
        """Bytes the kernel must move: the K/V it reads (1 byte an element in fp8), q read, out written."""
        kv_bytes = 2 * self.num_seqs * self.context_len * NUM_KV_HEADS * HEAD_DIM * self.kv_dtype.itemsize
        return kv_bytes + 2 * self.q[0].numel() * DTYPE.itemsize

    def runner(self, launch: DecodeLaunch | None) -> Callable[[], object]:
        """A call per set in turn; launch None = the wrapper's own heuristic."""
        sets = itertools.cycle(range(self.q.shape[0]))

        def run() -> object:
            i = next(sets)
            args = (self.q[i], self.k_cache, self.v_cache, self.block_tables[i], self.context_lens, SCALE, self.out[i])
            if launch is None:
                return kernels.paged_decode_attention(*args, k_scale=1.0, v_scale=1.0)
            return launch_decode(launch, *args, k_scale=1.0, v_scale=1.0)

        return run


def make_decode_case(num_seqs: int, context_len: int, kv_dtype: torch.dtype = DTYPE) -> DecodeCase:
    bytes_per_set = 2 * num_seqs * context_len * NUM_KV_HEADS * HEAD_DIM * kv_dtype.itemsize
    num_sets = num_rotation_sets(bytes_per_set)
    k_cache, v_cache, block_tables = paged_kv(num_sets, num_seqs, context_len, kv_dtype)
    q = torch.randn(num_sets, num_seqs, NUM_HEADS, HEAD_DIM, dtype=DTYPE, device=DEVICE)
    context_lens = torch.full((num_seqs,), context_len, dtype=torch.int32, device=DEVICE)
    return DecodeCase(num_seqs, context_len, k_cache, v_cache, block_tables, q, torch.empty_like(q), context_lens)


def decode_gbs(case: DecodeCase, run: Callable[[], object]) -> float:
    """GB/s of the bytes the case's decode attention reads, `run` (one of its runners) replayed."""
    return case.bytes_moved / (graph_median_ms(run) * 1e-3) / 1e9


def check_decode(case: DecodeCase) -> float:
    args = (case.k_cache, case.v_cache, case.block_tables[0], case.context_lens, SCALE)
    out = kernels.paged_decode_attention(case.q[0], *args)
    ref = kernels.paged_decode_attention_ref(case.q[0].float(), *args)
    return ((out.float() - ref).norm() / ref.norm()).item()


def decode_sweep(case: DecodeCase, copy_gbs: float) -> None:
    """A few launch parameters around the heuristic's, at one shape, to guide its tuning."""
    default = launch_for(case.q[0], case.k_cache, case.block_tables[0])
    variants = [default] + [
        dataclasses.replace(default, **change)
        for change in [
            dict(num_stages=2),
            dict(num_stages=4),
            dict(num_stages=5),
            dict(tile_tokens=32, num_stages=4),
            dict(tile_tokens=64),
            dict(tile_tokens=128),
            dict(num_warps=8),
            dict(tile_tokens=128, num_warps=8),
            dict(num_splits=1),
            dict(num_splits=2),
            dict(num_splits=2 * default.num_splits),
            dict(num_splits=4 * default.num_splits),
        ]
    ]
    variants = list(dict.fromkeys(variants))  # drop repeats of the heuristic's choice
    print(
        f"\ndecode launch sweep at batch {case.num_seqs}, context {case.context_len}, KV {case.kv_dtype} (first row = heuristic):"
    )
    for launch in variants:
        try:
            gbs = decode_gbs(case, case.runner(launch))
            print(f"  {launch}  {gbs:7.0f} GB/s  {gbs / copy_gbs:5.1%} of copy")
        except Exception as error:  # noqa: BLE001 - a variant that does not fit the GPU is reported, not fatal
            print(f"  {launch}  failed: {type(error).__name__}: {str(error)[:100]}")


SPLITS_SWEEP_SHAPES = [(64, 1024), (128, 1024), (16, 1024), (32, 4096), (16, 4096), (8, 4096), (4, 4096)]
SPLITS_SWEEP_COUNTS = [1, 2, 3, 4, 6, 8, 9, 12, 16]


def engine_decode_runner(case: DecodeCase) -> Callable[[DecodeLaunch], Callable[[], object]]:
    """Runners of the engine's decode attention (`kernels.rotary_decode_attention`: rotary, KV store
    and split attention in one launch, the only decode attention serving runs on a GPU) over the
    case's sets, one per launch: each call rotates the step's new k into the cache at its slot."""
    num_sets, num_seqs = case.q.shape[0], case.num_seqs
    k = torch.randn(num_sets, num_seqs, NUM_KV_HEADS, HEAD_DIM, dtype=DTYPE, device=DEVICE)
    v = torch.randn_like(k)
    cos_sin = torch.randn(case.context_len, HEAD_DIM, dtype=torch.float32, device=DEVICE)
    positions = torch.full((num_seqs,), case.context_len - 1, dtype=torch.int64, device=DEVICE)
    last_blocks = case.block_tables[:, :, (case.context_len - 1) // BLOCK_SIZE].to(torch.int64)
    slots = last_blocks * BLOCK_SIZE + (case.context_len - 1) % BLOCK_SIZE  # the new token's slot, per set

    def runner(launch: DecodeLaunch) -> Callable[[], object]:
        sets = itertools.cycle(range(num_sets))

        def run() -> object:
            i = next(sets)
            return kernels.rotary_decode_attention(
                positions, case.q[i], k[i], v[i], cos_sin, case.k_cache, case.v_cache, slots[i],
                case.block_tables[i], case.context_lens, SCALE, case.out[i], launch=launch,
            )  # fmt: skip

        return run

    return runner


def engine_splits_sweep(kv_name: str, num_seqs: int, context_len: int, copy_gbs: float) -> str:
    """The engine's decode attention (`engine_decode_runner`) at fixed split counts: the sweep
    `choose_launch`'s split rule is tuned on. One line, each count's share of copy bandwidth; `*`
    marks the heuristic's."""
    case = make_decode_case(num_seqs, context_len, KV_DTYPES[kv_name])
    runner = engine_decode_runner(case)
    default = launch_for(case.q[0], case.k_cache, case.block_tables[0])
    cells = []
    for num_splits in SPLITS_SWEEP_COUNTS:
        share = decode_gbs(case, runner(dataclasses.replace(default, num_splits=num_splits))) / copy_gbs
        cells.append(f"{num_splits}{'*' if num_splits == default.num_splits else ''}: {share:.1%}")
    return f"KV {kv_name:4s} batch {num_seqs:3d} context {context_len:5d}   " + "  ".join(cells)


# ---- prefill ------------------------------------------------------------------------------------


def prefill_runner(prompt_len: int, launch: PrefillLaunch | None) -> tuple[Callable[[], object], int]:
    """One request of prompt_len new tokens (no cached prefix) per set; returns (run, causal FLOPs)."""
    bytes_per_set = prompt_len * (2 * NUM_KV_HEADS + 2 * NUM_HEADS) * HEAD_DIM * DTYPE.itemsize
    num_sets = num_rotation_sets(bytes_per_set)
    k_cache, v_cache, block_tables = paged_kv(num_sets, 1, prompt_len)
    q = torch.randn(num_sets, prompt_len, NUM_HEADS, HEAD_DIM, dtype=DTYPE, device=DEVICE)
    out = torch.empty_like(q)
    cu_seqlens_q = torch.tensor([0, prompt_len], dtype=torch.int32, device=DEVICE)
    context_lens = torch.tensor([prompt_len], dtype=torch.int32, device=DEVICE)
    launch = launch or choose_prefill_launch(DTYPE, HEAD_DIM, prompt_len, is_cuda=True)
    sets = itertools.cycle(range(num_sets))

    def run() -> object:
        i = next(sets)
        return launch_prefill(
            launch, q[i], k_cache, v_cache, block_tables[i], cu_seqlens_q, context_lens, prompt_len, SCALE, out[i]
        )

    return run, 2 * 2 * NUM_HEADS * HEAD_DIM * prompt_len * prompt_len // 2


def prefill_tflops(prompt_len: int, launch: PrefillLaunch | None = None) -> float:
    run, flops = prefill_runner(prompt_len, launch)
    return flops / (median_ms(run) * 1e-3) / 1e12


def prefill_sweep(prompt_len: int) -> None:
    default = choose_prefill_launch(DTYPE, HEAD_DIM, prompt_len, is_cuda=True)
    variants = [
        default,
        PrefillLaunch(64, 64, 4, 3),
        PrefillLaunch(128, 128, 8, 2),
        PrefillLaunch(128, 64, 8, 4),
        PrefillLaunch(128, 32, 8, 3),
        PrefillLaunch(64, 32, 4, 4),
    ]
    variants = list(dict.fromkeys(variants))  # drop repeats of the heuristic's choice
    print(f"\nprefill launch sweep at {prompt_len} tokens (first row = heuristic):")
    for launch in variants:
        try:
            print(f"  {launch}  {prefill_tflops(prompt_len, launch):6.1f} TFLOP/s")
        except Exception as error:  # noqa: BLE001 - a variant that does not fit the GPU is reported, not fatal
            print(f"  {launch}  failed: {type(error).__name__}: {str(error)[:100]}")


# ---- main ---------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--no-sweep", action="store_true", help="skip the launch-parameter sweeps")
    parser.add_argument("--kv-cache-dtypes", nargs="+", choices=sorted(KV_DTYPES), default=["auto", "fp8"])
    parser.add_argument(
        "--splits-sweep", action="store_true", help="only the engine decode kernel's split-count sweep (`*`: heuristic)"
    )
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    props = torch.cuda.get_device_properties(0)
    print(f"{props.name}, {props.multi_processor_count} SMs; torch {torch.__version__}, triton {triton.__version__}")
    print(f"heads {NUM_HEADS} q / {NUM_KV_HEADS} kv, head_dim {HEAD_DIM}, block_size {BLOCK_SIZE}, {DTYPE}")

    copy_gbs = copy_bandwidth_gbs()
    print(f"copy bandwidth ceiling: {copy_gbs:.0f} GB/s")
    if args.splits_sweep:
        print("\nengine decode attention (rotary + store + split attention), share of copy bandwidth by split count:")
        for kv_name, (num_seqs, context_len) in itertools.product(args.kv_cache_dtypes, SPLITS_SWEEP_SHAPES):
            print(engine_splits_sweep(kv_name, num_seqs, context_len, copy_gbs), flush=True)
            torch.cuda.empty_cache()
        return
    rows = []
    for kv_name, (num_seqs, context_len) in itertools.product(args.kv_cache_dtypes, DECODE_SHAPES):
        kv_dtype = KV_DTYPES[kv_name]
        case = make_decode_case(num_seqs, context_len, kv_dtype)
        if (num_seqs, context_len) == HEADLINE_DECODE:
            error = check_decode(case)
            print(f"decode check at batch {num_seqs}, context {context_len}, KV {kv_name}: rel err vs ref {error:.2e}")
            if not args.no_sweep:
                decode_sweep(case, copy_gbs)
        launch = launch_for(case.q[0], case.k_cache, case.block_tables[0])
        gbs = decode_gbs(case, case.runner(launch=None))
        engine_gbs = decode_gbs(case, engine_decode_runner(case)(launch))  # what serving runs
        rows.append(
            f"decode   KV {kv_name:4s} batch {num_seqs:4d} ctx {context_len:6d}  splits {launch.num_splits:2d} "
            f"tile {launch.tile_tokens:3d}  {case.bytes_moved / gbs / 1e3:7.1f} us  {gbs:7.0f} GB/s read  "
            f"{gbs / copy_gbs:6.1%} of copy   | engine's kernel {case.bytes_moved / engine_gbs / 1e3:7.1f} us  "
            f"{engine_gbs / copy_gbs:6.1%} of copy"
        )
        del case
        torch.cuda.empty_cache()

    if not args.no_sweep:
        prefill_sweep(PREFILL_LENS[-1])
    for prompt_len in PREFILL_LENS:
        rows.append(f"prefill  {prompt_len:5d} tokens  {prefill_tflops(prompt_len):6.1f} TFLOP/s (causal)")
        torch.cuda.empty_cache()

    print(f"\n== summary ({props.name}, q {DTYPE}, KV bf16 or fp8 e4m3, copy {copy_gbs:.0f} GB/s) ==")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
