"""`longcat init`, `generate` and `chat` end to end on a tiny fresh checkpoint."""
from __future__ import annotations

import builtins
import io
import json
import sys

import pytest
from infer_support import bos_adding, one_thread  # noqa: F401  (autouse fixture)

from longcat_flash.cli import main
from longcat_flash.config import ModelConfig
from longcat_flash.infer.engine import Engine
from longcat_flash.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "tiny"
    main(["init", "--preset", "tiny", "--out", str(out), "--dtype", "float32"])
    return out


@pytest.mark.parametrize("command", [
    ["init", "--preset", "tiny", "--out", "m"], ["generate", "--model", "m", "--prompt", "x", "--temperature", "1"],
    ["data", "tools", "--out", "-", "--n", "1"], ["train", "--preset", "tiny", "--print-config"]])
def test_a_seed_torch_cannot_take_is_a_usage_error_naming_the_flag(command, capsys):
    """init's was torch's Overflow once, then a message of its own; generate's said "seed must be None or ..." (the
    Python API's words); a negative one wrapped round to the same text as 2^64 - 1, silently. A sampling seed is any
    int64, as the server takes it; a weights' or a data set's is not negative."""
    sampling = command[0] == "generate"
    low = ("must be in [-2^63, 2^63), got -9223372036854775809", -(2**63) - 1) if sampling else \
        ("must be >= 0, got -1", -1)
    high = f"must be in [{'-2^63' if sampling else '0'}, 2^63), got {2**64}"
    for value, words in ((2**64, high), (low[1], low[0])):
        with pytest.raises(SystemExit) as stopped:
            main([*command, "--seed", str(value)])
        assert stopped.value.code == 2 and f"argument --seed: {words}" in capsys.readouterr().err


def test_a_negative_sampling_seed_samples_as_the_server_takes_it(checkpoint, capsys):
    """--seed -1 was refused (`must be >= 0`) where the server takes any int64 seed, as OpenAI and vLLM do."""
    args = ["generate", "--model", str(checkpoint), "--prompt", "x", "--temperature", "1", "--max-new-tokens", "4",
            "--ignore-eos", "--json"]
    texts = []
    for _ in range(2):
        main([*args, "--seed", "-1"])
        texts.append(json.loads(capsys.readouterr().out)["text"])
    assert texts[0] == texts[1]  # reproducible, as any seed


def test_init_writes_a_loadable_checkpoint(checkpoint):
    cfg = ModelConfig.from_json(checkpoint)
    tokenizer = Tokenizer.load(checkpoint)
    assert cfg.vocab_size >= tokenizer.vocab_size and (tokenizer.bos_id, tokenizer.eos_id) == (1, 2)
    assert (checkpoint / "model.safetensors").is_file() and (checkpoint / "tokenizer_config.json").is_file()


def test_init_takes_the_presets_model_fields_from_set(tmp_path):
    """Without --set a model with no MTP head or no zero experts took the Python API; --set model.num_layers=10^8
    then hung building the model on the meta device before the memory check."""
    out = tmp_path / "m"
    main(["init", "--preset", "tiny", "--out", str(out), "--set", "model.num_layers=3",
          "--set", "model.num_nextn_predict_layers=0", "--set", "model.zero_expert_num=0"])
    cfg = ModelConfig.from_json(out)
    assert (cfg.num_layers, cfg.num_nextn_predict_layers, cfg.zero_expert_num) == (3, 0, 0)
    for setting, says in (("optim.lr=1", "--set optim.lr: only the model's fields (model.FIELD=VALUE) make a model"),
                          ("model.nope=1", "unknown config field 'model.nope'; valid fields here: model.vocab_size"),
                          ("model.moe_topk=999", "model.moe_topk=999 exceeds n_routed_experts"),
                          ("model.vocab_size=100", "--set model.vocab_size=100: the fresh tokenizer has at least 512"),
                          ("model.num_layers=100000000", "a model of at least ")):
        with pytest.raises(SystemExit) as stop:
            main(["init", "--preset", "tiny", "--out", str(tmp_path / "refused"), "--set", setting])
        assert str(stop.value.code).startswith(f"longcat init: {says}"), stop.value.code
        assert not (tmp_path / "refused").exists()


def test_generate_plain_json_and_speculative(checkpoint, capsys):
    args = ["generate", "--model", str(checkpoint), "--prompt", "import os", "--max-new-tokens", "7",
            "--ignore-eos"]
    main(args)
    plain = capsys.readouterr().out
    main(args + ["--json"])
    record = json.loads(capsys.readouterr().out)
    assert plain == record["text"] + "\n"
    assert record["completion_tokens"] == 7 and record["prompt_tokens"] == len(
        Tokenizer.load(checkpoint).encode("import os"))
    assert record["total_s"] > 0 and record["finish_reason"] == "length"
    main(args + ["--json", "--speculative", "2", "--quantize", "int8"])
    spec = capsys.readouterr()
    assert json.loads(spec.out)["completion_tokens"] == 7 and 0.0 <= json.loads(spec.out)["acceptance_rate"] <= 1.0
    assert spec.err == ""
    # a control the drafts do not model turned speculation off without a word: only acceptance_rate null showed it
    main(args + ["--json", "--speculative", "2", "--repetition-penalty", "1.2"])
    controlled = capsys.readouterr()
    assert json.loads(controlled.out)["acceptance_rate"] is None
    assert controlled.err == ("longcat generate: note: --repetition-penalty turns MTP speculation off (its drafts do "
                              "not model it): --speculative 2 decodes one token per step\n")


