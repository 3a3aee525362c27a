"""The engine in a child process (serve/engine_process.py), as `longcat serve` runs it: the same tokens as the engine
in this process, grammars that cross the pipe, the child's own load errors, and a child that dies mid-request."""
from __future__ import annotations

import asyncio
import json
import os
import signal

import pytest
import torch

from longcat_flash.checkpoint.fresh import init_checkpoint
from longcat_flash.infer.engine import Engine, EngineConfig, PromptRefused
from longcat_flash.infer.loader import load_for_inference
from longcat_flash.infer.sampling import SamplingParams
from longcat_flash.presets import tiny
from longcat_flash.serve.bridge import EngineFailed
from longcat_flash.serve.engine_process import EngineProcess
from longcat_flash.tokenizer import Tokenizer

pytest.importorskip("llguidance")
from longcat_flash.infer.grammar import GrammarCompiler  # noqa: E402

pytestmark = pytest.mark.slow
CONFIG = EngineConfig(max_running=8, cache_tokens=4096)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return init_checkpoint(tiny(), tmp_path_factory.mktemp("ckpt") / "tiny", dtype=torch.float32)


@pytest.fixture(scope="module")
def bridge(model_dir):
    bridge = EngineProcess(model_dir, device="cpu", config=CONFIG)
    yield bridge
    bridge.stop()


async def collect(bridge, prompt: list[int], params: list[SamplingParams]) -> list[list[int]]:
    """Every copy's generated ids, read from the bridge's queues until each finishes."""
    [copies] = await bridge.submit([(prompt, params)])
    out = []
    for _, outputs in copies:
        ids = []
        while True:
            item = await outputs.get()
            assert not isinstance(item, EngineFailed), item.message
            ids += item.new_tokens
            if item.finished:
                break
        out.append(ids)
    return out


def test_same_tokens_as_the_engine_in_this_process(model_dir, bridge):
    tokenizer = Tokenizer.load(model_dir)
    model, _ = load_for_inference(model_dir, device="cpu")
    prompts = [tokenizer.encode(text) for text in ("def fibonacci(n):", "The capital of France is", "1, 2, 3,")]
    greedy = SamplingParams(max_new_tokens=10, temperature=0.0, ignore_eos=True)
    sampled = SamplingParams(max_new_tokens=10, temperature=1.0, seed=7, ignore_eos=True)
    expected = Engine(model, CONFIG).generate(prompts, [greedy, greedy, sampled])

    async def all_at_once():
        return await asyncio.gather(collect(bridge, prompts[0], [greedy]), collect(bridge, prompts[1], [greedy]),
                                    collect(bridge, prompts[2], [sampled]))

    got = [copies[0] for copies in asyncio.run(all_at_once())]
    assert got == expected
    assert bridge.vocab_size == model.config.vocab_size
    assert bridge.context == model.config.max_position_embeddings
    assert bridge.latest.stats.generated_tokens >= 30 and bridge.latest.running == 0


def test_a_refused_prompt_of_several_is_named_across_the_pipe(bridge):
    """The engine process refuses a request's prompts together, naming the bad one by its index (the server's 400
    names it as prompt.1), and admits none of them."""
    greedy = SamplingParams(max_new_tokens=2, temperature=0.0)
    before = bridge.latest.stats

    async def scenario():
        with pytest.raises(PromptRefused, match="token ids must be in") as refused:
            await bridge.submit([([1, 2], [greedy]), ([bridge.vocab_size], [greedy])])
        return refused.value.index

    assert asyncio.run(scenario()) == 1
    assert (bridge.latest.stats.prompt_tokens, bridge.latest.stats.cancelled) == (before.prompt_tokens,
                                                                                  before.cancelled)


