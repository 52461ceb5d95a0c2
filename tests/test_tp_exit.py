"""Tensor-parallel scripts exit cleanly: the process group verispec starts is also ended by it.

A user's script under ``torchrun --nproc-per-node 2`` that loads a ``tp_degree=2`` model, samples
and simply ends used to abort now and then at exit ("terminate called without an active
exception", SIGABRT): gloo's worker thread released its last finished broadcast (and a tensor whose
Python object needs the GIL) after the interpreter had begun finalizing. Ending the group in an
``atexit`` hook joins that thread first. The race is rare (a few runs in a hundred), so the script
is run many times, two jobs at a time (a busier CPU delays the worker thread), and three runs in
four set a long ``sys.setswitchinterval``, which keeps that thread off the GIL until the
interpreter finalizes: without the hook, about half of those runs abort. VERISPEC_TP_EXIT_RUNS
sets the number of runs (default 12; 40 or more for a thorough check).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from conftest import build_tiny_hf

RUNS = int(os.environ.get("VERISPEC_TP_EXIT_RUNS", "12"))
ABORT = "terminate called"

SCRIPT = textwrap.dedent('''
    import sys

    path, ending, switch_s = sys.argv[1], sys.argv[2], float(sys.argv[3])
    if switch_s:
        sys.setswitchinterval(switch_s)  # widens the exit race (see tests/test_tp_exit.py)
    import torch.distributed as dist

    from verispec.model import LlamaForSampling
    from verispec.parallel import destroy_model_parallel
    from verispec.spec import SpeculativeGenerator

    draft = LlamaForSampling.from_pretrained(path, n_positions=32, batch_size=1)
    target = LlamaForSampling.from_pretrained(path, n_positions=32, batch_size=1, tp_degree=2)
    if ending == "raise_on_rank1" and dist.get_rank() == 1:
        import time

        sys.stdout.write(f"raising at {time.time()}\\n")
        raise RuntimeError("rank 1 fails on purpose")
    if ending == "exit_on_rank1" and dist.get_rank() == 1:
        import time

        sys.stdout.write(f"exiting at {time.time()}\\n")
        sys.exit(3)  # a normal exit, while rank 0 waits in a collective
    tokens = SpeculativeGenerator(draft, target, 3).sample([[1, 2, 3]], 10, temperature=0)
    sys.stdout.write(f"tokens {tokens.tolist()}\\n")  # one write (torchrun runs python -u): the ranks share a pipe
    if ending == "destroy_model_parallel":
        destroy_model_parallel()
    elif ending == "destroy_process_group":
        dist.destroy_process_group()
    elif ending == "process_group_then_model_parallel":
        dist.destroy_process_group()
        destroy_model_parallel()
    elif ending == "model_parallel_then_process_group":
        destroy_model_parallel()
        if dist.is_initialized():
            dist.destroy_process_group()
    else:
        assert ending in ("none", "raise_on_rank1", "exit_on_rank1"), ending
''')


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp_exit")
    path, _ = build_tiny_hf(root / "tiny", "llama", num_hidden_layers=1)
    script = root / "user_script.py"
    script.write_text(SCRIPT)

    def start(ending: str = "none", switch_s: float = 0.0) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               str(script), path, ending, str(switch_s)]
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONSAFEPATH="1")
        for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(var, None)
        return subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def run_all(*jobs: tuple[str, float]) -> list[subprocess.CompletedProcess]:
        """Run the jobs (ending, switch interval) at the same time; wait for all of them."""
        procs = [start(*j) for j in jobs]
        try:
            outputs = [p.communicate(timeout=240) for p in procs]
            return [subprocess.CompletedProcess(p.args, p.returncode, *out) for p, out in zip(procs, outputs)]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.communicate()

    return run_all


def _workers_stderr(proc: subprocess.CompletedProcess) -> str:
    """The ranks' own stderr: what comes before torchrun's report of a failed child."""
    return proc.stderr.split("Traceback (most recent call last):\n  File \"<frozen runpy>\"")[0][-2000:]


def _both_ranks_sampled(proc: subprocess.CompletedProcess) -> bool:
    lines = [line for line in proc.stdout.splitlines() if line.startswith("tokens ")]
    return len(lines) == 2 and lines[0] == lines[1]


@pytest.mark.dist
def test_script_without_teardown_exits_cleanly_every_time(job):
    failures = []
    switch = [0.0 if i % 4 == 0 else 5.0 for i in range(RUNS)]
    for first in range(0, RUNS, 2):
        runs = list(range(first, min(first + 2, RUNS)))
        for i, proc in zip(runs, job(*[("none", switch[i]) for i in runs])):
            if proc.returncode != 0 or ABORT in proc.stderr or not _both_ranks_sampled(proc):
                failures.append(f"run {i} (switch interval {switch[i] or 'default'}): exit {proc.returncode}\n"
                                f"{proc.stdout[-500:]}\n{_workers_stderr(proc)}")
    assert not failures, f"{len(failures)} of {RUNS} runs did not exit cleanly:\n" + "\n".join(failures)


@pytest.mark.dist
@pytest.mark.parametrize("ending", ["destroy_model_parallel", "destroy_process_group",
                                    "process_group_then_model_parallel", "model_parallel_then_process_group"])
def test_explicit_teardown_still_exits_cleanly(job, ending):
    (proc,) = job((ending, 5.0))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _both_ranks_sampled(proc), proc.stdout
    for bad in (ABORT, "Traceback", "could not end", "Error"):
        assert bad not in proc.stderr, proc.stderr[-3000:]


@pytest.mark.dist
def test_a_rank_that_raises_exits_with_its_error_not_an_abort(job):
    """The failing rank ends its group at once (no wait for the others at exit), so rank 0, blocked in
    a collective, hears of it at once instead of after the exit barrier's 10 s."""
    (proc,) = job(("raise_on_rank1", 5.0))
    ended = time.time()
    assert proc.returncode != 0
    assert "rank 1 fails on purpose" in proc.stderr, proc.stderr[-3000:]
    assert ABORT not in proc.stderr and "SIGABRT" not in proc.stderr, proc.stderr[-3000:]
    assert "failed on rank 0 of 2: another rank exited" in proc.stderr, _workers_stderr(proc)
    raised = float(proc.stdout.split("raising at ")[1].split()[0])
    assert ended - raised < 8.0, (ended - raised, proc.stderr[-3000:])