@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_ctrl_c_during_generate_json_still_prints_what_was_generated(checkpoint, capsys, monkeypatch, signame):
    """Ctrl-C printed nothing but "^C" under --json, the tokens generated so far lost; it ends the request between
    two engine steps, prints the JSON with finish_reason "interrupted", and exits with the shell's 130. The user's
    Ctrl-C is this process sending itself SIGINT at the fourth engine step. SIGTERM (`timeout`) does the same, with
    143 (it printed nothing at all)."""
    import os
    import signal

    step, steps, signum = Engine.step, [], getattr(signal, signame)

    def step_then_ctrl_c(engine):
        steps.append(len(steps))
        if len(steps) == 4:
            os.kill(os.getpid(), signum)
        return step(engine)

    monkeypatch.setattr(Engine, "step", step_then_ctrl_c)
    with pytest.raises(SystemExit) as stopped:
        main(["generate", "--model", str(checkpoint), "--prompt", "import os", "--max-new-tokens", "200",
              "--ignore-eos", "--json"])
    record = json.loads(capsys.readouterr().out)
    assert stopped.value.code == 128 + signum and record["finish_reason"] == "interrupted"
    assert 0 < record["completion_tokens"] < 200


def test_ctrl_c_while_the_commands_import_torch_exits_quietly_with_130(monkeypatch, capsys):
    """A Ctrl-C in the first second or two of any command (torch importing) was a 30-line traceback and a death by
    signal. Here the import of the commands is interrupted, as a Ctrl-C then interrupts it."""
    import importlib.abc

    class CtrlC(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name == "longcat_flash.cli.commands":
                raise KeyboardInterrupt
            return None

    monkeypatch.delitem(sys.modules, "longcat_flash.cli.commands", raising=False)  # (not yet imported: alone)
    monkeypatch.setattr(sys, "meta_path", [CtrlC(), *sys.meta_path])
    with pytest.raises(SystemExit) as stopped:
        main(["info", "--preset", "tiny"])
    assert stopped.value.code == 130 and capsys.readouterr().out == ""


def test_generate_reads_special_token_text_as_the_server_does(checkpoint, capsys):
    """`<s>` in a raw prompt is bos, as /v1/completions, vLLM and transformers read it; generate took it for 3 tokens
    of text, so the same prompt gave other ids in the two places."""
    main(["generate", "--model", str(checkpoint), "--prompt", "<s>import os", "--max-new-tokens", "1", "--json"])
    tokenizer = Tokenizer.load(checkpoint)
    record = json.loads(capsys.readouterr().out)
    assert record["prompt_tokens"] == 1 + len(tokenizer.encode("import os"))
    assert record["decode_tokens_per_s"] is None  # one token has no decode rate (it read 0.0 tok/s)


def test_generate_adds_the_bos_a_tokenizers_post_processor_adds(checkpoint, capsys, tmp_path):
    """A Llama-style tokenizer puts bos before a raw prompt in transformers' generate and vLLM: here it did not, so
    the same checkpoint continued another prompt."""
    import shutil

    shutil.copytree(checkpoint, tmp_path / "bos")
    tokenizer = bos_adding(Tokenizer.load(checkpoint))
    tokenizer.save(tmp_path / "bos")
    main(["generate", "--model", str(tmp_path / "bos"), "--prompt", "import os", "--max-new-tokens", "1", "--json"])
    assert json.loads(capsys.readouterr().out)["prompt_tokens"] == 1 + len(tokenizer.encode("import os"))


def test_generate_says_when_the_context_cut_the_completion_short(checkpoint, capsys):
    """--max-new-tokens past the context ended with finish_reason "length" and fewer tokens, without a word."""
    tokenizer, context = Tokenizer.load(checkpoint), ModelConfig.from_json(checkpoint).max_position_embeddings
    prompt = "x = 1\n" * next(n for n in range(1, context) if len(tokenizer.encode("x = 1\n" * n)) > context - 8)
    room = context - len(tokenizer.encode(prompt))
    main(["generate", "--model", str(checkpoint), "--prompt", prompt, "--max-new-tokens", "20", "--ignore-eos",
          "--json"])
    captured = capsys.readouterr()
    assert json.loads(captured.out)["completion_tokens"] == room
    assert captured.err == (f"longcat generate: stopped after {room} of --max-new-tokens 20: the prompt's "
                            f"{context - room} tokens and these fill the context of {context}\n")
    main(["generate", "--model", str(checkpoint), "--prompt", prompt, "--max-new-tokens", str(room), "--ignore-eos"])
    assert capsys.readouterr().err == ""  # asked for what fits: nothing to say


@pytest.mark.parametrize("command", ["generate", "chat"])
def test_sampling_flags_without_a_temperature_are_refused(command, tmp_path):
    """--top-k, --top-p and --seed changed nothing at the default temperature 0 (greedy), without a word. Refused
    before any model is read (this one does not exist)."""
    args = [command, "--model", str(tmp_path / "none"), *(["--prompt", "x"] if command == "generate" else [])]
    with pytest.raises(SystemExit, match=r"--top-k and --seed only apply when sampling: give --temperature above 0"):
        main(args + ["--top-k", "50", "--seed", "1"])
    with pytest.raises(SystemExit, match=r"--top-p only applies when sampling"):
        main(args + ["--top-p", "0.9", "--temperature", "0"])
    with pytest.raises(SystemExit, match=r"--min-p only applies when sampling"):
        main(args + ["--min-p", "0.1"])
    with pytest.raises(SystemExit, match="none") as refused:  # their off values, which scripts pass, are no change
        main(args + ["--top-k", "0", "--top-p", "1", "--min-p", "0"])
    assert "only appl" not in str(refused.value)


@pytest.fixture(scope="module")
def repeating(checkpoint, tmp_path_factory):
    """The tiny checkpoint with its LM head made 0.3 x its embedding: its greedy reply repeats one token (the
    penalties have something to act on), and a low temperature gives a peaked distribution (min-p something to cut)."""
    from safetensors.torch import load_file, save_file

    out = tmp_path_factory.mktemp("repeating")
    for f in checkpoint.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    tensors = load_file(checkpoint / "model.safetensors")
    tensors["lm_head.weight"] = 0.3 * tensors["model.embed_tokens.weight"]
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


@pytest.mark.parametrize("flags, params", [
    (["--repetition-penalty", "5"], {"repetition_penalty": 5.0}),
    (["--presence-penalty", "2", "--frequency-penalty", "1"], {"presence_penalty": 2.0, "frequency_penalty": 1.0}),
    (["--temperature", "0.1", "--seed", "3", "--min-p", "0.3"], {"temperature": 0.1, "seed": 3, "min_p": 0.3}),
])
def test_generate_and_chat_take_the_servers_logit_controls(repeating, capsys, monkeypatch, flags, params):
    """The penalties and min-p the server takes had no flags: a reply that loops on one token could not be steered
    off it from the command line. Each reaches the request: the completion is the engine's for those settings, and
    not the one without them (greedy too for the penalties, as in vLLM)."""
    from longcat_flash.infer.sampling import SamplingParams
    from longcat_flash.serve.local import generate_text, load_session

    main(["generate", "--model", str(repeating), "--prompt", "a a a a", "--max-new-tokens", "12", "--ignore-eos",
          "--json", *flags])
    text = json.loads(capsys.readouterr().out)["text"]
    engine, tokenizer = load_session(repeating)
    sampling = {"temperature": params.get("temperature", 0.0), "seed": params.get("seed")}
    with_them, without = (generate_text(engine, tokenizer, tokenizer.encode("a a a a"), SamplingParams(
        max_new_tokens=12, ignore_eos=True, **{**sampling, **controls})).text for controls in (params, {}))
    assert text == with_them != without
    requests = []
    add_request = Engine.add_request
    monkeypatch.setattr(Engine, "add_request", lambda self, prompt, params: requests.append(params) or
                        add_request(self, prompt, params))
    chat(repeating, ["hi", "/exit"], monkeypatch, capsys, *flags)
    assert all(getattr(requests[0], name) == value for name, value in params.items())


def test_generate_reads_the_prompt_from_a_file_or_stdin_as_it_is(checkpoint, capsys, monkeypatch, tmp_path):
    """The final newline of code to complete is part of the prompt (`--prompt "$(cat FILE)"` drops it)."""
    text = "def f(x):\n    return x\n\n"
    (tmp_path / "prompt.py").write_bytes(text.encode())
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    args = ["generate", "--model", str(checkpoint), "--max-new-tokens", "3", "--ignore-eos", "--json"]

    def generated(*flags: str) -> tuple:
        main(args + list(flags))
        record = json.loads(capsys.readouterr().out)
        return record["prompt"], record["prompt_tokens"], record["text"]

    given = generated("--prompt", text)
    assert given[0] == text and given[1] == len(Tokenizer.load(checkpoint).encode(text))
    assert generated("--prompt-file", str(tmp_path / "prompt.py")) == given
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(text.encode())))
    assert generated("--prompt-file", "-") == given
    for name, message in (("missing.txt", "No such file or directory"), ("latin1.txt", "not UTF-8 text (byte 3")):
        with pytest.raises(SystemExit) as refused:
            main(args + ["--prompt-file", str(tmp_path / name)])
        assert str(refused.value.code).startswith(f"longcat generate: --prompt-file {tmp_path / name}: {message}")
    with pytest.raises(SystemExit) as both:
        main(args + ["--prompt", "x", "--prompt-file", str(tmp_path / "prompt.py")])
    assert both.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


