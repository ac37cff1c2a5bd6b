"""`ModelRunner`: owns the model weights and the paged KV cache of one worker, turns a scheduled
batch into model inputs, runs the forward pass (decode through CUDA graphs on a GPU) and samples;
grammar masks are computed on other threads meanwhile, and grammars advanced with the new tokens."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pdserve.engine.attention import AttentionMetadata
from pdserve.engine.config import ConfigError, EngineConfig, ModelConfig
from pdserve.engine.cuda_graph import DecodeGraphRunner
from pdserve.engine.grammar_masks import GrammarMasks
from pdserve.engine.kv_scales import read_kv_scales
from pdserve.engine.loader import init_random_weights, load_weights
from pdserve.engine.model import LlamaForCausalLM
from pdserve.engine.outputs import TokenLogprobs
from pdserve.engine.prompt_logprobs import compute_prompt_logprobs, prompt_targets
from pdserve.engine.request import Request, ScheduledRequest
from pdserve.engine.sampler import LogprobTensors, Sampler, SamplerOutput, only_argmax, reads_output
from pdserve.kernels.kv_quant import as_bytes
from pdserve.kernels.pdl import supports_pdl

logger = logging.getLogger(__name__)

CPU_KV_CACHE_GIB = 0.5


@dataclass
class StepLogits:
    logits: torch.Tensor  # float32 [len(requests), vocab]
    greedy_ids: torch.Tensor | None  # their argmax, when the step computed it (CUDA-graph decode)
    requests: list[Request]  # the sampled requests, in row order
    prompt_logprobs: dict[int, list[TokenLogprobs]] = field(default_factory=dict)  # see SamplerOutput


@dataclass
class _Forward:
    """A launched step's forward pass, until it is sampled (`ModelRunner.sample`)."""

    logits: torch.Tensor  # float32 [rows, vocab]; a graph's output buffer: valid until the next replay
    argmax: torch.Tensor | None  # the graph's argmax of them, or None (an eager forward)
    in_flight: torch.Tensor | None  # the step before's sampled ids on the device, when it kept them
    in_flight_rows: list[int]  # each row's row in the step before, or -1


@dataclass(eq=False)
class InFlightStep:
    """A decode step launched without waiting for its tokens (`ModelRunner.launch`)."""

    seq: int  # launch order
    batch: list[ScheduledRequest]  # one token each
    epochs: list[int]  # each request's num_preemptions at launch: a recomputed request's row is stale
    on_device: bool  # its tokens are in the graphs' token buffer, where the next replay can read them
    forward: _Forward | None  # not sampled yet: a grammar's mask waits for the token in flight
    host_ids: torch.Tensor | None = None  # int64 [len(batch)], pinned on a GPU: the tokens, once `done` fired
    done: torch.cuda.Event | None = None
    sampled_ids: torch.Tensor | None = None  # the tokens on the device, kept when the sampler drew them (not the graphs' argmax)
    logprobs: LogprobTensors | None = None  # on the host once `done` fired; None: no row asked
    _token_ids: list[int] | None = None

    @property
    def is_sampled(self) -> bool:
        return self.forward is None

    def row_of(self) -> dict[int, int]:
        return {id(item.request): row for row, item in enumerate(self.batch)}

    def token_ids(self) -> list[int]:
        """Waits for the step."""
        if self._token_ids is None:
            assert self.host_ids is not None, "a step is sampled before its tokens are read"
            if self.done is not None:
                self.done.synchronize()
            self._token_ids = self.host_ids.tolist()
        return self._token_ids

    def token_logprobs(self) -> list[TokenLogprobs | None]:
        """Each row's logprobs (None where not asked for). Waits for the step."""
        token_ids = self.token_ids()
        if self.logprobs is None:
            return [None] * len(token_ids)
        return self.logprobs.unpack(token_ids, [item.request for item in self.batch])


@dataclass
class ModelInputs:
    input_ids: torch.Tensor  # int64 [num_tokens]
    positions: torch.Tensor  # int64 [num_tokens]
    meta: AttentionMetadata
    logits_rows: torch.Tensor  # int64 [num_sampled]: rows of the hidden states that give logits
    sampled: list[Request]


def uses_decode_gemv(device: torch.device) -> bool:
    """Whether decode steps of a few rows (the model's `pdl_max_rows`) run the projections on our GEMV,
    each kernel launched as a dependent of the one before (engine/model.py `LlamaForCausalLM`)."""
    return device.type == "cuda" and supports_pdl(device)


