"""`pdserve serve --config FILE --autoscale` on the CPU with the tiny model: a burst of long prompts
queues on the prefill worker, the autoscaler grows the prefill pool, and once the burst is over and
the cool-down has passed it drains it back; no request fails, and the decisions are logged and on
/metrics."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from pdserve.deploy.admin_client import AdminClient
from pdserve.engine import LLM, SamplingParams
from tests.servers import pdserve
from tests.traffic import Case, RequestStream, ready, settled, wait_for_pools

pytestmark = pytest.mark.slow

MAX_MODEL_LEN = 256
TOKEN = "autoscale-admin"
MODEL = "tiny-llama"
CONFIG = """
served-model-name: tiny-llama
device: cpu
max-model-len: 256
max-num-batched-tokens: 256   # one long prompt per prefill step: a burst queues
admin-token: autoscale-admin
autoscale: true
pools:
  prefill: {replicas: 1, min: 1, max: 2}
  decode: {replicas: 1, min: 1, max: 1}
autoscaler: {interval_s: 0.5, cooldown_s: 5, sustain_ticks: 2, prefill_queue_high: 3, prefill_queue_low: 0.5,
             ttft_high_s: 2.5, ttft_low_s: 1.0}
drain: {quiet_s: 2}
"""


def test_a_burst_of_long_prompts_grows_the_prefill_pool_which_shrinks_back_after_the_cool_down(
    checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    config = tmp_path / "autoscale.yaml"
    config.write_text(CONFIG)
    reference = LLM(model=str(checkpoints["llama"]), device="cpu", dtype="float32", max_model_len=MAX_MODEL_LEN)
    prompts = [("Every request's keys and values are stored in fixed size blocks. " * 12)[: 560 + 20 * i] for i in range(4)]
    outputs = reference.generate(prompts, SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    cases = [Case(p, o.outputs[0].token_ids, o.outputs[0].text) for p, o in zip(prompts, outputs)]
    assert all(150 < len(o.prompt_token_ids) < 250 for o in outputs)

    with pdserve("serve", "--config", str(config), "--model", str(checkpoints["llama"]), log_path=tmp_path / "serve.log") as (
        url,
        _,
    ):
        admin = AdminClient(url, TOKEN)
        with RequestStream(url, MODEL, cases, max_tokens=4, num_threads=16) as burst:
            view = wait_for_pools(
                admin, lambda v: v["pools"]["prefill"]["desired"] == 2, 90, "the autoscaler grows the prefill pool"
            )
            grown_at = time.monotonic()
            wait_for_pools(admin, lambda v: len(ready(v, "prefill")) == 2, 90, "the second prefill worker is ready")
            burst.wait_for(16)  # served by both
        assert burst.num_done > 0 and not burst.failures(), burst.failures()[:5]
        view = wait_for_pools(admin, settled("prefill", 1), 90, "the pool shrinks back once the burst is over")
        assert time.monotonic() - grown_at >= 5  # not before the cool-down
        [drained] = [w for w in view["pools"]["prefill"]["gone"] if w["end_reason"] == "drained"]
        assert drained["load"]["num_used_blocks"] == 0
        assert view["pools"]["decode"]["desired"] == 1  # the other pool is sized on its own
        decisions = view["autoscaler"]["recent"]
        assert [(d["pool"], d["direction"]) for d in decisions] == [("prefill", "up"), ("prefill", "down")], decisions
        metrics = httpx.get(url + "/metrics", timeout=10).text
        for direction in ("up", "down"):
            assert (
                f'pdserve:autoscaler_decisions_total{{direction="{direction}",model_name="{MODEL}",pool="prefill"}} 1.0'
                in metrics
            )
    log = (tmp_path / "serve.log").read_text()
    assert "autoscaler: prefill pool 1 -> 2 replicas" in log and "autoscaler: prefill pool 2 -> 1 replicas" in log