def test_a_prompt_that_cannot_fit_the_context_is_refused_before_it_is_encoded(checkpoint, capsys, tmp_path):
    """A 20 MB --prompt-file took 47 s and 7.8 GB to encode before the context refused it. A prompt that fills the
    context exactly is still scored (--max-new-tokens 0), as the engine allows."""
    tokenizer = Tokenizer.load(checkpoint)
    context = ModelConfig.from_json(checkpoint).max_position_embeddings
    longest = max((tokenizer.decode([i]) for i in range(tokenizer.vocab_size)), key=len)  # as many chars as a
    assert len(longest) == tokenizer.max_token_chars  # token can hold: `context` of them fill the context exactly
    (tmp_path / "full.txt").write_text(longest * context)
    assert len(tokenizer.encode(longest * context)) == context
    args = ["generate", "--model", str(checkpoint), "--prompt-file", str(tmp_path / "full.txt"), "--json"]
    main([*args, "--max-new-tokens", "0"])
    assert json.loads(capsys.readouterr().out)["prompt_tokens"] == context
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Tokenizer, "encode", lambda *a, **k: pytest.fail("the prompt was encoded"))
        with pytest.raises(SystemExit) as refused:
            main(args)
    assert str(refused.value.code) == (f"longcat generate: the prompt's {context * len(longest)} characters cannot "
                                       f"fit the context of {context} tokens with one to spare (a token holds at "
                                       f"most {len(longest)} characters)")