def test_a_grammar_crosses_the_pipe(model_dir, bridge):
    """The child compiles the grammar again from its text: random weights still write JSON the schema admits."""
    tokenizer = Tokenizer.load(model_dir)
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    grammar = GrammarCompiler(tokenizer, bridge.vocab_size).json_schema(schema)
    params = SamplingParams(max_new_tokens=40, temperature=1.0, seed=3, grammar=grammar)
    (ids,) = asyncio.run(collect(bridge, tokenizer.encode("answer:"), [params]))
    assert set(json.loads(tokenizer.decode(ids))) == {"ok"}


def test_a_slow_grammar_does_not_hold_the_requests_after_it(model_dir, bridge):
    """The child compiled each grammar on the thread that takes every new request and cancel: a schema that took
    seconds held all of them as long (a 4-token completion waited 5.4 s behind one)."""
    import time

    from longcat_flash.infer.grammar import Grammar, json_part

    tokenizer = Tokenizer.load(model_dir)
    # ~0.9 s to compile here (300 patterns took 4.4 s, past the 10 s limit on a loaded 2-core host)
    schema = {"type": "object", "patternProperties": {f"^p{i}[a-z]+$": {"type": "integer"} for i in range(200)}}
    slow = Grammar(f"start: {json_part(schema)}\n", None)  # the text is what crosses: the child compiles it
    ended: dict[str, float] = {}

    async def timed(name: str, params: SamplingParams) -> None:
        await collect(bridge, tokenizer.encode("x"), [params])
        ended[name] = time.monotonic()

    async def both() -> None:
        constrained = asyncio.create_task(timed("slow", SamplingParams(max_new_tokens=2, grammar=slow)))
        await asyncio.sleep(0.05)  # its add reaches the child first
        await timed("plain", SamplingParams(max_new_tokens=2))
        await constrained
    asyncio.run(both())
    assert ended["plain"] < ended["slow"]


def test_a_refused_submission_raises_the_engines_error(model_dir, bridge):
    too_long = list(range(5)) * 10_000
    with pytest.raises(ValueError, match="context|tokens"):
        asyncio.run(collect(bridge, too_long, [SamplingParams(max_new_tokens=1)]))


