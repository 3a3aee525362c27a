"""Process-group setup from torchrun's environment, the (dp, ep) device mesh, and rank helpers.

torchrun (or any launcher that sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) starts one process
per device; `init()` joins them with NCCL on GPUs and gloo on CPU. Without those variables everything here
describes a world of one, so the same code runs in a single process.

The mesh is (dp, ep) with ep innermost, as in torchtitan: the ep ranks of one row hold different experts
(an all-to-all group), the dp ranks of one column hold the same experts (FSDP shards them further over dp).
Every rank of the world reads different data; dense parameters are FSDP-sharded over the whole world.
"""
from __future__ import annotations

import gc
import os
import re
import socket
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from ..device import resolve_device, use_device


def launched() -> bool:
    """True when a launcher (torchrun) set up the environment for more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


DIST_TIMEOUT_S = 600.0  # torch's own default for gloo and NCCL collectives
# How long the other ranks wait for rank 0's `main_first` block (training a tokenizer, tokenizing the corpus: an
# hour or more for a large one), on a gloo group of its own: under the collectives' --dist-timeout, the first start
# on a corpus past ~1 GB died, and so did every retry. A rank 0 process that dies ends the job through torchrun;
# a lost node is only noticed when this runs out.
MAIN_FIRST_TIMEOUT = timedelta(hours=6)
_patient: list[dist.ProcessGroup] = []  # that group, made by `init` (every rank makes its groups in one order)


def init(device: str | torch.device = "auto", timeout_s: float = DIST_TIMEOUT_S) -> torch.device:
    """This process's device (`--device`: auto is the local rank's GPU when CUDA is available, else the CPU), made
    current; joined to the process group when launched by torchrun (NCCL on GPUs, gloo on the CPU)."""
    device = resolve_device(device)
    use_device(device)
    if launched() and not dist.is_initialized():
        try:
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(seconds=timeout_s),
                                    device_id=device if device.type == "cuda" else None,
                                    **_attempt_store(timedelta(seconds=timeout_s)))
        except (dist.DistStoreError, dist.DistNetworkError) as err:  # rank 0 waits for the others, they for rank 0
            where = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
            reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
            if not re.search(r"timed out|timeout", reason, re.IGNORECASE):  # a port in use, an unknown host, ...
                raise OSError(f"cannot join the other ranks at {where}: {reason}") from None
            raise TimeoutError(f"the {os.environ['WORLD_SIZE']} ranks did not all meet at {where} within "
                               f"{timeout_s:g} s ({reason}): start every rank (torchrun --nproc-per-node, --nnodes), "
                               "or give them longer with --dist-timeout") from None
        _patient[:] = [dist.new_group(backend="gloo", timeout=max(MAIN_FIRST_TIMEOUT, timedelta(seconds=timeout_s)))]
    return device


def _attempt_store(timeout: timedelta) -> dict:
    """init_process_group's store, rank and world size where torchrun serves its own store to the ranks: the keys
    of this restart (TORCHELASTIC_RESTART_COUNT) kept apart from those of the attempts before. torchrun keeps one
    store for every restart of a job and the process groups' keys do not name the attempt, so a restarted rank read
    the address a rank of the killed attempt had left there: every `torchrun --max-restarts` retry failed to connect
    (or waited out --dist-timeout). Nothing where torchrun does not share its store
    (TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: a new store each restart)."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return {}
    if (int(os.environ.get("GROUP_WORLD_SIZE", "1")) > 1 and int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0"))
            and os.environ.get("RANK") == "0"):  # agents on other machines count their restarts apart (docs/fsdp.md)
        print("note: torchrun restarts across machines need TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in torchrun's "
              "environment (a new store each restart); with the shared store a restart may not reconnect",
              file=sys.stderr, flush=True)
    world = int(os.environ["WORLD_SIZE"])
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
                          timeout=timeout)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return {"store": dist.PrefixStore(f"longcat/attempt_{attempt}/", store), "rank": int(os.environ["RANK"]),
            "world_size": world}


# What gloo's and NCCL's errors say when the rank at the other end is gone or never answered (not a bug's assert)
_PEER_LOST = re.compile(r"connection (reset|closed|refused)|closed by peer|broken pipe|timed out|timeout|"
                        r"remote process exited|communicator was aborted|watchdog", re.IGNORECASE)