def chat(model, lines: list[str], monkeypatch, capsys, *flags: str) -> str:
    """`longcat chat` with `lines` typed in, one per prompt; what it printed."""
    typed = iter(lines)
    monkeypatch.setattr(builtins, "input", lambda prompt="": next(typed))
    main(["chat", "--model", str(model), *flags])
    return capsys.readouterr().out


def test_chat_keeps_the_conversation(checkpoint, capsys, monkeypatch):
    """Each turn's prompt holds the turns before it; /reset drops them (and says so)."""
    prompts = []
    add_request = Engine.add_request
    monkeypatch.setattr(Engine, "add_request", lambda self, prompt, *args: prompts.append(prompt) or
                        add_request(self, prompt, *args))
    out = chat(checkpoint, ["hello", "what next", "/reset", "/rest", "again", "/exit"], monkeypatch, capsys,
               "--max-new-tokens", "5", "--ignore-eos")
    assert out.count("assistant> ") == 3 and "[conversation reset]" in out
    assert "[unknown command /rest: each line is one message; /reset starts over, /exit (or /quit) ends]" in out
    first, second, after_reset = (Tokenizer.load(checkpoint).decode(p) for p in prompts)
    assert "hello" in first and "hello" in second and "what next" in second
    assert "again" in after_reset and "hello" not in after_reset and "what next" not in after_reset


def test_a_reply_cannot_drive_the_terminal_and_ctrl_d_ends_the_line(checkpoint, capsys, monkeypatch):
    """A reply's ANSI escape turned the terminal red for the rest of the session; Ctrl-D at the prompt left the
    shell's prompt on the line of `you> `."""
    from longcat_flash.serve import local

    real = local.generate_text

    def replying_with_escapes(engine, tokenizer, prompt, params, stop=None, on_text=None, interrupt=None):
        on_text("\x1b[31mred\x07\tand\n")  # what a model can write: its tokens are bytes
        return real(engine, tokenizer, prompt, params, stop, on_text, interrupt)

    monkeypatch.setattr(local, "generate_text", replying_with_escapes)
    typed = iter(["hi"])

    def typing(prompt: str = "") -> str:
        try:
            return next(typed)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr(builtins, "input", typing)
    main(["chat", "--model", str(checkpoint), "--max-new-tokens", "2"])
    out = capsys.readouterr().out
    assert "assistant> \\x1b[31mred\\x07\tand\n" in out and "\x1b" not in out and "\x07" not in out
    assert out.endswith("\n")


@pytest.mark.parametrize("flags, says", [
    (["--max-new-tokens", "-1"], "argument --max-new-tokens: must be >= 0, got -1"),
    (["--temperature", "-1"], "argument --temperature: must be >= 0, got -1"),
    (["--temperature", "150"], "argument --temperature: must be in [0, 100], got 150"),
    (["--temperature", "1", "--top-p", "0"], "argument --top-p: must be > 0, got 0"),
    (["--temperature", "1", "--top-p", "1.5"], "argument --top-p: must be in (0, 1], got 1.5"),
    (["--temperature", "1", "--top-k", "-5"], "argument --top-k: must be >= 0, got -5"),
    (["--presence-penalty", "2.5"], "argument --presence-penalty: must be in [-2, 2], got 2.5"),
    (["--frequency-penalty", "-3"], "argument --frequency-penalty: must be >= -2, got -3"),
    (["--repetition-penalty", "0"], "argument --repetition-penalty: must be > 0, got 0"),
    (["--temperature", "1", "--min-p", "1.5"], "argument --min-p: must be in [0, 1], got 1.5"),
])
def test_a_sampling_flag_out_of_range_is_named_as_typed(checkpoint, capsys, flags, says):
    """They were named as SamplingParams' fields (`top_p must be in (0, 1]`), not as the flags the user typed."""
    with pytest.raises(SystemExit) as refused:
        main(["generate", "--model", str(checkpoint), "--prompt", "hi", *flags])
    assert refused.value.code == 2 and says in capsys.readouterr().err


