"""The agentic loop, measured (issue 12, point 4): pre-train -> `longcat sft` on the synthetic tool-use set ->
`longcat serve` -> the `openai` client with `tools`, on held-out tools and phrasings the model never saw.

Claim: fine-tuning on synthetic conversations teaches a pre-trained model the chat format and how to call a tool
it has never seen (reading its schema); constrained decoding makes every call's arguments valid JSON that
follows the tool's schema.

Each held-out conversation is cut before its first assistant turn; the request carries the conversation so far
and its tools, at temperature 0 (so a multi-turn conversation is scored on its first turn's call: its follow-up
would depend on the model's own first reply). Scored per request:
  right tool       the calls name exactly the expected tools (for a conversation that needs none: no call)
  right arguments  ... and each call's arguments equal the expected ones as JSON (61 and 61.0 alike, any key order)
  valid JSON       of the calls made, the share whose arguments parse as a JSON object that fits the tool's schema
Twice: free decoding (`tool_choice: auto`), and constrained (the same, with every tool `strict: true`, so a call's
arguments are decoded under its schema's grammar; the choice to call stays the model's).
Calling a tool it never saw means copying names and values from the prompt, so the base and the tuned model are
also probed for in-context copying: the loss on a repeated run of random tokens, first copy against second. A
model that copies predicts the second copy almost exactly; one that does not scores both alike.

    python experiments/tool_use.py [--base DIR] [--steps N] [--train-rows N] [--eval-rows N] [--quick]
--base: a pre-trained checkpoint (e.g. the README quickstart's runs/small); without it the small preset is trained
first on --data with --seed (~4 minutes on 2 cores). --quick (CI): a micro model, a few steps, a few requests;
numbers meaningless.
"""
from __future__ import annotations

import itertools
import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from common import Setup, cleared, figure, parse, positive_int, save

from longcat_flash.checkpoint.hf import from_pretrained
from longcat_flash.cli import main as cli_main
from longcat_flash.data.tool_dialogues import case_of, same_json, validate_arguments
from longcat_flash.serve.launch import running_server
from longcat_flash.train.config import apply_overrides, recipe
from longcat_flash.train.trainer import train

MODES = {"free": False, "constrained": True}  # mode -> tools sent as strict
ASKED_CONFIG = "asked_config.json"  # in WORK/base: the config the base was trained for, to reuse it
QUICK = {"steps": 1, "train_rows": 16, "eval_rows": 4}


def add_arguments(parser) -> None:
    parser.add_argument("--base", type=Path, default=None, help="pre-trained HF checkpoint directory")
    parser.add_argument("--steps", type=positive_int, default=200, help="SFT steps")
    parser.add_argument("--train-rows", type=positive_int, default=3000, help="synthetic training conversations")
    parser.add_argument("--eval-rows", type=positive_int, default=100, help="held-out conversations scored")


def check(args, setup: Setup) -> None:
    if args.base is not None and not (args.base / "config.json").is_file():
        raise ValueError(f"--base {args.base} holds no config.json: give a pre-trained HF checkpoint directory")
    tuned = (setup.work / "sft").resolve()
    if args.base is not None and (args.base.resolve() == tuned or tuned in args.base.resolve().parents):
        raise ValueError(f"--base {args.base} is this experiment's own tuned model, which each run replaces: copy it "
                         "out of --work first")  # it was deleted before it was read


def longcat(*args: str) -> None:
    """Run one `longcat` command as a user types it (in this process: a second start of torch took seconds); its
    own output is shown, and its failure stops the experiment with one line (the command said why above it)."""
    try:
        cli_main(list(args))
    except SystemExit as stopped:
        if not stopped.code:
            return
        if stopped.code == 130:  # Ctrl-C: the command said where it stopped; the experiment stops as quietly
            raise
        if isinstance(stopped.code, str):  # the command's error line, which the interpreter would have printed
            print(stopped.code, file=sys.stderr)
        command = " ".join(itertools.takewhile(lambda arg: not arg.startswith("-"), args))  # `data tools`, `sft`
        sys.exit(f"[tool_use] `longcat {command}` failed; its error is above")


