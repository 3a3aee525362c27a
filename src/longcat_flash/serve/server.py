"""`longcat serve`: the engine process, the listening socket and uvicorn around the app of serve/app.py, and the
shutdown a signal starts (open responses get SHUTDOWN_GRACE_S, then end as OpenAI-shaped errors)."""
from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..checkpoint.hf import model_directory
from ..device import resolve_device
from ..infer.engine import EngineConfig
from ..infer.loader import check_speculative
from ..tokenizer import Tokenizer
from .app import ServerConfig, create_app, model_defaults
from .bridge import Bridge
from .connections import CLIENT_TIMEOUT_S, listening_socket, uvicorn_options
from .engine_process import EngineProcess
from .guard import check_api_key

SHUTDOWN_GRACE_S = 5  # seconds open responses get to finish once the server is told to stop
SHUTDOWN_CUT_S = 2  # then they end as 503s; uvicorn cancels what is still open this much later


def _server(config: Any, bridge: Bridge) -> Any:
    """uvicorn's Server, except that on SIGTERM or Ctrl-C the responses still open after SHUTDOWN_GRACE_S end as
    503s in the OpenAI shape (a stream's as its last event): a stream of thousands of tokens must not hold the
    stop (an orchestrator's SIGKILL follows in ~30 s), and uvicorn alone cancels them, which a client got as a
    plain-text 500 or a cut connection and the log as a traceback per request. A second signal (Ctrl-C again,
    uvicorn's "force quit") ends them so at once; only a third forces uvicorn's own exit."""
    import uvicorn

    class Server(uvicorn.Server):
        cut = False  # the open responses were ended early, by a second signal
        engine_lost = False  # the engine process died: the server stops (status 1), as vLLM's does

        async def on_tick(self, counter: int) -> bool:
            """Also stop when the engine is gone: up, /health said 503 for ever while /v1/models said 200, so a
            supervisor (systemd's Restart=, Docker's, Kubernetes') never restarted it. A stop's own failing of
            the open requests comes after should_exit, so it never reads as a lost engine."""
            if not bridge.alive and not self.should_exit:
                self.engine_lost = self.should_exit = True
            return await super().on_tick(counter)

        def handle_exit(self, sig: int, frame: Any) -> None:
            with contextlib.suppress(RuntimeError):  # no loop yet: nothing is open
                loop = asyncio.get_running_loop()  # a signal handler runs on the main thread, the loop's
                if not self.should_exit:
                    loop.call_soon_threadsafe(loop.call_later, SHUTDOWN_GRACE_S, bridge.fail_all,
                                              "the server is shutting down")
                elif not self.cut:
                    self.cut = True
                    loop.call_soon_threadsafe(bridge.fail_all, "the server is shutting down")
                    return
            super().handle_exit(sig, frame)

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            """uvicorn raises the signal that stopped it again once serving ends, and that kills this process
            before any `finally` of ours: the engine process stops first (it outlived the server by a second or
            so, still holding the model, beside the one a supervisor had already restarted)."""
            with super().capture_signals():
                try:
                    yield
                finally:
                    bridge.stop()

    return Server(config)


def exposure_warning(host: str, api_key: str | None) -> str | None:
    """What to say when the server listens beyond this machine with no API key (None when it does not)."""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to any interface
        loopback = False
    if loopback or api_key is not None:
        return None
    return (f"listening on {host} without --api-key: anyone who can reach this port can use the model (give "
            "--api-key, or leave --host at 127.0.0.1)")


def served_name(model_dir: str | Path) -> str:
    """The model's id when --served-model-name is not given: the directory's name as the user gave it (a link
    `latest -> run-7` serves `latest`, as vLLM names a model by its --model), its real one for `.` or `..`."""
    given = Path(model_dir).expanduser()
    return given.name if given.name not in ("", ".", "..") else given.resolve().name


def serve(model_dir: str | Path, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          dtype: str | None = None, quantize: str | None = None, engine_config: EngineConfig | None = None,
          model_name: str | None = None, device: str = "auto", max_body_bytes: int = ServerConfig.max_body_bytes,
          client_timeout_s: float = CLIENT_TIMEOUT_S, max_connections: int | None = None) -> None:
    """Load a checkpoint directory (weights + tokenizer) onto `device` in an engine process and serve it until
    interrupted; connections bounded as serve/connections.py says."""
    import uvicorn

    resolve_device(device)  # a bad --device or --api-key fails here, not after the engine process has loaded
    check_api_key(api_key)
    model_dir = model_directory(model_dir)
    check_speculative(model_dir, engine_config.speculative if engine_config else 0, quantize, device)
    defaults = model_defaults(model_dir)
    tokenizer = Tokenizer.load(model_dir)
    with listening_socket(host, port) as sock:  # before the load (minutes for a large model): a taken port fails now
        bridge = EngineProcess(model_dir, dtype=dtype, quantize=quantize, device=device, config=engine_config)
        config = ServerConfig(model_name=model_name or served_name(model_dir), context=bridge.context,
                              api_key=api_key, max_body_bytes=max_body_bytes, sampling_defaults=defaults)
        try:
            url = f"http://{f'[{host}]' if ':' in host else host}:{sock.getsockname()[1]}/v1"  # port 0: the OS's
            print(f"longcat serve: {config.model_name} on {url} (OpenAI API; /health, /metrics)", flush=True)
            if warning := exposure_warning(host, api_key):
                print(f"longcat serve: {warning}", file=sys.stderr, flush=True)
            if defaults:
                print("longcat serve: requests that leave them out sample with generation_config.json's "
                      + ", ".join(f"{k}={v}" for k, v in defaults.items()), flush=True)
            server = _server(uvicorn.Config(
                create_app(bridge, tokenizer, config), log_level="warning",
                timeout_graceful_shutdown=SHUTDOWN_GRACE_S + SHUTDOWN_CUT_S,
                **uvicorn_options(client_timeout_s=client_timeout_s, max_connections=max_connections),
            ), bridge)
            server.run(sockets=[sock])
        finally:
            bridge.stop()
    if server.engine_lost:
        raise ChildProcessError(f"the engine process exited while serving ({bridge.exit_words()}): "
                                "stopped, so that a supervisor can restart the server")