def test_a_bad_checkpoint_raises_the_childs_error(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises((FileNotFoundError, ValueError, KeyError)):
        EngineProcess(tmp_path, device="cpu")


def test_a_dead_engine_fails_open_and_new_requests(model_dir):
    bridge = EngineProcess(model_dir, device="cpu", config=CONFIG)
    long = SamplingParams(max_new_tokens=100_000 // 100, temperature=0.0, ignore_eos=True)

    async def scenario():
        [[(_, outputs)]] = await bridge.submit([([1, 2, 3], [long])])
        await outputs.get()  # it runs
        os.kill(bridge.process.pid, signal.SIGKILL)
        while not isinstance(item := await outputs.get(), EngineFailed):
            assert not item.finished
        with pytest.raises(RuntimeError, match="not running"):
            await bridge.submit([([1, 2, 3], [long])])

    asyncio.run(scenario())
    assert not bridge.alive
    bridge.stop()


async def both_cancelled(bridge, before: int) -> None:
    """Wait (5 s at most) until the engine has cancelled two more requests than `before` and runs none."""
    for _ in range(500):
        await asyncio.sleep(0.01)
        if bridge.latest.stats.cancelled - before == 2 and bridge.latest.running == 0:
            break
    assert bridge.latest.stats.cancelled - before == 2 and bridge.latest.running == 0


def test_a_handler_that_leaves_before_its_ids_arrive_leaves_nothing_running(bridge):
    """A client gone while its submission is on the way: the engine's reply finds no reader, so the bridge cancels
    those requests itself, and keeps serving."""
    params = SamplingParams(max_new_tokens=500, temperature=0.0, ignore_eos=True)

    async def scenario():
        before = bridge.latest.stats.cancelled
        task = asyncio.create_task(bridge.submit([([5, 6, 7], [params, params])]))
        await asyncio.sleep(0)  # the "add" is posted; the engine's answer is milliseconds away
        task.cancel()
        await both_cancelled(bridge, before)
        return await collect(bridge, [5, 6, 7], [SamplingParams(max_new_tokens=3, ignore_eos=True)])

    assert len(asyncio.run(scenario())[0]) == 3


def test_a_handler_that_leaves_as_its_ids_arrive_leaves_nothing_running(bridge):
    """The same when the engine's answer settles the submission before the handler's cancel reaches it (the
    receiving thread ran in between: under load, now and then): the requests had streams but no reader, nobody
    ended them, and they ran to max_new_tokens."""
    import time

    params = SamplingParams(max_new_tokens=500, temperature=0.0, ignore_eos=True)

    async def scenario():
        before, known = bridge.latest.stats.cancelled, set(bridge._streams)
        task = asyncio.create_task(bridge.submit([([5, 6, 7], [params, params])]))
        await asyncio.sleep(0)  # the "add" is posted
        deadline = time.monotonic() + 30
        while set(bridge._streams) == known and time.monotonic() < deadline:  # the event loop held (no await):
            time.sleep(0.001)  # the answer arrives, its streams are registered and its future settled, unread
        time.sleep(0.05)
        task.cancel()
        await both_cancelled(bridge, before)
        assert set(bridge._streams) == known

    asyncio.run(scenario())


def test_a_submission_learns_its_ids_before_the_engine_steps(model_dir):
    """The engine loop answered a submission with its request ids only after the step that followed it (a prefill:
    seconds under load), so a client that left meanwhile was cancelled a step later still, its pages held."""
    import threading

    from longcat_flash.serve.bridge import AsyncEngine

    model, _ = load_for_inference(model_dir, device="cpu")
    engine, gate = Engine(model, CONFIG), threading.Event()
    step = engine.step
    engine.step = lambda: gate.wait(30) and step()  # the step stays in flight until the ids have arrived
    bridge = AsyncEngine(engine).start()
    try:
        async def scenario():
            return await asyncio.wait_for(bridge.submit([([5, 6, 7], [SamplingParams(max_new_tokens=2)])]), 10)
        [[(request_id, _)]] = asyncio.run(scenario())
        assert request_id in engine.requests
    finally:
        gate.set()
        bridge.stop()


def test_an_engine_reply_after_the_server_failed_everything_is_dropped():
    """On shutdown the server fails every open request (fail_all) while the engine process still runs: a reply to
    a submission it had failed raised KeyError on the reader thread, which died, leaving the child blocked on a
    full pipe until it was killed."""
    from longcat_flash.serve.bridge import Batch, Bridge

    class Recorded(Bridge):
        def __init__(self) -> None:
            super().__init__()
            self.posted = []

        def _post(self, message: tuple) -> None:
            self.posted.append(message)

    async def main() -> None:
        bridge = Recorded()
        submission = asyncio.create_task(bridge.submit([([1, 2], [SamplingParams()])]))
        await asyncio.sleep(0)  # posted, its reply not yet come
        [(kind, token, *_)] = bridge.posted
        bridge.fail_all("the server stops")
        with pytest.raises(RuntimeError, match="the server stops"):
            await submission
        bridge.receive(Batch([(token, [[7]])], [], bridge.latest))  # the engine's late reply
        with pytest.raises(RuntimeError, match="not running"):
            await bridge.submit([([1], [SamplingParams()])])

    asyncio.run(main())


class KilledOnArrival:
    """Unpickled in the engine process (as its EngineConfig), it kills that process the way the kernel's
    out-of-memory killer does, while it loads."""

    def __reduce__(self):
        return signal.raise_signal, (signal.SIGKILL,)


def test_an_engine_process_killed_while_loading_is_one_error_saying_how():
    """It was a RuntimeError, which the CLI printed as a traceback ending in "(exit code -9)"."""
    with pytest.raises(ChildProcessError, match=r"exited while loading the model \(killed by signal 9 \(SIGKILL: "
                                                r"most often the system out of memory\)\)"):
        EngineProcess("unused", config=KilledOnArrival())
