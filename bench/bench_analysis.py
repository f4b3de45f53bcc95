"""How long does the analysis of a large stored run take, before and now? One run times
both paths on one stored run, stage by stage and as whole processes.

A synthetic coin-flip run shaped like the published GPT-4o study (a few dozen distinct
P(Heads) values, most samples on a handful of them, top-20 logprobs, two fingerprints, a
few errors) is stored once with ``RunStore.record_many`` (a million samples: about 50 MB
and half a minute; kept under --store for the next bench run) and closed as a complete
run, so it has its column cache, as every run ``detaudit run`` finishes has. Then:

- now, ``--repeat`` times, each pass in a fresh process (cold, as a user's ``detaudit
  report`` is): ``RunStore.sample_columns`` (the column cache), ``build_frames`` on those
  columns, ``analyze``, ``build_insight``, the rest of ``session.summary``; and
  ``detaudit report RUN --json`` as a process. Median, best and worst of the passes.
- before: the per-sample path kept in tests/analysis/reference.py: ``store.samples()``,
  the per-sample frames loop, the pandas-groupby figures, the per-sample top-k table;
  and the same as a process (this script with --reference-report).

Every summary must be identical (the bench says so, or fails). Seconds are wall time;
CPU seconds beside the before path's, since other processes may share the cores.

    python bench/bench_analysis.py                 # 1,000,000 samples
    python bench/bench_analysis.py -n 100000
    python bench/bench_analysis.py --no-before     # only the current path
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from detaudit import session  # noqa: E402
from detaudit.analysis import analyze, build_frames  # noqa: E402
from detaudit.analysis.insight import build_insight  # noqa: E402
from detaudit.probes import load_probe  # noqa: E402
from detaudit.records import Completion, Position, Sample, TokenLogprob  # noqa: E402
from detaudit.store import RunStore  # noqa: E402

TRACKED = [{"label": "Heads", "token": "Heads", "position": 0},
           {"label": "Tails", "token": "T", "position": 0}]
CHUNK = 20_000


def synthetic_samples(n: int, distinct: int, seed: int = 0, start: int = 0,
                      stop: int | None = None) -> list[Sample]:
    """Samples ``start..stop-1`` of the synthetic run of ``n`` (the same run however cut)."""
    rng = np.random.default_rng(seed)
    # a few dozen values around P(Heads) = 0.53, a few 1e-4 pp apart, some far apart
    probs = 0.53 + rng.normal(0, 2e-4, distinct) + np.repeat([0, 0.001, 0.003], -(-distinct // 3))[:distinct]
    weights = rng.zipf(1.6, distinct).astype(float)
    choice = rng.choice(distinct, size=n, p=weights / weights.sum())
    heads = [(repr(math.log(p)), math.log(p)) for p in probs]
    tails = [(repr(math.log(1 - p - 0.01)), math.log(1 - p - 0.01)) for p in probs]
    filler = [TokenLogprob(f"t{k}", -10.0 - k, repr(-10.0 - k)) for k in range(18)]
    samples = []
    stop = n if stop is None else stop
    for i, c in zip(range(start, stop), choice[start:stop].tolist()):
        if i % 5000 == 4999:
            samples.append(Sample(i, "error", None, 3, 0.0, 1.0, error_kind="rate_limit"))
            continue
        (h_text, h), (t_text, t) = heads[c], tails[c]
        top = [TokenLogprob("Heads", h, h_text), TokenLogprob("T", t, t_text)] + filler
        completion = Completion("Heads", "stop", [Position("Heads", h, h_text, top)], "gpt-4o",
                                "fp_a" if c % 2 else "fp_b")
        samples.append(Sample(i, "ok", completion, 1, 0.0, 0.2))
    return samples


def stored_run(root: Path, n: int, distinct: int) -> Path:
    """The synthetic run stored under ``root`` (made once, then reused)."""
    path = root / f"coin-flip-{n}-{distinct}"
    if (path / "manifest.json").is_file() and \
            json.loads((path / "manifest.json").read_text()).get("status") == "complete":
        return path
    if path.exists():
        for file in path.iterdir():
            file.unlink()
        path.rmdir()
    print(f"storing {n:,} synthetic samples in {path} (once) ...", flush=True)
    t0 = time.perf_counter()
    manifest = {"probe": load_probe("coin-flip").to_dict(), "n": n, "tracked": TRACKED,
                "status": "running", "backend": {"model": "gpt-4o"},
                "backend_config": {"backend": "openai", "model": "gpt-4o", "base_url": None,
                                   "api_key_env": "OPENAI_API_KEY"}}
    with RunStore.create(root, path.name, manifest) as store:
        for start in range(0, n, CHUNK):
            store.record_many(synthetic_samples(n, distinct, start=start, stop=min(n, start + CHUNK)))
        store.update_manifest(status="complete")
    print(f"  stored in {time.perf_counter() - t0:.0f} s", flush=True)
    return path


class Clock:
    """Wall and CPU seconds of each stage, this process's and its children's."""

    def __init__(self):
        self.stages: dict[str, tuple[float, float]] = {}

    def time(self, name: str, work):
        gc.collect()
        before = _cpu()
        t0 = time.perf_counter()
        result = work()
        self.stages[name] = (time.perf_counter() - t0, _cpu() - before)
        return result


def _cpu() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def now_path(run: Path, clock: Clock, threshold_pct: float) -> dict:
    with RunStore.open_read_only(run) as store:
        columns = clock.time("read the store", store.sample_columns)
        frames = clock.time("build frames", lambda: build_frames(columns, store.manifest["tracked"]))
        analysis = clock.time("analyze", lambda: analyze(frames, threshold_pct, "outcome"))
        analysis.insight = clock.time("insight", lambda: build_insight(frames, columns))
        return clock.time("summary (notes, dict)",
                          lambda: session.summary(store, threshold_pct, analysis=analysis))


def before_path(run: Path, clock: Clock, threshold_pct: float) -> dict:
    from tests.analysis.reference import (reference_analyze, reference_frames,
                                          reference_insight)

    with RunStore.open_read_only(run) as store:
        samples = clock.time("read the store", store.samples)
        frames = clock.time("build frames", lambda: reference_frames(samples, store.manifest["tracked"]))
        analysis = clock.time("analyze", lambda: reference_analyze(frames, threshold_pct, "outcome"))
        analysis.insight = clock.time("insight", lambda: reference_insight(frames, samples))
        return clock.time("summary (notes, dict)",
                          lambda: session.summary(store, threshold_pct, analysis=analysis))


def process(clock: Clock, name: str, argv: list[str]) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = clock.time(name, lambda: subprocess.run(argv, capture_output=True, text=True, env=env,
                                                   cwd=ROOT))
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({done.returncode}):\n{done.stderr}")
    return json.loads(done.stdout)


def reference_report(run: Path) -> None:
    """``detaudit report RUN --json`` the way it was made (the per-sample path)."""
    from tests.analysis.reference import reference_summary

    with RunStore.open_read_only(run) as store:
        print(json.dumps(reference_summary(store), allow_nan=False))


STAGES = ("read the store", "build frames", "analyze", "insight", "summary (notes, dict)")
WHOLE = "stored run -> summary"
PROCESS = "report --json (process)"


def now_stages(run: Path, threshold_pct: float) -> None:
    """One cold pass of the current path in this process: its stages and summary, as JSON."""
    clock = Clock()
    summary = now_path(run, clock, threshold_pct)
    print(json.dumps({"stages": clock.stages, "summary": summary}, allow_nan=False))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=1_000_000)
    parser.add_argument("--distinct", type=int, default=40)
    parser.add_argument("--threshold-pct", type=float, default=0.01)
    parser.add_argument("--store", type=Path, default=Path("/tmp/detaudit-bench-analysis"),
                        help="where the synthetic run is stored (and found next time)")
    parser.add_argument("--repeat", type=int, default=5,
                        help="cold passes of the current path, each in its own process (median, best)")
    parser.add_argument("--no-before", action="store_true", help="skip the per-sample path")
    parser.add_argument("--reference-report", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--now-stages", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.reference_report:
        return reference_report(args.reference_report)
    if args.now_stages:
        return now_stages(args.now_stages, args.threshold_pct)

    args.store.mkdir(parents=True, exist_ok=True)
    run = stored_run(args.store, args.n, args.distinct)
    with RunStore.open(run) as store:  # a run stored by an older detaudit gets its column cache
        pass
    size = (run / "samples.sqlite").stat().st_size
    passes: list[dict[str, tuple[float, float]]] = []
    summary = None
    for _ in range(args.repeat):
        clock = Clock()
        done = process(clock, "pass", [sys.executable, __file__, "--now-stages", str(run),
                                       "--threshold-pct", str(args.threshold_pct)])
        if summary is not None:
            assert done["summary"] == summary, "two passes gave different summaries"
        summary = done["summary"]
        stages = {name: tuple(v) for name, v in done["stages"].items()}
        stages[WHOLE] = tuple(sum(stages[name][i] for name in STAGES) for i in (0, 1))
        printed = process(clock, PROCESS, [sys.executable, "-m", "detaudit", "report", str(run),
                                           "--json"])
        assert printed == summary, "report --json differs from session.summary"
        stages[PROCESS] = clock.stages[PROCESS]
        passes.append(stages)
    before = Clock()
    if not args.no_before:
        reference = before_path(run, before, args.threshold_pct)
        assert json.loads(json.dumps(reference)) == summary, "the summaries differ"
        printed = process(before, PROCESS, [sys.executable, __file__, "--reference-report", str(run)])
        assert printed == summary, "the reference report differs"
        before.stages[WHOLE] = tuple(sum(before.stages[name][i] for name in STAGES) for i in (0, 1))

    print(f"\n{args.n:,} stored samples (top-20 logprobs each, {args.distinct} distinct P(Heads)), "
          f"{size / 1e9:.2f} GB; {args.repeat} cold passes of the current path, each its own "
          f"process; load average {os.getloadavg()[0]:.1f} at the end")
    print(f"{'stage':<26}{'before: wall':>14}{'cpu':>8}{'now: median':>13}{'best':>8}"
          f"{'worst':>8}{'ratio':>8}")
    for name in (*STAGES, WHOLE, PROCESS):
        walls = sorted(p[name][0] for p in passes)
        median = walls[len(walls) // 2]
        old = before.stages.get(name)
        old_text = f"{old[0]:>12.2f} s{old[1]:>7.2f}" if old else f"{'-':>14}{'-':>8}"
        ratio = f"{old[0] / median:>7.1f}x" if old and median else f"{'-':>8}"
        print(f"{name:<26}{old_text}{median:>11.2f} s{walls[0]:>8.2f}{walls[-1]:>8.2f}{ratio}")
    print("identical summaries: yes" if not args.no_before else "")
    for t in summary["tokens"]:
        print(f"  {t['label']:<6} distinct {t['distinct_logprobs']:>4}  clusters {t['clusters']:>3}  "
              f"missing {t['missing']}")


if __name__ == "__main__":
    main()
