"""First and second run of `verispec generate` on an empty cache: wall time, peak RSS and where
the first run's time goes. Runs the CLI twice in a fresh ``VERISPEC_HOME`` (the first run
downloads ~1.6 GB of PyPI packages) under ``/usr/bin/time -v``, with ``-v`` so that each step
logs a ``timing:`` line; each stderr line is stamped with its arrival time, so the remainder
after the last model is loaded is the generation. Writes <out>.json in $VERISPEC_RESULTS or
./bench-results (the committed bench/results/first_run.json: run from the checkout with
VERISPEC_RESULTS=bench/results).

    python -m verispec.bench.first_run [--out first_run] [--keep-home] -- [generate options]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from .common import machine_info, results_dir

DEFAULT_ARGS = ["--target", "qwen2.5-coder-1.5b", "--draft", "qwen2.5-coder-0.5b", "--amp", "bf16",
                "--draft-quant", "auto", "--max-new-tokens", "32", "--no-stats",
                "Write a Python function that checks whether a number is prime."]
_TIMING = re.compile(r"timing: (.+) ([0-9.]+) s$")


def run_once(args: list[str], home: Path) -> dict:
    """One `/usr/bin/time -v verispec -v generate ARGS` with VERISPEC_HOME=home."""
    verispec = Path(sys.executable).with_name("verispec")
    cmd = ["/usr/bin/time", "-v", str(verispec), "-v", "generate", *args]
    env = dict(os.environ, VERISPEC_HOME=str(home))
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[tuple[float, str]] = []

    def read_err():
        for line in p.stderr:
            lines.append((time.perf_counter() - t0, line.rstrip("\n")))

    reader = threading.Thread(target=read_err)
    reader.start()
    out = p.stdout.read()
    p.wait()
    reader.join()
    wall = time.perf_counter() - t0
    phases, last_load = [], 0.0
    for at, line in lines:
        m = _TIMING.search(line)
        if m:
            phases.append({"step": m.group(1), "s": float(m.group(2)), "logged_at_s": round(at, 2)})
            if m.group(1).startswith("fuse/quantize"):
                last_load = at
    text = "\n".join(line for _, line in lines)
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    elapsed = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([0-9:.]+)", text)
    cpu = re.search(r"Percent of CPU this job got: (\d+)%", text)
    return {
        "command": f"VERISPEC_HOME={home} " + " ".join(cmd[2:]),
        "exit_status": p.returncode,
        "wall_s": round(wall, 2),
        "time_v_elapsed": elapsed and elapsed.group(1),
        "maxrss_kb": rss and int(rss.group(1)),
        "cpu_percent": cpu and int(cpu.group(1)),
        "phases": phases,
        "generate_s": round(wall - last_load, 2) if last_load else None,  # after the last model is ready
        "stdout_chars": len(out),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="first_run", help="results name: NAME.json in $VERISPEC_RESULTS or ./bench-results")
    ap.add_argument("--keep-home", action="store_true", help="keep the temporary cache afterwards")
    ap.add_argument("generate_args", nargs="*", help="options for `verispec generate` (after --)")
    a = ap.parse_args(argv)
    args = a.generate_args or DEFAULT_ARGS
    home = Path(tempfile.mkdtemp(prefix="verispec-first-run-"))
    try:
        runs = {"first": run_once(args, home), "second": run_once(args, home)}
        cache = {p.name: p.stat().st_size for p in home.rglob("*") if p.is_file()}
    finally:
        if not a.keep_home:
            shutil.rmtree(home, ignore_errors=True)
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()[:10]
    result = {"runs": runs, "cache_files_bytes": cache, "machine": machine_info(), "lscpu": lscpu,
              "load_average_after": os.getloadavg()}
    path = results_dir() / f"{a.out}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    for k, r in runs.items():
        print(f"{k}: wall {r['wall_s']} s, maxrss {r['maxrss_kb']} kB, cpu {r['cpu_percent']}%, exit {r['exit_status']}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
