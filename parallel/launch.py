"""Starting tensor-parallel processes: under torchrun (scripts, the CLI), or from Python
(``run_ranks``, for tests, benchmarks and notebooks).

``run_ranks`` gives every process torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT on a free port), so code under test starts exactly as it does under
torchrun. Unlike ``torch.multiprocessing.spawn`` it does not terminate the other ranks when one
fails, so each rank's own reaction to a dead peer can be observed; every process still left at
the deadline is killed.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


def in_torchrun() -> bool:
    """True inside a process started by torchrun (or by ``run_ranks``)."""
    return all(v in os.environ for v in TORCHRUN_ENV)


def torchrun_command(nproc: int, module: str, args: list[str]) -> list[str]:
    """``python -m torch.distributed.run --standalone --nproc-per-node N -m module args...``."""
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"number of processes must be a positive integer, got {nproc!r}")
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", module, *args]


def relaunch_under_torchrun(nproc: int, module: str, args: list[str]) -> int:
    """Run ``python -m module args`` as ``nproc`` torchrun workers; return torchrun's exit status.

    torchrun ends every worker when one fails, so a dead rank cannot leave the others hanging.
    The workers run with PYTHONSAFEPATH=1: started in a checkout of verispec, the working
    directory's kernels/ or model/ folder must not shadow an installed package of that name.
    """
    return subprocess.call(torchrun_command(nproc, module, args), env={**os.environ, "PYTHONSAFEPATH": "1"})


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RankResult:
    rank: int
    exitcode: int | None  # None: killed at the deadline
    value: Any = None  # what fn returned
    error: str | None = None  # "ExceptionType: message" if fn raised
    traceback: str | None = None
    seconds: float | None = None  # wall time of fn on this rank

    @property
    def ok(self) -> bool:
        return self.exitcode == 0 and self.error is None


def _rank_main(fn, rank: int, world_size: int, port: int, env: dict, threads: int | None, out: str, args: tuple):
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
                       "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    os.environ.update(env)
    import torch

    if threads:
        torch.set_num_threads(threads)
    record: dict = {}
    t0 = time.perf_counter()
    try:
        record["value"] = fn(rank, world_size, *args)
    except BaseException as e:  # report everything, including SystemExit from the code under test
        record["error"] = f"{type(e).__name__}: {e}"
        record["traceback"] = traceback.format_exc()
    record["seconds"] = time.perf_counter() - t0
    if "error" not in record:
        _wait_for_peers()
    tmp = Path(out).with_suffix(".tmp")
    tmp.write_bytes(pickle.dumps(record))
    tmp.rename(out)
    # Leave without waiting on process-group teardown, which blocks when a peer is gone.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0 if "error" not in record else 1)


def _wait_for_peers(timeout_s: float = 10.0) -> None:
    """Leave only once every rank is done: a rank that exits right after a collective can reset
    the connection before a peer has read its last message. Failures here are ignored (a peer
    that died or hung was already reported by the code under test)."""
    import datetime

    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    try:
        if dist.get_backend() == "gloo":
            dist.monitored_barrier(timeout=datetime.timedelta(seconds=timeout_s))
        else:
            dist.barrier()
    except Exception:  # noqa: BLE001 - best effort, see above
        pass


def run_ranks(
    fn: Callable[..., Any],
    world_size: int,
    args: tuple = (),
    timeout_s: float = 120.0,
    env: dict | None = None,
    threads_per_rank: int | None = None,
) -> list[RankResult]:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` fresh processes; return each rank's result.

    ``fn`` must be importable by name (a module-level function). Processes still running after
    ``timeout_s`` are killed and reported with exitcode None.
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive integer, got {world_size!r}")
    ctx = multiprocessing.get_context("spawn")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="verispec-ranks-") as tmp:
        outs = [str(Path(tmp) / f"rank{r}.pkl") for r in range(world_size)]
        procs = [
            ctx.Process(target=_rank_main, args=(fn, r, world_size, port, dict(env or {}), threads_per_rank, outs[r], args),
                        daemon=True)
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout_s
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        results = []
        for r, p in enumerate(procs):
            if p.is_alive():
                p.kill()
                p.join()
                results.append(RankResult(r, None, error=f"TimeoutError: rank {r} still running after {timeout_s:g} s"))
                continue
            res = RankResult(r, p.exitcode)
            if os.path.exists(outs[r]):
                record = pickle.loads(Path(outs[r]).read_bytes())
                res.value, res.error = record.get("value"), record.get("error")
                res.traceback, res.seconds = record.get("traceback"), record.get("seconds")
            elif p.exitcode != 0:
                res.error = f"ProcessExited: rank {r} exited with code {p.exitcode} without a result"
            results.append(res)
    return results
