"""lm-eval's `local-completions` model against `pdserve serve` (a prefill and a decode worker), offline,
with the server's own tokenizer (`tokenizer_backend=remote`) and `--batch_size 4`: a multiple-choice
(loglikelihood) task and a generate_until task run to completion, and every per-sample answer
equals what the offline engine computes for it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pdserve.engine import LLM, SamplingParams
from tests.servers import free_port, wait_for_http

pytestmark = pytest.mark.slow
MAX_MODEL_LEN = 256
QUESTIONS = [
    {"question": "The cache holds keys and", "choices": [" values", " tables", " rows"], "answer": 0},
    {"question": "Blocks are reserved by the", "choices": [" decode worker", " client"], "answer": 1},
    {"question": "def add(a, b): return", "choices": [" a + b", " a - b", " b", " None"], "answer": 2},
    {"question": "Questions and answers:", "choices": [" who", " where"], "answer": 0},
    {"question": "The prefill worker pushes", "choices": [" keys", " values", " nothing"], "answer": 1},
]


def write_tasks(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    data = root / "questions.jsonl"
    data.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    common = f'dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\ndoc_to_text: "{{{{question}}}}"\n'
    (root / "pdserve_mc.yaml").write_text(
        "task: pdserve_mc\n" + common + 'output_type: multiple_choice\ndoc_to_choice: "{{choices}}"\n'
        "doc_to_target: answer\nmetric_list:\n  - metric: acc\n"
    )
    (root / "pdserve_gen.yaml").write_text(
        "task: pdserve_gen\n" + common + 'output_type: generate_until\ndoc_to_target: "{{choices[answer]}}"\n'
        'generation_kwargs:\n  until: ["\\n"]\n  max_gen_toks: 6\n  do_sample: false\nmetric_list:\n  - metric: exact_match\n'
    )
    return root


def test_lm_eval_runs_a_loglikelihood_and_a_generation_task_exactly(demo_model_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("lm_eval")
    port, log_path = free_port(), tmp_path / "serve.log"
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pdserve.deploy.cli",
            "serve",
            "--model",
            str(demo_model_dir),
            "--served-model-name",
            "m",
            "--port",
            str(port),
            "--device",
            "cpu",
            "--max-model-len",
            str(MAX_MODEL_LEN),
            "--log-level",
            "warning",
        ],
        stdout=open(log_path, "wb"),
        stderr=subprocess.STDOUT,
        cwd=Path(__file__).parent.parent,
    )
    try:
        wait_for_http(f"http://127.0.0.1:{port}/health", timeout_s=240, process=server, log_path=log_path)
        tasks, out = write_tasks(tmp_path / "tasks"), tmp_path / "results"
        env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        command = [
            sys.executable,
            "-m",
            "lm_eval",
            "--model",
            "local-completions",
            "--model_args",
            f"model=m,base_url=http://127.0.0.1:{port}/v1/completions,tokenizer_backend=remote,num_concurrent=1,max_retries=1",
            "--tasks",
            "pdserve_mc,pdserve_gen",
            "--include_path",
            str(tasks),
            "--batch_size",
            "4",
            "--output_path",
            str(out),
            "--log_samples",
        ]
        run = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(60)
    samples = {
        task: [json.loads(line) for line in next(out.rglob(f"samples_{task}_*.jsonl")).read_text().splitlines()]
        for task in ("pdserve_mc", "pdserve_gen")
    }
    assert len(samples["pdserve_mc"]) == len(samples["pdserve_gen"]) == len(QUESTIONS)
    check_against_the_offline_engine(demo_model_dir, samples)


def check_against_the_offline_engine(model_dir: Path, samples: dict[str, list[dict]]) -> None:
    llm = LLM(model=str(model_dir), device="cpu", dtype="float32", max_model_len=MAX_MODEL_LEN)
    tokenizer = llm.get_tokenizer()
    for sample in samples["pdserve_mc"]:
        arguments = [sample["arguments"][f"gen_args_{i}"] for i in range(len(sample["doc"]["choices"]))]
        for args, (logprob, _) in zip(arguments, [r[0] for r in sample["resps"]]):
            text, continuation = args["arg_0"], args["arg_1"]  # as lm-eval split them
            context = tokenizer.encode(text, add_special_tokens=False)
            tokens = context + tokenizer.encode(text + continuation, add_special_tokens=False)[len(context) :]
            [output] = llm.generate({"prompt_token_ids": tokens}, SamplingParams(max_tokens=1, prompt_logprobs=0))
            want = sum(output.prompt_logprobs[i][tokens[i]].logprob for i in range(len(context), len(tokens)))
            assert abs(float(logprob) - want) < 1e-3, (text, continuation)
    for sample in samples["pdserve_gen"]:
        prompt = tokenizer.encode(sample["doc"]["question"], add_special_tokens=False)  # as lm-eval sends it
        [output] = llm.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=6, stop=["\n"]))
        assert sample["resps"][0][0] == output.outputs[0].text
