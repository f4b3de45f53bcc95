"""``detaudit matrix``: one target request measured along axes the client controls,
each level against a baseline level, and a verdict per axis.

The steps mirror a run's (``detaudit.session``): ``prepare`` (probe, backend config,
axes and their levels; nothing sent), ``count`` (every request it will send, warm-ups
and fillers included, and what they cost: ``--dry-run`` and ``--max-cost``), then
``execute``: one stored run per axis in ``<out>/matrix-<id>/<axis>/`` (made by
``session.start`` and sent by ``session.execute``, so ``detaudit report`` and
``export`` read it like any run; it has groups ``<axis>=<level>``), each axis' verdict
(``detaudit.analysis.invariance``), and ``matrix.json``: the summary that
``detaudit matrix --json`` prints. Axis runs are sent one request at a time, so the
level is the only thing that changes between samples.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from detaudit import axes as axis_defs
from detaudit import load as load_sweep
from detaudit import session
from detaudit.axes import Axis, AxisBackend, AxisProblem, Layout
from detaudit.backends.base import DEFAULT_REQUEST_TIMEOUT_S
from detaudit.defaults import DEFAULT_PROBE, MAX_LEVEL
from detaudit.probes import Probe
from detaudit.runner import RunFailed
from detaudit.session import UsageProblem
from detaudit.store import new_run_id, utc_now
from detaudit.terminal import stderr

if TYPE_CHECKING:
    from rich.console import Console

    from detaudit.cost import CostPlan

SUMMARY = "matrix.json"
DEFAULT_N = 20  # samples per level


@dataclass
class Matrix:
    """A matrix before anything is sent: the target probe, the backend config, the axes
    with their levels, samples per level, and the cache axis' nonce."""

    probe: Probe
    config: dict[str, Any]
    axes: list[Axis]
    per_level: int
    nonce: str = axis_defs.DEFAULT_NONCE
    nonce_run: str = ""

    @property
    def local(self) -> bool:
        return self.config["backend"] == "local"

    def layout(self, axis: Axis) -> Layout:
        return Layout.of(axis, self.per_level)


def prepare(probe: str = DEFAULT_PROBE, *, model: str | None = None, base_url: str | None = None,
            n: int | None = None, axes: str | list[str] | None = None,
            levels: list[str] | dict[str, Any] | None = None, nonce: str = axis_defs.DEFAULT_NONCE,
            api: str | None = None, api_key_env: str = "OPENAI_API_KEY", backend: str | None = None,
            kernels: str | None = None, kernel_impl: str | None = None, prompt: str | None = None,
            max_level: int = MAX_LEVEL) -> Matrix:
    """The matrix to measure; bad input raises ``UsageProblem`` (or ``ProbeError``)."""
    session.check_api_key_env(api_key_env)
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise UsageProblem(f"n = {n!r}: give a positive whole number of samples per level")
    target = session.build_probe(probe, api=api, prompt=prompt)
    if target.kind == "load-sweep":  # the load axis sets the load; the target is its request
        target = dataclasses.replace(target, kind="outcome")
    config = session.backend_config(backend, model, base_url, api_key_env, kernels, None,
                                    max_level, kernel_impl)
    kind = axis_defs.LOCAL if config["backend"] == "local" else axis_defs.REMOTE
    try:
        names = axis_defs.choose(kind, target, axes)
        chosen = axis_defs.parse_levels(levels)
        extra = sorted(set(chosen) - set(names))
        if extra:
            raise AxisProblem(f"--level {extra[0]}=...: the {extra[0]} axis is not measured; "
                              f"add it to --axes")
        nonce = axis_defs.check_nonce(nonce)
        prompt_tokens = _prompt_tokens(target, config) if "prefill-chunk" in names else None
        resolved = [axis_defs.resolve(name, chosen.get(name), target, prompt_tokens, max_level)
                    for name in names]
    except AxisProblem as exc:
        raise UsageProblem(str(exc)) from None
    return Matrix(target, config, resolved, n or DEFAULT_N, nonce, axis_defs.new_nonce_run())


def _prompt_tokens(probe: Probe, config: dict[str, Any]) -> int | None:
    from detaudit.cost import count_local_prompt

    return count_local_prompt(probe, config["model"])[0]


# --- what it sends -------------------------------------------------------------------------

@dataclass
class LevelCount:
    """The requests of one level (or an axis' warm-up): targets, fillers at most, and
    their cost estimate."""

    axis: str
    level: str
    requests: int
    fillers: int
    choices: int
    cost: "CostPlan"

    def to_dict(self) -> dict[str, Any]:
        plan = self.cost
        return {"axis": self.axis, "level": self.level, "requests": self.requests,
                "filler_requests_max": self.fillers, "choices_per_request": self.choices,
                "prompt_tokens_per_request": plan.prompt_tokens,
                "completion_tokens_per_request_max": plan.completion_tokens,
                "cost_usd_max": plan.total_usd}