def test_an_empty_system_message_is_rendered_as_the_template_renders_it(checkpoint, capsys, monkeypatch):
    """`--system ""` was dropped, as if not given; transformers' template renders an empty system turn."""
    prompts = []
    add_request = Engine.add_request
    monkeypatch.setattr(Engine, "add_request", lambda self, prompt, *args: prompts.append(prompt) or
                        add_request(self, prompt, *args))
    chat(checkpoint, ["hi", "/reset", "hi", "/exit"], monkeypatch, capsys, "--system", "", "--max-new-tokens", "2")
    tokenizer = Tokenizer.load(checkpoint)
    rendered = tokenizer.apply_chat_template([{"role": "system", "content": ""}, {"role": "user", "content": "hi"}])
    assert rendered != tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    assert [tokenizer.decode(p, skip_special_tokens=False) for p in prompts] == [rendered, rendered]


def test_an_undecodable_line_is_refused_and_the_conversation_goes_on(checkpoint, capsys, monkeypatch):
    """Python hands an undecodable stdin byte over as a lone surrogate; the tokenizer raised a TypeError on it."""
    out = chat(checkpoint, ["hello", "bad \udcff byte", "again", "/exit"], monkeypatch, capsys,
               "--max-new-tokens", "3", "--ignore-eos")
    assert "not valid UTF-8" in out and out.count("assistant> ") == 2
    with pytest.raises(SystemExit, match=r"^longcat generate: --prompt: the text is not valid UTF-8"):
        main(["generate", "--model", str(checkpoint), "--prompt", "bad \udcff byte"])
    with pytest.raises(SystemExit, match=r"^longcat chat: --system: the text is not valid UTF-8: '\\udcff' at "
                                         "character 0"):
        main(["chat", "--model", str(checkpoint), "--system", "\udcff"])  # not its place in the rendered prompt


def test_a_stray_byte_on_a_strict_stdin_is_refused_and_the_chat_goes_on(checkpoint):
    """In a locale whose stdin decodes strictly (en_US.UTF-8; C.UTF-8 escapes), input() raised on the byte and the
    chat ended, the lines before it unanswered."""
    import os
    import subprocess

    done = subprocess.run([sys.executable, "-m", "longcat_flash.cli", "chat", "--model", str(checkpoint),
                           "--max-new-tokens", "2", "--ignore-eos"], input=b"hello\na\xffb\nhi\n",
                          capture_output=True, timeout=300, env={**os.environ, "PYTHONIOENCODING": "utf-8:strict"})
    out = done.stdout.decode()
    assert done.returncode == 0 and "not valid UTF-8" in out and out.count("assistant> ") == 2, done.stderr[-2000:]