@pytest.mark.dist
def test_a_rank_that_exits_early_waits_for_the_others_only_briefly(job):
    """A rank that exits normally while rank 0 waits in a collective gives up waiting for rank 0
    at exit after 10 s (not the 300 s collective timeout), then ends its group, which ends rank 0's."""
    (proc,) = job(("exit_on_rank1", 5.0))
    ended = time.time()
    assert proc.returncode != 0
    assert ABORT not in proc.stderr, proc.stderr[-3000:]
    assert "failed on rank 0 of 2: another rank exited" in proc.stderr, _workers_stderr(proc)
    exited = float(proc.stdout.split("exiting at ")[1].split()[0])
    assert 9.0 < ended - exited < 40.0, (ended - exited, proc.stderr[-3000:])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


HOOK_SCRIPT = textwrap.dedent('''
    import atexit
    import torch.distributed as dist

    # registered first, so it runs after verispec's hook: reports what that hook left behind
    atexit.register(lambda: print("group alive at exit:", dist.is_initialized(), flush=True))
    from verispec.parallel import initialize_model_parallel

    initialize_model_parallel(1)
    print("group alive at end of script:", dist.is_initialized(), flush=True)
''')


def test_exit_hook_ends_the_group_it_started_before_the_interpreter_finalizes(tmp_path):
    script = tmp_path / "hook.py"
    script.write_text(HOOK_SCRIPT)
    env = dict(os.environ, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(_free_port()), PYTHONSAFEPATH="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines() == ["group alive at end of script: True", "group alive at exit: False"], \
        proc.stdout + proc.stderr[-2000:]
