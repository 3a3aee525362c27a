"""The real lm-evaluation-harness CLI (lm_eval 0.4.13) against a real `longcat serve`, offline, on tasks the test
writes itself: a multiple-choice log-likelihood task through `local-completions` (every log-likelihood equals the
model's own forward), and a generate-until task through `local-completions` and `local-chat-completions` (every
answer equals the model's own greedy continuation of the prompt, or of the chat-rendered prompt, cut at the task's
stop strings). The server has an API key, which lm_eval sends to /v1/ from OPENAI_API_KEY."""
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

from infer_support import greedy_reference
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


KEY = "lm-eval-key"
GEN_TASK = "longcat_gen"
GEN_DOCS = [{"question": "def add(a, b):", "answer": " return a + b"}, {"question": "Question: 2 + 2 =", "answer": "4"},
            {"question": "import os\nimport", "answer": " sys"}]
GEN_TOKENS = 6
GEN_YAML = f"""task: {GEN_TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {{data}}
test_split: test
output_type: generate_until
doc_to_text: question
doc_to_target: answer
generation_kwargs:
  until: ["\\n\\n", "Question:"]
  max_gen_toks: {GEN_TOKENS}
  do_sample: false
  temperature: 0
metric_list:
  - metric: exact_match
"""


def write_task(root: Path, name: str = TASK, docs: list[dict] = DOCS, yaml: str = YAML) -> Path:
    """A local JSONL dataset and the task YAML over it; returns the folder for --include_path."""
    data, tasks = root / f"{name}.jsonl", root / "tasks"
    data.write_text("".join(json.dumps(doc) + "\n" for doc in docs))
    tasks.mkdir(exist_ok=True)
    (tasks / f"{name}.yaml").write_text(yaml.format(task=name, data=data))
    return tasks


# lm_eval's own CLI, its task index limited to --include_path: indexing the ~10k task files it ships took ~16 s of
# CPU in each run, on tasks no test here uses
LM_EVAL_CLI = ("from functools import partialmethod\n"
               "from lm_eval.tasks import TaskManager\n"
               "TaskManager.__init__ = partialmethod(TaskManager.__init__, include_defaults=False)\n"
               "from lm_eval.__main__ import cli_evaluate\n"
               "cli_evaluate()\n")