def test_a_closed_stdin_is_an_empty_input_and_a_closed_stdout_an_error(checkpoint):
    """Started with stdin closed (`<&-`, as some service managers start jobs), chat and `--prompt-file -` ended in
    a traceback (input(): lost sys.stdin); with stdout closed, generate turned its compiled kernels off and exited
    0 having written nothing."""
    import subprocess

    def start(command: str, closed: str) -> subprocess.Popen:
        line = f"{sys.executable} -m longcat_flash.cli {command} {closed}"
        return subprocess.Popen(["bash", "-c", line], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    model = f"--model {checkpoint} --max-new-tokens 2"
    started = [start(f"chat {model}", "<&-"), start(f"generate --prompt-file - {model}", "<&-"),
               start(f"generate --prompt hi {model}", ">&-"), start("data tools --out - --n 2", ">&-")]  # at once
    try:
        outputs = [p.communicate(timeout=300) for p in started]
    finally:  # none left running after a time-out
        for p in started:
            p.kill()
    chat, piped, printed, rows = [subprocess.CompletedProcess(p.args, p.returncode, *out)
                                  for p, out in zip(started, outputs)]
    assert chat.returncode == 0 and "Traceback" not in chat.stderr, chat.stderr[-2000:]
    assert piped.returncode == 1 and piped.stderr.strip() == "longcat generate: prompt must hold at least one token"
    assert printed.returncode == 1 and printed.stderr.strip() == (
        "longcat generate: standard output is closed: nowhere to write what it prints"), printed.stderr[-2000:]
    assert rows.returncode == 1 and "standard output is closed" in rows.stderr, rows.stderr[-2000:]


def test_ctrl_c_stops_a_reply_and_the_conversation_goes_on(checkpoint, capsys, monkeypatch):
    """Ctrl-C during a reply ended the whole chat (KeyboardInterrupt out of an engine step), losing the
    conversation: now it stops the reply between two steps, and the partial reply stays in the conversation."""
    import os
    import signal

    prompts, steps, before = [], [], signal.getsignal(signal.SIGINT)  # SIG_IGN under `nohup ... &`
    add_request, step = Engine.add_request, Engine.step
    monkeypatch.setattr(Engine, "add_request", lambda self, prompt, *args: prompts.append(prompt) or
                        add_request(self, prompt, *args))

    def step_then_ctrl_c(self):  # the user presses Ctrl-C while the third step of the first reply runs
        steps.append(1)
        if len(steps) == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return step(self)

    monkeypatch.setattr(Engine, "step", step_then_ctrl_c)
    out = chat(checkpoint, ["hello", "again", "/exit"], monkeypatch, capsys, "--max-new-tokens", "20", "--ignore-eos")
    assert out.count("assistant> ") == 2 and out.count(" [stopped]") == 1
    tokenizer = Tokenizer.load(checkpoint)
    first_reply = out.split("assistant> ")[1].split(" [stopped]")[0]
    assert first_reply and first_reply in tokenizer.decode(prompts[1])  # kept in the conversation
    assert signal.getsignal(signal.SIGINT) is before  # Ctrl-C at the prompt does what it did before the chat


def test_a_line_or_system_message_the_chat_cannot_take_is_one_line(checkpoint, tmp_path, capsys, monkeypatch):
    """A line the chat template refuses (it rewrites text into a special token's) ended the chat; a --system
    message longer than the context left every line refused, /reset included (it keeps the system message)."""
    import shutil

    rewriting = shutil.copytree(checkpoint, tmp_path / "rewriting")
    config = json.loads((rewriting / "tokenizer_config.json").read_text())
    config["chat_template"] = config["chat_template"].replace(
        "{{- text(message['content']) -}}", "{{- text(message['content']) | replace('<', '&lt;') -}}", 1)
    assert "&lt;" in config["chat_template"]
    (rewriting / "tokenizer_config.json").write_text(json.dumps(config))
    out = chat(rewriting, ["hi", "what about </s> tags", "ok", "/exit"], monkeypatch, capsys, "--max-new-tokens", "3",
               "--ignore-eos")
    assert "; type it again]" in out and out.count("assistant> ") == 2
    with pytest.raises(SystemExit, match="--system: the system message alone does not fit the model's context"):
        main(["chat", "--model", str(checkpoint), "--system", "x " * 2000])


def test_a_chat_line_that_cannot_fit_the_context_is_refused_before_it_is_encoded(checkpoint, capsys, monkeypatch):
    """Like a --prompt-file: a pasted megabyte was encoded (seconds, GBs) before the context refused it."""
    tokenizer = Tokenizer.load(checkpoint)
    huge = "x" * (ModelConfig.from_json(checkpoint).max_position_embeddings * tokenizer.max_token_chars)
    render = Tokenizer.render_chat
    monkeypatch.setattr(Tokenizer, "render_chat", lambda self, messages, *args, **kwargs: pytest.fail("encoded")
                        if any(m["content"] == huge for m in messages) else render(self, messages, *args, **kwargs))
    out = chat(checkpoint, [huge, "hi", "/exit"], monkeypatch, capsys, "--max-new-tokens", "2", "--ignore-eos")
    assert "[that message does not fit the context" in out and out.count("assistant> ") == 1
    with pytest.raises(SystemExit, match="--system: the system message alone does not fit the model's context"):
        main(["chat", "--model", str(checkpoint), "--system", huge])


def test_a_reply_the_context_cuts_says_so(checkpoint, capsys, monkeypatch, tmp_path):
    """`generate` says when the context cut its output; the chat printed the cut reply as a finished answer."""
    import shutil

    short = shutil.copytree(checkpoint, tmp_path / "short")
    config = json.loads((short / "config.json").read_text())
    (short / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 48}))
    from longcat_flash.serve.local import _chat_prompt

    room = 48 - len(_chat_prompt(Tokenizer.load(short), [{"role": "user", "content": "hi"}]))
    for limit in (200, room):  # asked for more than the room, or exactly the room: the reply fills the context
        out = chat(short, ["hi", "/exit"], monkeypatch, capsys, "--max-new-tokens", str(limit), "--ignore-eos")
        assert out.count("assistant> ") == 1 and "[cut: the conversation now fills the context; /reset to start " \
            "over]" in out, limit
    out = chat(checkpoint, ["hi", "/exit"], monkeypatch, capsys, "--max-new-tokens", "3", "--ignore-eos")
    assert "[cut" not in out  # --max-new-tokens itself ended it


def test_chat_refuses_replies_of_no_tokens(checkpoint):
    """generate scores a prompt with --max-new-tokens 0; chat printed an empty reply to every line."""
    with pytest.raises(SystemExit, match="--max-new-tokens must be at least 1 for chat, got 0"):
        main(["chat", "--model", str(checkpoint), "--max-new-tokens", "0"])