@dataclass
class Count:
    rows: list[LevelCount] = field(default_factory=list)

    @property
    def requests(self) -> int:
        return sum(r.requests for r in self.rows)

    @property
    def fillers(self) -> int:
        return sum(r.fillers for r in self.rows)

    @property
    def cost_usd(self) -> float | None:
        costs = [r.cost.total_usd for r in self.rows]
        return None if any(c is None for c in costs) else sum(costs)

    def to_dict(self) -> dict[str, Any]:
        first = self.rows[0].cost if self.rows else None
        return {"dry_run": True, "levels": [r.to_dict() for r in self.rows],
                "requests": self.requests, "filler_requests_max": self.fillers,
                "requests_total_max": self.requests + self.fillers, "cost_usd_max": self.cost_usd,
                "model": first.model if first else None,
                "tokenizer": first.tokenizer if first else None,
                "price_per_million": dataclasses.asdict(first.price) if first and first.price else None}


def count(matrix: Matrix, prices: Path | None = None) -> Count:
    """Every request the matrix sends, as ``run --dry-run`` counts a run's: each warm-up,
    each target request, and at most the fillers the load axis may start."""
    from detaudit.cost import plan_run

    probe, config, result = matrix.probe, matrix.config, Count()
    for axis in matrix.axes:
        if matrix.layout(axis).warmup:
            result.rows.append(LevelCount(axis.name, axis_defs.WARMUP_GROUP, 1, 0, 1,
                                          plan_run(probe, config, 1, prices)))
        for level in axis.levels:
            sent = axis_defs.level_probe(axis, level, probe, matrix.per_level - 1,
                                         (matrix.nonce, matrix.nonce_run))
            requests = axis_defs.requests_per_level(level, matrix.per_level, probe)
            fillers = 0
            if level.fillers and not matrix.local:
                sent = dataclasses.replace(axis_defs.load_probe_for(sent, level), kind="load-sweep")
                fillers = matrix.per_level * load_sweep.fillers_per_target(sent, level.fillers)
            plan = plan_run(sent, config, requests, prices, fillers)
            choices = level.choices if level.choices > 1 and not axis_defs.sampled(probe) else 1
            if choices > 1 and plan.completion_tokens is not None:
                plan = dataclasses.replace(plan, completion_tokens=plan.completion_tokens * level.choices)
            result.rows.append(LevelCount(axis.name, level.label, requests, fillers, choices, plan))
    return result


def check_budget(counted: Count, max_cost: float) -> None:
    """Refuse (``UsageProblem``) a matrix whose estimate exceeds ``max_cost`` USD: half an
    axis answers nothing, so nothing is sent."""
    from detaudit.cost import PriceError

    try:
        for row in counted.rows:
            row.cost.affordable(max_cost)  # no price known: PriceError says how to give one
    except PriceError as exc:
        raise UsageProblem(str(exc)) from None
    total = counted.cost_usd or 0.0
    if total > max_cost:
        raise UsageProblem(f"--max-cost {max_cost:g} USD: this matrix may cost up to {total:.6g} USD "
                           f"({counted.requests:,} requests and at most {counted.fillers:,} fillers); "
                           "lower --n, measure fewer --axes, or raise --max-cost")


# --- sending ---------------------------------------------------------------------------------

def execute(matrix: Matrix, out: Path, *, timeout: float = DEFAULT_REQUEST_TIMEOUT_S,
            max_attempts: int = 5, progress: "Console | None" = None,
            command: list[str] | None = None, quiet: bool = True) -> tuple[Path, dict[str, Any]]:
    """Send every axis run and return (the matrix folder, its summary); the summary is
    also written to ``matrix.json`` after each axis, so an interrupted matrix keeps what
    it measured. An axis run that failed (endpoint down, bad key) raises ``RunFailed``."""
    session.check_out(out)
    folder = out / ("matrix-" + new_run_id(matrix.probe.name, matrix.config["model"]))
    try:
        folder.mkdir(parents=True)
    except OSError as exc:
        raise UsageProblem(f"{folder}: cannot create the matrix folder ({exc.strerror}); check --out") from None
    data = _summary_head(matrix, folder)
    try:
        for axis in matrix.axes:
            data["axes"].append(_measure(matrix, axis, folder, timeout, max_attempts, progress,
                                         command, quiet))
            _write(folder, data)
        data["matrix"]["status"] = "complete"
    except RunFailed:
        data["matrix"]["status"] = "failed"
        raise
    except BaseException:
        data["matrix"]["status"] = "interrupted"
        raise
    finally:
        data["matrix"]["ended_at"] = utc_now()
        data["varies"] = [a["axis"] for a in data["axes"] if a["varies"]]
        _write(folder, data)
    return folder, data