def peer_lost(err: BaseException) -> str:
    """What went wrong, in a few words, when `err` is a collective that failed because another rank is gone or
    never answered; "" for any other error (a bug's failed check keeps its traceback)."""
    text = str(err).strip()
    if not _PEER_LOST.search(text):
        return ""
    text = re.sub(r"^\[[^\]]*\]\s*", "", text)  # gloo's [source file:line] prefix
    return (text.split(". ")[0].splitlines() or [type(err).__name__])[0][:200]


def teardown() -> None:
    """Leave the process group (waits for every rank, so no rank exits while another still sends to it).

    Unreachable objects that still hold the groups' finished work (a trained model's FSDP state, its tensors)
    are collected first, while the interpreter is whole: freed during interpreter shutdown instead, gloo's worker
    threads can abort the process after the run has succeeded (seen once in ~35 CPU runs at world 3)."""
    if dist.is_initialized():
        barrier()
        gc.collect()
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def print0(*args: object, **kwargs: object) -> None:
    """print() on rank 0 only."""
    if is_main():
        print(*args, **kwargs)  # type: ignore[call-overload]


@contextmanager
def main_first() -> Iterator[None]:
    """Run the block on rank 0 before the other ranks: rank 0 writes shared files (tokenizer, token shard) that
    the others then find and reuse, waiting for it up to MAIN_FIRST_TIMEOUT, not --dist-timeout. Every rank waits
    once for rank 0's outcome: when rank 0's block fails (bad data: rank 0 says why), the others raise
    RankZeroFailed instead of dying in a barrier rank 0 never joins."""
    if not dist.is_initialized():
        yield
        return
    if not is_main():
        if not _rank_zero_succeeded(None):
            raise RankZeroFailed("rank 0 failed first; its message says why")
        yield
        return
    try:
        yield
    except BaseException:
        _rank_zero_succeeded(False)
        raise
    _rank_zero_succeeded(True)


class RankZeroFailed(RuntimeError):
    """The other ranks' side of a failure rank 0 reports itself (`main_first`)."""


def _rank_zero_succeeded(outcome: bool | None) -> bool:
    """Rank 0 sends its outcome, the others receive it."""
    box = [outcome]
    dist.broadcast_object_list(box, src=0, group=_patient[0] if _patient else None)
    return bool(box[0])


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()



# ---- reductions the training step needs besides FSDP's ----

def global_counts(counts: torch.Tensor, mesh: DeviceMesh | None) -> torch.Tensor:
    """Router selection counts (L, E+Z) summed over every rank, so the budget controller sees the global batch
    and every rank writes the same bias. One all-reduce for all layers."""
    if mesh is not None:
        counts = counts.clone()
        dist.all_reduce(counts)
    return counts


def average(values: torch.Tensor, mesh: DeviceMesh | None) -> torch.Tensor:
    """The mean over all ranks of a tensor of metrics (one all-reduce, on the tensor's own device)."""
    if mesh is None:
        return values
    values = values.clone()
    dist.all_reduce(values)
    return values / mesh.size()


def check_shared_directory(path: Path, flag: str = ".shared-check") -> None:
    """Every rank sees the directory rank 0 writes in and can write there too (checkpoints take every rank's shard
    there): rank 0 writes a fresh token into `path/flag`, each rank reads it back and writes a file of its own. Else
    a ValueError on every rank naming the first rank that cannot, before any work: a multi-node run with --out on a
    node-local disk trained to the end and left checkpoints without the other nodes' shards, and a rank that saw a
    read-only mount trained until the first checkpoint."""
    if not dist.is_initialized():
        return
    sent, problem = [uuid.uuid4().hex, str(path.resolve())] if is_main() else [None, None], ""
    if is_main():
        try:
            (path / flag).write_text(sent[0])
        except OSError as err:  # said on every rank below, not left as a broadcast the others wait in
            sent, problem = [None, None], f"rank 0 cannot write in {path}: {err}"
    dist.broadcast_object_list(sent, src=0)
    token, written_in = sent
    if token is not None and not problem:
        try:
            seen = (path / flag).read_text()
        except OSError:
            seen = None
        if seen != token:
            here = "" if str(path.resolve()) == written_in else f" (here {path.resolve()})"
            problem = (f"rank {rank()} (host {socket.gethostname()}) does not see the files rank 0 writes in "
                       f"{written_in}{here}: every rank writes its shards of each checkpoint there, so all nodes "
                       "need it on one shared filesystem")
        else:
            problem = _cannot_write(path / f"{flag}-{rank()}")
    try:
        raise_if_any(problem, ValueError)  # a collective: every rank has read the token by now
    finally:
        if is_main():
            (path / flag).unlink(missing_ok=True)