def test_generate_rejects_a_prompt_beyond_the_context(checkpoint):
    with pytest.raises(SystemExit, match="context"):
        main(["generate", "--model", str(checkpoint), "--prompt", "x " * 2000])


@pytest.mark.parametrize("flags, message", [(["--speculative", "1"], "needs a model with an MTP head"),
                                            (["--speculative", "100000"], "at most 16 MTP drafts per step"),
                                            (["--stop", ""], "--stop: an empty string"),
                                            (["--stop", "\udcff"], "--stop: the text is not valid UTF-8")])
def test_bad_engine_flags_are_refused_before_the_model_is_loaded(flags, message, tmp_path, monkeypatch):
    """Loading (and quantizing) a large model takes minutes: a flag that cannot work is refused first."""
    import torch

    from longcat_flash.checkpoint.fresh import init_checkpoint
    from longcat_flash.infer import loader
    from longcat_flash.presets import tiny

    no_mtp = init_checkpoint(tiny().replace(num_nextn_predict_layers=0), tmp_path / "no_mtp", dtype=torch.float32)

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(loader, "load_for_inference", never)
    with pytest.raises(SystemExit, match=message):
        main(["generate", "--model", str(no_mtp), "--prompt", "x", "--quantize", "int4", *flags])


@pytest.mark.parametrize("quantize", [None, "int8", "int4", "fp8"])
def test_a_verify_step_past_the_row_exact_kernels_is_refused(checkpoint, monkeypatch, quantize):
    """`--speculative 16` verifies 17 rows, past the kernels' 16: the tokens left plain greedy's (a probe: 1 of 3
    prompts with int8), where the docs promise them exact for one sequence. So did 9 rows and more in bf16 on an AMX
    CPU (the tile GEMM for quantized weights, oneDNN's for plain ones), unquantized too (a probe: 4 of 5 prompts)."""
    from longcat_flash.infer import loader

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(loader, "load_for_inference", never)
    args = ["generate", "--model", str(checkpoint), "--prompt", "x", "--device", "cpu",
            *(["--quantize", quantize] if quantize else [])]
    with pytest.raises(SystemExit, match="verifies 9 rows a step; past 8 rows on the CPU .* use at most 7 drafts"):
        main([*args, "--speculative", "8"])
    with pytest.raises(AssertionError, match="the model was loaded"):  # 7 drafts, 8 rows: within every kernel
        main([*args, "--speculative", "7"])


@pytest.mark.parametrize("command", ["generate", "chat", "explain"])
def test_a_model_path_that_is_not_a_model_directory_is_one_line(command, checkpoint, tmp_path, monkeypatch):
    """A file given as --model, a broken tokenizer.json or tokenizer_config.json, a training step's directory and
    an empty --model were tracebacks from the tokenizers library or misleading ("tokenizer file not found")."""
    import shutil

    monkeypatch.setattr(builtins, "input", lambda prompt="": (_ for _ in ()).throw(EOFError))
    broken = {}
    for name in ("tokenizer.json", "tokenizer_config.json"):
        broken[name] = shutil.copytree(checkpoint, tmp_path / name.replace(".", "_"))
        (broken[name] / name).write_text("{bad")
    step = tmp_path / "run" / "checkpoints" / "step_00000010"
    step.mkdir(parents=True)
    (step / "manifest.json").write_text("{}")
    grown, tuning = tmp_path / "grown run", tmp_path / "tuning"  # no model yet: grown, an SFT run killed early
    for run, recorded in ((grown, {}), (tuning, {"sft": {"data": "chat.jsonl"}})):
        (run / "checkpoints").mkdir(parents=True)
        (run / "train_config.json").write_text(json.dumps(recorded))
    extra = {"generate": ["--prompt", "x"], "chat": [], "explain": ["--text", "x", "--out", str(tmp_path / "o")]}
    for model, message in [(checkpoint / "config.json", "is a file; a model is a directory"),
                           (checkpoint / "model.safetensors", "is a file; a model is a directory"),
                           (broken["tokenizer.json"], "tokenizer.json: not a tokenizer.json"),
                           (broken["tokenizer_config.json"], "tokenizer_config.json: not valid JSON"),
                           (step, "is a training checkpoint"), ("", "no model directory given"),
                           (step.parent, "is not a model directory: it has no config.json"),
                           (grown, f"is a training run with no model yet: .* `longcat train --resume '{grown}'`"),
                           (tuning, f"`longcat sft --resume {tuning}`")]:
        with pytest.raises(SystemExit, match=message):
            main([command, "--model", str(model), *extra[command]])