def start_lm_eval(base: str, model_dir: Path, tasks: Path, out: Path, task: str = TASK, chat: bool = False,
                  remote: bool = False) -> subprocess.Popen:
    """One harness run in the background. `remote`: lm_eval tokenizes through the server's /tokenize (its
    `tokenizer_backend=remote`), not locally."""
    if chat:
        model, args, extra = "local-chat-completions", f"model=tiny,base_url={base}/v1/chat/completions", \
            ["--apply_chat_template"]
    else:
        model, extra = "local-completions", []
        backend = "tokenizer_backend=remote" if remote else f"tokenizer_backend=huggingface,tokenizer={model_dir}"
        args = f"model=tiny,base_url={base}/v1/completions,{backend},num_concurrent=1"
    env = {**os.environ, "OPENAI_API_KEY": KEY, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "HF_HOME": str(out / "hf"), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", LM_EVAL_CLI, "--model", model, "--model_args", args, *extra,
                             "--tasks", task, "--include_path", str(tasks), "--output_path", str(out),
                             "--log_samples"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(run: subprocess.Popen) -> None:
    try:
        stdout, stderr = run.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        run.kill()
        stdout, stderr = run.communicate()
    assert run.returncode == 0, stdout[-4000:] + stderr[-4000:]


def read_samples(out: Path, task: str) -> list[dict]:
    return [json.loads(line) for path in out.rglob(f"samples_{task}_*.jsonl") for line in path.read_text().splitlines()]


@torch.no_grad()
def reference_loglikelihood(model: torch.nn.Module, tokenizer: Tokenizer, context: str, continuation: str) -> float:
    """log p(continuation | context) from the model's own forward, split into tokens the way lm-eval does
    (the whole string encoded, the context's tokens cut off the front)."""
    whole, n_context = tokenizer.encode(context + continuation), len(tokenizer.encode(context))
    logprobs = model(torch.tensor([whole])).logits[0].float().log_softmax(-1)  # (S, V)
    return sum(logprobs[t - 1, whole[t]].item() for t in range(n_context, len(whole)))


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """One tiny checkpoint behind one `longcat serve` for the module; its own model and tokenizer as the reference."""
    root = tmp_path_factory.mktemp("lm_eval")
    model_dir = init_checkpoint(tiny(), root / "tiny", dtype=torch.float32)
    write_task(root)
    tasks = write_task(root, GEN_TASK, GEN_DOCS, GEN_YAML)
    model, _ = load_for_inference(model_dir, dtype="float32", device="cpu")
    with running_server(model_dir, "--api-key", KEY) as base:
        yield base, model_dir, tasks, model, Tokenizer.load(model_dir)


@pytest.fixture(scope="module")
def harness(served, tmp_path_factory) -> dict[str, Path]:
    """The module's three lm_eval runs at once against the one server (each spends seconds starting up): both tasks
    through `local-completions`, the multiple-choice task again tokenized by the server, and the generate-until
    task through `local-chat-completions`."""
    base, model_dir, tasks, _, _ = served
    outs = {name: tmp_path_factory.mktemp(name) for name in ("completions", "remote", "chat")}
    runs = [start_lm_eval(base, model_dir, tasks, outs["completions"], f"{TASK},{GEN_TASK}"),
            start_lm_eval(base, model_dir, tasks, outs["remote"], TASK, remote=True),
            start_lm_eval(base, model_dir, tasks, outs["chat"], GEN_TASK, chat=True)]
    for run in runs:
        finish(run)
    return outs


@pytest.fixture(scope="module")
def completions(harness) -> Path:
    return harness["completions"]


def test_lm_eval_multiple_choice_matches_the_models_forward(served, completions):
    _, _, _, model, tokenizer = served
    results = json.loads(next(completions.rglob("results_*.json")).read_text())
    assert 0.0 <= results["results"][TASK]["acc,none"] <= 1.0
    samples = read_samples(completions, TASK)
    assert len(samples) == len(DOCS)
    scored = [(request["arg_0"], request["arg_1"], float(response[0][0])) for sample in samples
              for request, response in zip(sample["arguments"].values(), sample["resps"], strict=True)]
    assert len(scored) == sum(len(doc["choices"]) for doc in DOCS)
    for context, continuation, loglikelihood in scored:
        assert abs(loglikelihood - reference_loglikelihood(model, tokenizer, context, continuation)) < 1e-3


def test_lm_eval_tokenizing_through_the_server_scores_as_it_does_locally(harness, completions):
    """`tokenizer_backend=remote` (vLLM's /tokenizer_info, /tokenize and /detokenize) was refused with a 404, then,
    behind an API key, with a 401: lm_eval sends the key to /v1/ alone, as vLLM guards it."""

    def scores(out: Path) -> list[tuple[str, str, float]]:
        return sorted((request["arg_0"], request["arg_1"], float(response[0][0])) for sample in read_samples(out, TASK)
                      for request, response in zip(sample["arguments"].values(), sample["resps"], strict=True))

    remote, local = scores(harness["remote"]), scores(completions)
    assert len(remote) == sum(len(d["choices"]) for d in DOCS)
    assert [pair[:2] for pair in remote] == [pair[:2] for pair in local]  # the same requests, tokenized alike
    # the same scores, up to the last bits a prompt's logits take from the others prefilled with it (the two runs
    # share the server at once)
    assert [pair[2] for pair in remote] == pytest.approx([pair[2] for pair in local], abs=1e-4)


def greedy_answer(model: torch.nn.Module, tokenizer: Tokenizer, prompt: list[int], until: list[str]) -> str:
    """The model's own greedy continuation (no cache), ended by EOS, cut at the first stop string."""
    generated = greedy_reference(model, prompt, GEN_TOKENS)
    if model.config.eos_token_id in generated:
        generated = generated[:generated.index(model.config.eos_token_id)]
    text = tokenizer.decode(generated)
    return text[:min([i for i in (text.find(stop) for stop in until) if i >= 0], default=len(text))]


@pytest.mark.parametrize("chat", [False, True], ids=["local-completions", "local-chat-completions"])
def test_lm_eval_generate_until_answers_are_the_models_greedy_continuations(served, harness, chat):
    _, _, _, model, tokenizer = served
    out = harness["chat" if chat else "completions"]
    results = json.loads(next(out.rglob("results_*.json")).read_text())
    assert 0.0 <= results["results"][GEN_TASK]["exact_match,none"] <= 1.0
    samples = read_samples(out, GEN_TASK)
    assert sorted(sample["doc"]["question"] for sample in samples) == sorted(doc["question"] for doc in GEN_DOCS)
    until = ["\n\n", "Question:"]
    for sample in samples:
        question = sample["doc"]["question"]
        if chat:
            messages = [{"role": "user", "content": question}]
            prompt = tokenizer.encode(tokenizer.apply_chat_template(messages), allow_special=True)
        else:
            prompt = tokenizer.encode(question)
        assert sample["resps"][0][0] == greedy_answer(model, tokenizer, prompt, until), question