def base_model(setup: Setup, given: Path | None) -> Path:
    """The pre-trained starting point: --base, else a run in WORK/base (the micro recipe with --quick, else
    `small`, both on --data with --seed), reused while its saved config is the one asked for and it finished."""
    if given is not None:
        return given
    out = setup.work / "base"
    cfg = setup.config(steps=8) if setup.quick else apply_overrides(  # its token cache inside --work too
        recipe("small"), [f"data.source={setup.base.data.source}", f"seed={setup.base.seed}",
                          f"data.cache_dir={setup.work / '_data' / 'small-tokens'}"])
    asked = out / ASKED_CONFIG  # what the run was asked for: the trainer saves its config resolved (dtypes, paths)
    if not ((out / "config.json").is_file() and asked.is_file() and asked.read_text() == cfg.to_json()):
        train(cfg, cleared(out), progress=False)
        asked.write_text(cfg.to_json())  # after the run finished: a killed one is trained again
    return out


def first_call_turn(row: dict[str, Any]) -> tuple[list[dict], list[tuple[str, Any]]]:
    """The messages before the first assistant turn, and the calls that turn makes ([] when it answers in text)."""
    messages = row["messages"]
    i = next(i for i, m in enumerate(messages) if m["role"] == "assistant")
    calls = messages[i].get("tool_calls") or []
    return messages[:i], [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]


def score(client: Any, model: str, row: dict[str, Any], strict: bool) -> dict[str, Any]:
    """One request: did it call the right tools with the right arguments, and were the arguments valid?"""
    prefix, expected = first_call_turn(row)
    tools = [{**tool, "function": {**tool["function"], "strict": True}} if strict else tool for tool in row["tools"]]
    schemas = {tool["function"]["name"]: tool["function"]["parameters"] for tool in row["tools"]}
    reply = client.chat.completions.create(model=model, messages=prefix, tools=tools, temperature=0, max_tokens=160)
    calls = reply.choices[0].message.tool_calls or []
    got, valid = [], []
    for call in calls:
        try:
            arguments = json.loads(call.function.arguments)
        except json.JSONDecodeError:
            arguments = None
        schema = schemas.get(call.function.name)
        valid.append(isinstance(arguments, dict) and schema is not None and validate_arguments(arguments, schema) == [])
        got.append((call.function.name, arguments))
    names = sorted(name for name, _ in got) == sorted(name for name, _ in expected)
    return {"case": case_of(row), "right_tool": names, "right_arguments": names and same_calls(got, expected),
            "calls": len(calls), "valid_calls": sum(valid)}


def same_calls(got: list[tuple[str, Any]], expected: list[tuple[str, Any]]) -> bool:
    """The same calls in any order, each with the same arguments as JSON (`same_json`: 61 and 61.0 are one number,
    and a key order is no difference)."""
    left = list(expected)
    for name, arguments in got:
        match = next((j for j, (n, a) in enumerate(left) if n == name and same_json(a, arguments)), None)
        if match is None:
            return False
        left.pop(match)
    return not left


@torch.no_grad()
def copy_probe(model_dir: Path, rows: int = 8, length: int = 60, seed: int = 0) -> dict[str, float]:
    """Mean loss on `rows` runs of `length` random tokens, each given twice: on the first copy (unpredictable)
    and on the second (predictable by copying from the first)."""
    model = from_pretrained(model_dir).eval()
    vocab = model.config.vocab_size
    run = torch.randint(vocab // 8, vocab, (rows, length), generator=torch.Generator().manual_seed(seed))
    tokens = torch.cat([run, run], 1)  # (rows, 2 * length)
    logits = model(tokens[:, :-1]).logits.float()
    loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), tokens[:, 1:], reduction="none")
    return {"first_copy": loss[:, : length - 1].mean().item(), "second_copy": loss[:, length - 1:].mean().item()}


def summarise(results: list[dict[str, Any]]) -> dict[str, Any]:
    calls = sum(r["calls"] for r in results)
    by_case = Counter(r["case"] for r in results)
    return {"requests": len(results), "right_tool": sum(r["right_tool"] for r in results) / len(results),
            "right_arguments": sum(r["right_arguments"] for r in results) / len(results),
            "calls": calls, "valid_json": sum(r["valid_calls"] for r in results) / calls if calls else None,
            "right_arguments_by_case": {case: sum(r["right_arguments"] for r in results if r["case"] == case) / n
                                        for case, n in sorted(by_case.items())}}


