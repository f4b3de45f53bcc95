"""Do the engine's Gluon kernels compile for sm_90 under each Triton release? No GPU needed.

    pip download --no-deps triton==3.6.0 triton==3.9.0 -d wheels/   # (one release per command)
    python bench/compile_gluon.py wheels/triton-3.6.0-*.whl wheels/triton-3.9.0-*.whl [--cases ...]

Each wheel (or folder holding an unpacked ``triton`` package) is put first on the path of a
fresh process that runs ``tests/kernels/gluon_offline.py``: the engine's host code plans and
launches every Gluon kernel mode on CPU tensors, and that release compiles each launch to
sm_90a. Prints one row per release: compiled launches, seconds, and the first error.
"""

from __future__ import annotations

import argparse
import sys
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.kernels.gluon_offline import report_in_fresh_process  # noqa: E402
UNPACKED = Path.home() / ".cache" / "detaudit" / "triton-releases"


def package_dir(source: Path) -> Path:
    """A folder whose ``triton`` subfolder is the release: the folder given, or the wheel
    unpacked once into the cache."""
    if source.is_dir():
        return source
    target = UNPACKED / source.stem
    if not (target / "triton" / "__init__.py").exists():
        with zipfile.ZipFile(source) as wheel:
            wheel.extractall(target, [n for n in wheel.namelist() if n.startswith("triton/")])
        for tool in (target / "triton" / "backends" / "nvidia" / "bin").glob("*"):
            tool.chmod(0o755)  # ptxas & co. lose their mode in the zip
    return target


def compile_under(folder: Path, cases: list[str]) -> dict:
    """gluon_offline's report for the release in ``folder`` (a fresh process, a cold cache), timed."""
    start = time.perf_counter()
    report = report_in_fresh_process(cases, path=[folder])
    return dict(report, triton=report["triton"] or folder.name, seconds=time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("releases", nargs="+", type=Path, help="Triton wheels or unpacked folders")
    parser.add_argument("--cases", nargs="*", default=[], help="gluon_offline's cases (default: all)")
    args = parser.parse_args()
    worst = 0
    print(f"{'Triton':>10} | {'compiled':>8} | {'seconds':>7} | first failure")
    for source in args.releases:
        report = compile_under(package_dir(source), args.cases)
        skipped = [r["case"] for r in report["rows"] if r.get("skipped")]
        rows = [r for r in report["rows"] if not r.get("skipped")]
        ok = sum(r["error"] is None for r in rows)
        failure = report.get("crash") or next((f"{r['case']}/{r['kernel']}: {r['error']}" for r in rows
                                               if r["error"]), "")
        worst = max(worst, int(bool(failure)))
        note = f" (not built: {', '.join(skipped)}: no multicast before 3.7)" if skipped else ""
        print(f"{report['triton']:>10} | {ok:>3} of {len(rows):<2} | {report['seconds']:7.1f} | {failure}{note}")
    return worst


if __name__ == "__main__":
    sys.exit(main())