def _summary_head(matrix: Matrix, folder: Path) -> dict[str, Any]:
    config = matrix.config
    return {"matrix": {"id": folder.name, "dir": str(folder), "status": "running",
                       "probe": matrix.probe.name, "request": matrix.probe.request,
                       "backend": config, "per_level": matrix.per_level,
                       "nonce": matrix.nonce, "nonce_run": matrix.nonce_run,
                       "started_at": utc_now(), "ended_at": None},
            "axes": [], "varies": []}


def _axis_config(matrix: Matrix, axis: Axis) -> dict[str, Any]:
    """The backend config of an axis run: in process, engine slots for its largest batch,
    and the prefix cache on for the cache axis."""
    config = dict(matrix.config)
    if matrix.local:
        sizes = {1} | {level.batch["size"] * level.choices for level in axis.levels}
        config["batch_sizes"] = sorted(sizes)
        if axis.name == "cache":
            config["prefix_cache"] = True
    return config


def _measure(matrix: Matrix, axis: Axis, folder: Path, timeout: float, max_attempts: int,
             progress: "Console | None", command: list[str] | None, quiet: bool) -> dict[str, Any]:
    from detaudit.analysis.invariance import compare_levels

    layout = matrix.layout(axis)
    prepared = session.Prepared(matrix.probe, _axis_config(matrix, axis), layout.total)
    record = {"axis": axis.name, "levels": axis.labels, "layout": layout.to_dict(),
              "settings": [dataclasses.asdict(level) for level in axis.levels]}
    if axis.name == "cache":
        record.update(nonce=matrix.nonce, nonce_run=matrix.nonce_run)
    store, inner, _ = session.start(prepared, folder, concurrency=1, timeout=timeout,
                                    max_attempts=max_attempts, command=command or ["detaudit", "matrix"],
                                    run_id=axis.name, matrix=record)
    try:
        backend = AxisBackend(inner, axis, layout, matrix.local, (matrix.nonce, matrix.nonce_run),
                              sweep=_sweep(matrix, axis, inner))
        if not quiet:
            stderr.print(f"[bold]{axis.name}[/] ({' vs '.join(axis.labels)}): {layout.total:,} samples",
                         highlight=False)
        result = session.execute(matrix.probe, backend, store, layout.total, 1, max_attempts, progress)
        if result.status == "failed":
            raise RunFailed(f"the {axis.name} axis failed: {result.reason}; what was measured is "
                            f"in {folder}")
        units = ({i: layout.locate(i)[1] for i in range(layout.total)}
                 if axis.name == "cache" else None)
        verdict = compare_levels(session.frames_of(store), axis.name, axis.labels,
                                 [level.group(axis.name) for level in axis.levels],
                                 positions=1 if axis.name == "max-tokens" else None, units=units)
        facts = {"run": str(store.path), "samples": layout.total}
        if store.manifest.get("fillers"):
            facts["fillers"] = store.manifest["fillers"]
        return {**verdict.to_dict(), **facts}
    finally:
        store.close()


def _sweep(matrix: Matrix, axis: Axis, inner: Any) -> Any:
    """The load axis against an endpoint: fillers held by a load sweep over ``inner``."""
    if axis.name != "load" or matrix.local:
        return None
    level = axis.levels[1]
    probe = axis_defs.load_probe_for(matrix.probe, level)
    caps = [0, matrix.per_level * load_sweep.fillers_per_target(probe, level.fillers)]
    return load_sweep.HttpLoadSweep(inner, probe, matrix.per_level, caps)


def _write(folder: Path, data: dict[str, Any]) -> None:
    path = folder / SUMMARY
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(data, indent=2, ensure_ascii=False, allow_nan=False) + "\n",
                         encoding="utf-8")
    temporary.replace(path)


def read(folder: str | Path) -> dict[str, Any]:
    """The summary of a stored matrix (``matrix.json``)."""
    path = Path(folder) / SUMMARY
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        from detaudit.store import StoreError

        raise StoreError(f"{folder}: not a detaudit matrix folder (cannot read {SUMMARY}: "
                         f"{exc.strerror})") from None


def exit_code(data: dict[str, Any]) -> int:
    """0 when every axis has a verdict, 1 when one has a level without data."""
    return 1 if any(a["varies"] is None for a in data["axes"]) else 0


__all__ = ["Matrix", "prepare", "count", "check_budget", "execute", "read", "exit_code"]