def test_a_tokenizer_with_ids_past_the_models_vocabulary_is_refused_at_load(checkpoint, tmp_path):
    """generate ran while a prompt kept below the model's vocab_size and failed on the first that did not; serve
    refused with llguidance's "vocab size too small; 300 vs 450"."""
    import shutil

    import tokenizers

    model = shutil.copytree(checkpoint, tmp_path / "bigger")
    extra = ModelConfig.from_json(model).vocab_size - Tokenizer.load(model).vocab_size + 3
    backend = tokenizers.Tokenizer.from_file(str(model / "tokenizer.json"))
    backend.add_tokens([f"<extra_{i}>" for i in range(extra)])
    backend.save(str(model / "tokenizer.json"))
    with pytest.raises(SystemExit, match=r"has \d+ ids \(added tokens included\), but the model's vocab_size is "
                                         r"\d+: ids from \d+ \('<extra_\d+>', \.\.\.\) have no embedding"):
        main(["generate", "--model", str(model), "--prompt", "x"])


def test_the_tokenizers_eos_ends_generation_besides_config_json(checkpoint, tmp_path):
    """A chat model's end of turn (`<|im_end|>`) is often only the tokenizer's eos_token; vLLM stops there, and
    our chat template ends each assistant turn with it, but generation ran on to max_tokens."""
    import shutil

    from longcat_flash.infer.engine import EngineConfig
    from longcat_flash.infer.loader import load_engine
    from longcat_flash.infer.sampling import SamplingParams

    model = shutil.copytree(checkpoint, tmp_path / "eos")
    engine, tokenizer = load_engine(model, EngineConfig())
    prompt = tokenizer.encode("import os")
    free = engine.generate([prompt], SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True))[0]
    i = next(i for i, token in enumerate(free) if i and token not in free[:i] and token not in engine.eos_ids)
    settings = json.loads((model / "tokenizer_config.json").read_text())
    settings["eos_token"] = tokenizer.backend.id_to_token(free[i])
    (model / "tokenizer_config.json").write_text(json.dumps(settings))
    engine, _ = load_engine(model)  # the engine's defaults, as Engine(model) takes them (None failed inside)
    assert engine.generate([prompt], SamplingParams(max_new_tokens=8, temperature=0.0))[0] == free[:i + 1]


def test_serve_on_a_taken_port_is_one_line_before_the_model_loads(checkpoint, monkeypatch, capsys):
    """serve loaded the model (minutes for a large one), printed that it was serving, and only then failed to
    bind, with uvicorn's log line and exit status 3."""
    import socket

    pytest.importorskip("fastapi")
    from longcat_flash.serve import server

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(server, "EngineProcess", never)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(SystemExit, match=f"longcat serve: cannot listen on 127.0.0.1:{port}: Address already "
                                             "in use"):
            main(["serve", "--model", str(checkpoint), "--port", str(port)])
    assert "on http://" not in capsys.readouterr().out


def test_a_seeded_chat_samples_each_turn_anew_and_repeats_as_a_whole(checkpoint, capsys, monkeypatch):
    """With --seed every turn started the same random stream again: different questions got the same sampled
    reply. Turn k now samples with seed + k (as the server's n copies do), so the session as a whole repeats."""
    flags = ("--temperature", "1", "--seed", "7", "--max-new-tokens", "8", "--ignore-eos")
    session = chat(checkpoint, ["hi", "tell me more", "/reset", "hi", "/exit"], monkeypatch, capsys, *flags)
    replies = [part.split("\n")[0] for part in session.split("assistant> ")[1:]]
    assert len(replies) == 3 and replies[0] != replies[1]
    assert replies[2] == replies[0]  # a new conversation starts from the seed again
    assert chat(checkpoint, ["hi", "tell me more", "/reset", "hi", "/exit"], monkeypatch, capsys, *flags) == session


def test_a_chat_template_that_cannot_render_any_turn_is_refused_before_the_first_line(checkpoint, tmp_path,
                                                                                      monkeypatch):
    """A tokenizer without eos_token refused every line typed with "type it again", which could never help."""
    import shutil

    broken = shutil.copytree(checkpoint, tmp_path / "no_eos")
    config = json.loads((broken / "tokenizer_config.json").read_text())
    config["eos_token"] = None
    (broken / "tokenizer_config.json").write_text(json.dumps(config))
    monkeypatch.setattr(builtins, "input", lambda prompt="": pytest.fail("a line was read"))
    with pytest.raises(SystemExit, match=r"^longcat chat: the model's chat template cannot render a conversation: "
                                         r".*eos_token is None"):
        main(["chat", "--model", str(broken)])


def test_a_system_message_the_template_refuses_is_named_as_the_system_messages_fault(checkpoint, tmp_path):
    """A template without a system role took --system for a broken template ("cannot render a conversation")."""
    import shutil

    no_system = shutil.copytree(checkpoint, tmp_path / "no_system")
    config = json.loads((no_system / "tokenizer_config.json").read_text())
    config["chat_template"] = ("{%- for m in messages %}{%- if m['role'] == 'system' %}"
                               "{{ raise_exception('System role not supported') }}{%- endif %}{%- endfor %}"
                               + config["chat_template"])
    (no_system / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(SystemExit, match=r"^longcat chat: --system: .*System role not supported"):
        main(["chat", "--model", str(no_system), "--system", "be brief"])