SAME_LINE = ("the ranks were given different settings", "every rank must run the same command line (on every node "
             "the same torchrun ... longcat line)")


def check_same_settings(settings: dict[str, Any], problem: tuple[str, str] = SAME_LINE) -> None:
    """Refuse, on every rank, a launch whose ranks were given different settings (one node started with another
    command line): trained on, such a run silently mixed learning rates or seeds (only rank 0's were recorded),
    hung building different meshes, or aborted in gloo on a collective of another size. `settings`: nested
    dicts of plain values, compared field by field with rank 0's; nothing to compare in one process. `problem`:
    what a difference means and what to do, when it is not a different command line."""
    if not dist.is_initialized():
        return
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, _flat(settings))
    first = gathered[0]
    for other_rank, other in enumerate(gathered[1:], 1):
        if differ := sorted(key for key in first.keys() | other.keys() if first.get(key) != other.get(key)):
            shown = "; ".join(f"{k}: rank {other_rank} {other.get(k)!r}, rank 0 {first.get(k)!r}" for k in differ[:3])
            more = f" (and {len(differ) - 3} more)" if len(differ) > 3 else ""
            raise ValueError(f"{problem[0]} ({shown}{more}): {problem[1]}")


def _flat(settings: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"optim": {"lr": 1e-3}} -> {"optim.lr": 1e-3}."""
    flat = {}
    for key, value in settings.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _cannot_write(probe: Path) -> str:
    """Why this rank cannot write `probe` (created, then removed), or "" when it can."""
    try:
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        return f"rank {rank()} (host {socket.gethostname()}) cannot write in {probe.parent}: {err.strerror or err}"
    return ""


def raise_if_any(message: str, error: type[Exception]) -> None:
    """Raise `error` on every rank when any rank has a non-empty `message` (so no rank is left waiting in a
    collective the failed one will never join); in one process, raise when `message` is non-empty."""
    if dist.is_initialized():
        messages: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(messages, message)
        message = next((m for m in messages if m), "")
    if message:
        raise error(message)


def parallel_degrees(dp: int | None, ep: int | None, world: int) -> tuple[int, int]:
    """(dp, ep) over `world` processes from --dp / --ep: the degree not given is world / the other (ep 1 when
    neither is), as torchtitan infers its data-parallel degree; build_mesh checks that both given multiply to the
    world."""
    if bad := [f"--{flag} {degree}" for flag, degree in (("ep", ep), ("dp", dp)) if degree is not None and degree < 1]:
        raise ValueError(f"--ep and --dp must be at least 1, got {' '.join(bad)}")
    if (dp is None) == (ep is None):
        return (world, 1) if dp is None else (dp, ep)
    flag, given = ("--ep", ep) if dp is None else ("--dp", dp)
    if world % given:
        raise ValueError(f"{flag} {given} must divide the world size {world} (processes started by torchrun)")
    return (world // ep, ep) if dp is None else (dp, world // dp)


def build_mesh(dp: int, ep: int, device: torch.device | str = "cpu") -> DeviceMesh | None:
    """The (dp, ep) mesh over the whole world, or None for a single process.

    Every rank must call this (creating process groups is a collective).
    """
    if dp < 1 or ep < 1 or dp * ep != world_size():
        raise ValueError(f"--dp {dp} --ep {ep}: dp * ep must equal the world size {world_size()} "
                         "(processes started by torchrun: --nproc-per-node x --nnodes)")
    if world_size() == 1:
        return None
    mesh = init_device_mesh(torch.device(device).type, (dp, ep), mesh_dim_names=("dp", "ep"))
    if (timeout := _world_timeout()) is not None:
        for name in mesh.mesh_dim_names:  # torch makes them with its 30-minute default, not the world's timeout
            dist.distributed_c10d._set_pg_timeout(timeout, mesh.get_group(name))  # as torchtitan's set_pg_timeouts
    return mesh


def _world_timeout() -> timedelta | None:
    """How long the default group's collectives wait (`init`'s timeout_s, or a user's own init_process_group's);
    None where its backend does not say."""
    group = dist.distributed_c10d._get_default_group()
    backend = group._get_backend(next(iter(group._device_types)))
    return getattr(getattr(backend, "options", None), "_timeout", None)
