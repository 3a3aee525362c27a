"""The real lm-evaluation-harness CLI (`local-completions`, lm_eval 0.4.13) against a real `longcat serve`, offline,
on a multiple-choice log-likelihood task the test writes itself: it completes with an accuracy, and every
log-likelihood it computed through our logprobs equals the model's own forward."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from longcat_flash.checkpoint.fresh import init_checkpoint
from longcat_flash.infer.loader import load_for_inference
from longcat_flash.presets import tiny
from longcat_flash.tokenizer import Tokenizer

from serve_support import running_server

pytest.importorskip("lm_eval")
pytestmark = pytest.mark.slow

TASK = "longcat_mc"
DOCS = [
    {"question": "Question: 2 + 2 =", "choices": [" 4", " 5", " 22"], "answer": 0},
    {"question": "def add(a, b):\n    return", "choices": [" a + b", " a - b"], "answer": 0},
    {"question": "The capital of France is", "choices": [" Berlin", " Paris", " Rome", " Madrid"], "answer": 1},
    {"question": "import", "choices": [" os", " sys"], "answer": 1},
]
YAML = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: question
doc_to_choice: choices
doc_to_target: answer
metric_list:
  - metric: acc
"""


def write_task(root: Path) -> Path:
    """A local JSONL dataset and the task YAML over it; returns the folder for --include_path."""
    data, tasks = root / "mc.jsonl", root / "tasks"
    data.write_text("".join(json.dumps(doc) + "\n" for doc in DOCS))
    tasks.mkdir()
    (tasks / f"{TASK}.yaml").write_text(YAML.format(task=TASK, data=data))
    return tasks


def run_lm_eval(base: str, model_dir: Path, tasks: Path, out: Path) -> None:
    args = f"model=tiny,base_url={base}/v1/completions,tokenizer_backend=huggingface,tokenizer={model_dir}," \
           "num_concurrent=1"
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(out / "hf"),
           "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "lm_eval", "--model", "local-completions", "--model_args", args,
                          "--tasks", TASK, "--include_path", str(tasks), "--output_path", str(out), "--log_samples"],
                         env=env, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]


@torch.no_grad()
def reference_loglikelihood(model: torch.nn.Module, tokenizer: Tokenizer, context: str, continuation: str) -> float:
    """log p(continuation | context) from the model's own forward, split into tokens the way lm-eval does
    (the whole string encoded, the context's tokens cut off the front)."""
    whole, n_context = tokenizer.encode(context + continuation), len(tokenizer.encode(context))
    logprobs = model(torch.tensor([whole])).logits[0].float().log_softmax(-1)  # (S, V)
    return sum(logprobs[t - 1, whole[t]].item() for t in range(n_context, len(whole)))


def test_lm_eval_multiple_choice_matches_the_models_forward(tmp_path):
    model_dir = init_checkpoint(tiny(), tmp_path / "tiny", dtype=torch.float32)
    tasks, out = write_task(tmp_path), tmp_path / "out"
    with running_server(model_dir) as base:
        run_lm_eval(base, model_dir, tasks, out)
    results = json.loads(next(out.rglob("results_*.json")).read_text())
    assert 0.0 <= results["results"][TASK]["acc,none"] <= 1.0
    samples = [json.loads(line) for path in out.rglob(f"samples_{TASK}_*.jsonl")
               for line in path.read_text().splitlines()]
    assert len(samples) == len(DOCS)
    model, _ = load_for_inference(model_dir, dtype="float32", device="cpu")
    tokenizer = Tokenizer.load(model_dir)
    scored = [(request["arg_0"], request["arg_1"], float(response[0][0])) for sample in samples
              for request, response in zip(sample["arguments"].values(), sample["resps"], strict=True)]
    assert len(scored) == sum(len(doc["choices"]) for doc in DOCS)
    for context, continuation, loglikelihood in scored:
        assert abs(loglikelihood - reference_loglikelihood(model, tokenizer, context, continuation)) < 1e-3