def main() -> None:
    setup, args = parse("tool_use", __doc__, add_arguments, QUICK, check)
    steps, train_rows, eval_rows = args.steps, args.train_rows, args.eval_rows
    base = base_model(setup, args.base)
    data, heldout = setup.work / "tools_train.jsonl", setup.work / "tools_heldout.jsonl"
    tuned = cleared(setup.work / "sft")  # the trainer and `longcat sft` refuse a used directory
    longcat("data", "tools", "--out", str(data), "--n", str(train_rows), "--seed", str(args.seed), "--force")
    longcat("data", "tools", "--out", str(heldout), "--n", str(eval_rows), "--seed", str(args.seed), "--split",
            "heldout", "--force")
    start = time.perf_counter()
    longcat("sft", "--model", str(base), "--data", str(data), "--out", str(tuned), "--max-steps", str(steps),
            "--no-progress", "--seed", str(args.seed))
    sft_seconds = time.perf_counter() - start
    copying = {"base": copy_probe(base), "tuned": copy_probe(tuned)}
    print(f"[tool_use] in-context copying (loss on a random run's first / second copy): {json.dumps(copying)}",
          flush=True)
    rows = [json.loads(line) for line in heldout.read_text().splitlines()]

    import openai

    results = {}
    with running_server(tuned, threads=2) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=300)
        name = client.models.list().data[0].id
        for mode, strict in MODES.items():
            results[mode] = summarise([score(client, name, row, strict) for row in rows])
            print(f"[tool_use] {mode}: {json.dumps(results[mode])}", flush=True)
    val = [json.loads(line) for line in (tuned / "metrics.jsonl").read_text().splitlines()]
    val_losses = [(r["step"], r["val_loss"]) for r in val if "val_loss" in r]
    verdict = verdict_text(results, copying)
    constrained = results["constrained"]
    reproduced = None if setup.quick else (constrained["right_arguments"] >= 0.9 and constrained["valid_json"] == 1.0)
    fig, (bars, curve) = figure(2)
    metrics = ("right_tool", "right_arguments", "valid_json")
    for k, mode in enumerate(MODES):
        bars.bar([i + 0.4 * k for i in range(len(metrics))], [results[mode][m] or 0.0 for m in metrics], 0.4,
                 label=mode)
    bars.set_xticks([i + 0.2 for i in range(len(metrics))], ["right tool", "right tool + args", "valid JSON"])
    bars.set_ylim(0, 1.05)
    bars.set_title(f"{len(rows)} held-out conversations")
    bars.legend()
    curve.plot(*zip(*val_losses), marker="o")
    curve.set_xlabel("SFT step")
    curve.set_ylabel("held-out loss (assistant tokens)")
    curve.set_title("SFT")
    save(setup, __doc__.split("Claim: ")[1].split("\n\n")[0].replace("\n", " "),
         f"base {base}, `longcat sft` {steps} steps on {train_rows} synthetic conversations ({sft_seconds:.0f} s), "
         f"scored on {len(rows)} held-out conversations through `longcat serve` and the openai client",
         {"modes": results, "copying": copying, "sft_seconds": round(sft_seconds, 1), "sft_steps": steps,
          "val_loss": val_losses},
         verdict, reproduced, fig)


def verdict_text(results: dict[str, dict], copying: dict[str, dict]) -> str:
    """Every scored figure in both modes (free / constrained), then the copying probe."""
    def both(key: str) -> str:
        return " / ".join(_pct(results[mode][key]) for mode in MODES)

    return (f"held-out tools ({' / '.join(MODES)}): right tool {both('right_tool')}, right tool and arguments "
            f"{both('right_arguments')}, valid JSON {both('valid_json')} (goal: >= 90% right, 100% valid when "
            f"constrained); loss on a repeated random run, first / second copy: base "
            f"{copying['base']['first_copy']:.2f} / {copying['base']['second_copy']:.2f}, tuned "
            f"{copying['tuned']['first_copy']:.2f} / {copying['tuned']['second_copy']:.2f}")


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0%}"


if __name__ == "__main__":
    main()
