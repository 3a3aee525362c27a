"""The engine in a child process, as `longcat serve` runs it: the HTTP side and the engine never share a GIL.

With the engine on a thread of the server's process, every token's HTTP work (detokenizing, JSON, socket writes)
took the GIL from the engine between its tensor ops: measured on 32 streams, the engine's steps ran about 20%
slower than the same engine alone (30 vs 25 ms; docs/serving.md §5). vLLM (EngineCore) and SGLang (the scheduler
process) split their servers the same way. The child loads the checkpoint, builds the Engine and runs the
bridge's EngineLoop; one pipe carries "add" / "cancel" messages in and a Batch per step out. Grammars cross as
their Lark text and are compiled again (and cached) on the engine's side, beside the inbox thread (a slow one held
every later message there). If the child dies, every open request
fails and /health turns 503.
"""
from __future__ import annotations

import multiprocessing as mp
import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from ..infer.engine import EngineConfig
from ..infer.grammar import GrammarCompiler, GrammarError
from ..infer.loader import load_engine
from ..runtime import tune_cpu_allocator
from .bridge import Bridge, EngineLoop


class EngineProcess(Bridge):
    """Load `model_dir` in a child process and bridge to its engine; returns once the model is loaded, raising
    the child's own error if loading failed."""

    def __init__(self, model_dir: str | Path, *, dtype: str | None = None, quantize: str | None = None,
                 device: str = "auto", config: EngineConfig | None = None) -> None:
        super().__init__()
        ctx = mp.get_context("spawn")  # a fresh interpreter: no forked threads, CUDA allowed
        self._conn, child_end = ctx.Pipe()
        self.process = ctx.Process(target=_engine_main, name="longcat-engine", daemon=True,
                                    args=(str(model_dir), dtype, quantize, device, config, child_end))
        self.process.start()
        child_end.close()
        try:
            kind, *info = self._conn.recv()
        except EOFError:  # an OSError kind: one line from the CLI, not a traceback
            self.process.join()
            raise ChildProcessError(f"the engine process exited while loading the model ({self.exit_words()})") \
                from None
        if kind == "failed":
            self.process.join()
            raise info[0]
        self.vocab_size, self.context, self.max_queued, self.max_running = info
        self._send_lock = threading.Lock()
        threading.Thread(target=self._read, name="longcat-engine-reader", daemon=True).start()

    def exit_words(self) -> str:
        """How the ended engine process ended: its exit code, or the signal that killed it."""
        code = self.process.exitcode
        if code is None or code >= 0:
            return f"exit code {code}"
        return f"killed by signal {-code}" + (" (SIGKILL: most often the system out of memory)" if code == -9 else "")

    def _post(self, message: tuple) -> None:
        if message[0] == "add":
            kind, token, jobs = message
            message = (kind, token, [(prompt, [(replace(sp, grammar=None), sp.grammar and sp.grammar.lark)
                                               for sp in params]) for prompt, params in jobs])
        try:
            with self._send_lock:
                self._conn.send(message)
        except (OSError, ValueError):  # the pipe is closed: the reader thread is failing every request
            pass

    def _read(self) -> None:
        try:
            while True:
                self.receive(self._conn.recv())
        except (EOFError, OSError):
            pass
        finally:
            self.fail_all("the engine process exited")

    def stop(self) -> None:
        self._post(("stop",))
        self.process.join(timeout=10)
        if self.process.is_alive():  # a step that takes longer: it ignores SIGTERM
            self.process.kill()
            self.process.join()


def _engine_main(model_dir: str, dtype: str | None, quantize: str | None, device: str,
                 config: EngineConfig | None, conn: Connection) -> None:
    """The child: load, report ("ready", vocab, context, max_queued, max_running) or ("failed", error), then run
    the loop until told to stop or the parent is gone."""
    for stop in (signal.SIGINT, signal.SIGTERM):  # Ctrl-C, or a SIGTERM to the group (systemd, `kill -- -PID`),
        signal.signal(stop, signal.SIG_IGN)  # reaches this process too: the parent decides, after its grace
    tune_cpu_allocator()  # a step's activations are bounded by the token budget: keeping them is cheap
    try:
        engine, tokenizer = load_engine(model_dir, config or EngineConfig(), dtype=dtype, quantize=quantize,
                                        device=device)
        grammars = GrammarCompiler(tokenizer, engine.vocab_size)
    except Exception as err:  # the parent raises it: a bad checkpoint is the user's error, not a traceback here
        try:
            conn.send(("failed", err))
        except Exception:  # an error that does not pickle
            conn.send(("failed", RuntimeError(f"{type(err).__name__}: {err}")))
        return
    conn.send(("ready", engine.vocab_size, engine.max_context, engine.max_queued, engine.config.max_running))

    def send(batch: Any) -> None:
        try:
            conn.send(batch)
        except (OSError, ValueError):  # the parent is gone (killed, or exited mid-stream): nothing left to serve
            loop.stop()

    loop = EngineLoop(engine, send)

    def compiled(message: tuple) -> tuple:
        """An "add" with its grammars compiled from their text, or the refusal that answers it."""
        kind, token, jobs = message
        try:
            return kind, token, [(prompt, [replace(sp, grammar=grammars.compile(lark)) if lark else sp
                                           for sp, lark in params]) for prompt, params in jobs]
        except Exception as err:  # compiled once already, by the parent: a time-out, mostly; any answers the add
            return "refuse", token, err if isinstance(err, GrammarError) else GrammarError(f"{type(err).__name__}: "
                                                                                          f"{err}")

    # Grammars compile beside the inbox, not on it: a slow one held every later add and cancel for its seconds.
    # Cancels name engine ids, which an add gets only once posted, so none can overtake its add.
    compiling = ThreadPoolExecutor(max_workers=2, thread_name_prefix="longcat-engine-grammar")

    def receive() -> None:
        try:
            while (message := conn.recv())[0] != "stop":
                if message[0] == "add" and any(lark for _, params in message[2] for _, lark in params):
                    compiling.submit(lambda message=message: loop.post(compiled(message)))
                else:
                    loop.post(compiled(message) if message[0] == "add" else message)
        except (EOFError, OSError):  # the parent is gone
            pass
        finally:
            loop.stop()

    threading.Thread(target=receive, name="longcat-engine-inbox", daemon=True).start()
    loop.run()
