"""The main job as a user waits for it: `detaudit run` on the bundled tiny model, timed
as whole processes (start-up, model load, every sample, the report), on the CPU.

Side by side in one run: the engine's CPU path (`--kernel-impl cpu-exact`, the default
on a CPU) and the Triton kernels under the interpreter (`--kernel-impl triton`, what
`detaudit run` ran on a CPU before), each with its batch-invariant kernels, plus the
default kernels for the contrast. Each line: wall seconds of the whole process, the
run's own seconds for the samples (from its JSON), per-sample cost, and the verdict.

    python bench/bench_main_job.py                  # n = 100, the main job's default
    python bench/bench_main_job.py --n 100 --skip-triton --json out.json

Goal (issue 10): the main job with no flags in at most 30 s on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main_job(args: list[str], out: Path) -> dict:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "detaudit.cli", "run", "--out", str(out), "--json", *args],
                          capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"detaudit run {' '.join(args)} failed:\n{done.stderr[-2000:]}")
    summary = json.loads(done.stdout)
    run = summary["run"]
    return {
        "args": args, "wall_s": round(wall, 2), "samples_s": run["elapsed_s"], "n": summary["n"],
        "per_sample_ms": round(1000 * run["elapsed_s"] / summary["n"], 1),
        "kernel_impl": run["backend"]["kernel_impl"], "deterministic": summary["deterministic"],
        "distinct": {t["label"]: t["distinct_logprobs"] for t in summary["tokens"]},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=None, help="samples per job [default: the main job's]")
    parser.add_argument("--skip-triton", action="store_true", help="leave out the interpreter (minutes)")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    opts = parser.parse_args()
    n_args = ["--n", str(opts.n)] if opts.n else []
    jobs = [("main job (no flags): cpu-exact", n_args),
            ("default kernels", [*n_args, "--kernels", "default"])]
    if not opts.skip_triton:
        jobs.append(("before: Triton interpreter", [*n_args, "--kernel-impl", "triton"]))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, args in jobs:
            row = {"job": name, **main_job(args, Path(tmp))}
            rows.append(row)
            print(f"{name:32s} wall {row['wall_s']:7.1f} s  samples {row['samples_s']:7.1f} s  "
                  f"{row['per_sample_ms']:7.1f} ms/sample  n={row['n']}  {row['kernel_impl']:18s} "
                  f"distinct {row['distinct']}", flush=True)
    if not opts.skip_triton:
        fast, slow = rows[0], rows[-1]
        print(f"cpu-exact vs interpreter: {slow['wall_s'] / fast['wall_s']:.1f}x faster as a whole process, "
              f"{slow['per_sample_ms'] / fast['per_sample_ms']:.1f}x per sample")
    if opts.json:
        opts.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