class ModelRunner:
    def __init__(self, config: EngineConfig, model_config: ModelConfig, model_dir: Path | None) -> None:
        """`model_dir=None` builds the model with random weights (benchmarks)."""
        self.config = config
        self.model_config = model_config
        self.device = config.torch_device()
        self.dtype = config.torch_dtype(model_config, self.device)
        self.kv_dtype = config.torch_kv_cache_dtype(self.dtype)
        self.block_size = config.block_size
        self.max_model_len = config.model_len(model_config)
        self.max_blocks_per_seq = -(-self.max_model_len // self.block_size)
        self.quantization = config.quantization_for(model_config)
        self.model = self._build_model(model_dir)
        self.kv_cache = self._allocate_kv_cache()
        self.sampler = Sampler()
        self.grammar_masks = GrammarMasks(pin_memory=self.device.type == "cuda")
        self.graphs: DecodeGraphRunner | None = None
        if self.device.type == "cuda" and not config.enforce_eager:
            self.graphs = DecodeGraphRunner(
                self.model, self.kv_cache, min(config.max_num_seqs, 512), self.max_blocks_per_seq, self.block_size
            )
        # Where launched steps' tokens land on the host: two, used in turn (one step runs ahead)
        is_cuda = self.device.type == "cuda"
        self._launched_ids = torch.zeros(2, config.max_num_seqs, dtype=torch.long, pin_memory=is_cuda)
        self._num_launched = 0

    @property
    def num_kv_blocks(self) -> int:
        return self.kv_cache.shape[2]

    @property
    def kv_scales(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-layer (K scales, V scales) of an fp8 cache; () and () for a 16/32-bit one."""
        if self.kv_dtype == self.dtype:
            return (), ()
        layers = [layer.self_attn.attn for layer in self.model.model.layers]
        return tuple(a.k_scale for a in layers), tuple(a.v_scale for a in layers)

    # -- set-up -------------------------------------------------------------------------------
    def _build_model(self, model_dir: Path | None) -> LlamaForCausalLM:
        with torch.device("meta"):
            model = LlamaForCausalLM(self.model_config, uses_decode_gemv(self.device)).to(self.dtype)  # no memory yet
            if self.quantization is not None:  # after .to(dtype), which would widen fp8 weights
                model.quantize(self.quantization, self.dtype)
        model.to_empty(device=self.device)
        model.tie_weights()
        if model_dir is None:
            init_random_weights(model, self.config.seed)
        else:
            load_weights(model, model_dir)
            if self.kv_dtype != self.dtype:  # an fp8 cache reads with the checkpoint's scales, if any
                k_scales, v_scales = read_kv_scales(model_dir, self.model_config.num_layers)
                for layer, k_scale, v_scale in zip(model.model.layers, k_scales, v_scales):
                    layer.self_attn.attn.k_scale, layer.self_attn.attn.v_scale = k_scale, v_scale
        model.init_rotary(self.max_model_len, self.device)
        return model.eval()

    def _kv_shape(self, num_blocks: int) -> tuple[int, ...]:
        m = self.model_config
        return (m.num_layers, 2, num_blocks, self.block_size, m.num_kv_heads, m.head_dim)

    def _allocate_kv_cache(self) -> torch.Tensor:
        num_blocks = self.config.num_kv_blocks or self._num_blocks_for_memory()
        if num_blocks * self.block_size < self.block_size * 2:
            raise ConfigError("the KV cache has room for fewer than two blocks; give it more memory")
        logger.info("KV cache: %d blocks of %d tokens, %s", num_blocks, self.block_size, self.kv_dtype)
        return torch.zeros(self._kv_shape(num_blocks), dtype=self.kv_dtype, device=self.device)

    def _num_blocks_for_memory(self) -> int:
        """The memory budget over the bytes of one block: an fp8 block is half a bf16 one."""
        bytes_per_block = self.model_config.kv_bytes_per_token * self.block_size * self.kv_dtype.itemsize
        if self.config.kv_cache_memory_gib is not None:
            return max(1, int(self.config.kv_cache_memory_gib * 2**30) // bytes_per_block)
        if self.device.type == "cpu":
            return max(1, int(CPU_KV_CACHE_GIB * 2**30) // bytes_per_block)
        return max(1, self._profile_free_gpu_memory() // bytes_per_block)

    @torch.inference_mode()
    def _profile_free_gpu_memory(self) -> int:
        """Run the largest batch once with a scratch cache; what is left under the utilisation cap
        after the weights and that peak goes to the KV cache."""
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        num_tokens = min(self.config.max_num_batched_tokens, self.max_model_len)
        num_blocks = -(-num_tokens // self.block_size)
        scratch = torch.zeros(self._kv_shape(num_blocks), dtype=self.kv_dtype, device=self.device)
        meta = AttentionMetadata(
            slot_mapping=torch.arange(num_tokens, device=self.device),
            block_tables=torch.arange(num_blocks, dtype=torch.int32, device=self.device)[None],
            context_lens=torch.tensor([num_tokens], dtype=torch.int32, device=self.device),
            cu_seqlens_q=torch.tensor([0, num_tokens], dtype=torch.int32, device=self.device),
            max_seqlen_q=num_tokens,
        )
        ids = torch.zeros(num_tokens, dtype=torch.long, device=self.device)
        hidden = self.model(ids, torch.arange(num_tokens, device=self.device), scratch, meta)
        self.model.compute_logits(hidden[: self.config.max_num_seqs])
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated(self.device)
        del scratch, hidden
        torch.cuda.empty_cache()
        total = torch.cuda.get_device_properties(self.device).total_memory
        return int(total * self.config.gpu_memory_utilization) - peak

    # -- execution ----------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, batch: list[ScheduledRequest], on_layer: Callable[[int], None] | None = None) -> SamplerOutput:
        """Run one step; returns sampled tokens for the requests whose chunk ends at their last token
        (their grammars advanced). `on_layer(i)`: see `LlamaForCausalLM.forward` (eager steps only)."""
        masks = self.grammar_masks.start(_family_rows([s.request for s in batch if s.is_sampled]))  # overlaps the forward
        step = _with_siblings(self.compute_logits(batch, on_layer))
        if not step.requests:
            output = SamplerOutput([], [])
        elif step.greedy_ids is not None and only_argmax(step.requests):
            output = SamplerOutput(step.greedy_ids.tolist(), [None] * len(step.requests))
        else:
            output = self.sampler(step.logits, step.requests, masks)
            self.grammar_masks.accept(step.requests, output.token_ids)
        output.prompt_logprobs = step.prompt_logprobs
        return output

    @torch.inference_mode()
    def launch(self, batch: list[ScheduledRequest], previous: InFlightStep | None) -> InFlightStep:
        """Start a decode step (one token per request, every request `runs_ahead`) and return
        without waiting for it. A request also in `previous` decodes the token that step samples
        for it: on the device when both steps replay CUDA graphs, else after waiting for it. The
        step is sampled at once, except when a request's sampling reads its output (`reads_output`:
        a grammar, a bad word of several tokens) and `previous` is in flight: the caller samples
        the step (`sample`) once the host has that token and the grammars took it; the forward
        pass runs meanwhile."""
        requests = [s.request for s in batch]
        n = len(requests)
        rows = previous.row_of() if previous is not None else {}
        in_flight_rows = [rows.get(id(r), -1) for r in requests]  # the rows whose token `previous` samples
        previous_rows = in_flight_rows  # ... read on the device by the graph replay
        on_device = self.graphs is not None and self.graphs.can_run(n)
        if on_device and previous is not None and previous.on_device:
            input_ids = [0 if row >= 0 else r.last_token_id for r, row in zip(requests, previous_rows)]
        else:
            known = previous.token_ids() if previous is not None else []
            input_ids = [known[row] if row >= 0 else r.last_token_id for r, row in zip(requests, previous_rows)]
            previous_rows = [-1] * n
        if on_device:
            assert self.graphs is not None
            logits, argmax = self.graphs.run(requests, input_ids, previous_rows)
        else:
            inputs = self.prepare_inputs(batch, input_ids)
            hidden = self.model(inputs.input_ids, inputs.positions, self.kv_cache, inputs.meta)
            logits, argmax = self.model.compute_logits(hidden), None
        self._num_launched += 1
        in_flight = previous.sampled_ids if previous is not None else None
        forward = _Forward(logits, argmax, in_flight, in_flight_rows)
        epochs = [r.num_preemptions for r in requests]
        step = InFlightStep(self._num_launched, batch, epochs, on_device, forward)
        if previous is None or not any(reads_output(r) for r in requests):
            self.sample(step)
        return step

    @torch.inference_mode()
    def sample(self, step: InFlightStep, caught_up: bool = False) -> None:
        """Sample a launched step, after its forward pass on the device, and start copying its
        tokens to the host. `caught_up`: the host has appended the tokens of the step before
        (a deferred sampling), so none is in flight any more. Rows of requests that finished since
        the launch are sampled without a grammar mask (they are dropped when read)."""
        forward = step.forward
        assert forward is not None, "a step is sampled once"
        requests = [item.request for item in step.batch]
        n = len(requests)
        ids = forward.argmax
        if ids is None or not only_argmax(requests):
            masks = self.grammar_masks.start(requests)
            in_flight_rows = [-1] * n if caught_up else forward.in_flight_rows
            step.sampled_ids, logprobs = self.sampler.sample_ahead(
                forward.logits, requests, forward.in_flight, in_flight_rows, masks
            )
            step.logprobs = logprobs.to_host() if logprobs is not None else None
            ids = step.sampled_ids
            if step.on_device:
                assert self.graphs is not None
                ids = self.graphs.last_ids[:n].copy_(ids)  # where the next replay reads them
        if n > self._launched_ids.shape[1]:  # n > 1 siblings can outnumber max_num_seqs; a step in flight keeps its view
            self._launched_ids = torch.zeros(2, n, dtype=torch.long, pin_memory=self.device.type == "cuda")
        step.host_ids = self._launched_ids[step.seq % 2, :n]
        step.host_ids.copy_(ids, non_blocking=True)
        if self.device.type == "cuda":
            step.done = torch.cuda.Event()
            step.done.record()
        step.forward = None  # sampled (a failure above leaves it unsampled, for `StepPipeline.reset`)

    def compute_logits(self, batch: list[ScheduledRequest], on_layer: Callable[[int], None] | None = None) -> StepLogits:
        if on_layer is None and self.graphs is not None and self.graphs.can_run(len(batch)) and _is_plain_decode(batch):
            requests = [s.request for s in batch]
            return StepLogits(*self.graphs.run(requests), requests)
        inputs = self.prepare_inputs(batch)
        hidden = self.model(inputs.input_ids, inputs.positions, self.kv_cache, inputs.meta, on_layer)
        targets = prompt_targets(batch)
        prompt_logprobs = compute_prompt_logprobs(self.model, hidden, targets) if targets else {}
        return StepLogits(self.model.compute_logits(hidden[inputs.logits_rows]), None, inputs.sampled, prompt_logprobs)

    def prepare_inputs(self, batch: list[ScheduledRequest], decode_ids: list[int] | None = None) -> ModelInputs:
        """`decode_ids`: a decode step's input tokens, when the host does not hold them all yet
        (a launch ahead: every request decodes one token and is sampled)."""
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        context_lens: list[int] = []
        cu_seqlens = [0]
        logits_rows: list[int] = []
        sampled: list[Request] = []
        for item in batch:
            r = item.request
            start, end = r.num_computed_tokens, r.num_computed_tokens + item.num_tokens
            input_ids += item.token_ids() if decode_ids is None else [decode_ids[len(cu_seqlens) - 1]]
            positions += range(start, end)
            table = r.block_table
            slots += [table[p // bs] * bs + p % bs for p in range(start, end)]
            context_lens.append(end)
            cu_seqlens.append(cu_seqlens[-1] + item.num_tokens)
            if item.is_sampled or decode_ids is not None:
                logits_rows.append(cu_seqlens[-1] - 1)
                sampled.append(r)
        is_decode = all(item.num_tokens == 1 for item in batch)
        device = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=device),
            block_tables=self._block_tables([item.request.block_table for item in batch]),
            context_lens=torch.tensor(context_lens, dtype=torch.int32, device=device),
            cu_seqlens_q=None if is_decode else torch.tensor(cu_seqlens, dtype=torch.int32, device=device),
            max_seqlen_q=max(item.num_tokens for item in batch),
        )
        return ModelInputs(
            input_ids=torch.tensor(input_ids, dtype=torch.long, device=device),
            positions=torch.tensor(positions, dtype=torch.long, device=device),
            meta=meta,
            logits_rows=torch.tensor(logits_rows, dtype=torch.long, device=device),
            sampled=sampled,
        )

    def _block_tables(self, tables: list[list[int]]) -> torch.Tensor:
        width = max(len(t) for t in tables)
        padded = np.zeros((len(tables), width), dtype=np.int32)
        for i, table in enumerate(tables):
            padded[i, : len(table)] = table
        return torch.from_numpy(padded).to(self.device)

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """KV copies for forked sequences: block src -> block dst in every layer."""
        if copies:
            src, dst = zip(*copies)
            cache = as_bytes(self.kv_cache)  # fp8 blocks copy as bytes
            cache[:, :, list(dst)] = cache[:, :, list(src)]


def _with_siblings(step: StepLogits) -> StepLogits:
    """A request whose prompt just completed and has siblings waiting gets a row for each of them
    too (the same logits), right after its own: the scheduler reads the samples in that order."""
    if not any(r.has_unforked_siblings for r in step.requests):
        return step
    rows = [row for row, request in enumerate(step.requests) for _ in _family_rows([request])]
    requests = _family_rows(step.requests)
    index = torch.tensor(rows, device=step.logits.device)
    greedy = step.greedy_ids[index] if step.greedy_ids is not None else None
    return StepLogits(step.logits[index], greedy, requests, step.prompt_logprobs)


def _family_rows(requests: list[Request]) -> list[Request]:
    """The sampled requests, each followed by its siblings while they wait for their first token."""
    return [r for request in requests for r in (request.family if request.has_unforked_siblings else [request])]


def _is_plain_decode(batch: list[ScheduledRequest]) -> bool:
    """Every request computes exactly its last known token (and is sampled from it)."""
    return all(s.num_tokens == 1 and s.request.num_computed_tokens + 1 == s.request.num_tokens for s in batch)
