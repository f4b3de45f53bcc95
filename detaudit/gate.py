"""``detaudit gate``: probes against limits, for CI.

A config file lists checks (probe, n, concurrency or load levels) and limits::

    [endpoint]                     # flags --base-url / --model win over these
    base_url = "http://127.0.0.1:8000/v1"
    model = "tiny"

    [limits]                       # every check; a check's own [check.limits] wins
    max_distinct_logprobs = 1      # per tracked token
    max_clusters = 1               # per tracked token
    max_distinct_outputs = 1
    max_prob_range = 0.0           # max - min of the token's probability (0..1)
    max_error_rate = 0.0           # errors / n; above it the run failed (exit 1)
    # completion probes (greedy-divergence, fixed-seed, top-logprobs), per check:
    max_distinct_logprob_vectors = 1   # default: max_distinct_logprobs
    max_distinct_token_sequences = 1   # default: max_distinct_outputs

    [[check]]
    probe = "coin-flip"
    n = 20
    concurrency = 4

    [[check]]
    probe = "load-sweep"
    n = 5                          # per level
    levels = [0, 1, 4]

    [[check]]                      # a server without logprobs: text only
    probe = "greedy-divergence"    # (or --no-logprobs for every check)
    logprobs = false               # only max_distinct_outputs and max_error_rate apply

Exit codes: 0 within limits, 3 (``EXIT_NONDETERMINISTIC``) beyond them, 1 when a run
failed (endpoint down, errors over budget, NaN or infinite logprobs: bad data), 2 for
a bad config. This module parses, evaluates and writes (JSON summary, JUnit XML); the
CLI runs the probes.
"""

from __future__ import annotations

import math
import tomllib
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from detaudit.analysis import Analysis

EXIT_OK, EXIT_RUN_FAILED, EXIT_USAGE, EXIT_NONDETERMINISTIC = 0, 1, 2, 3
LIMIT_NAMES = ("max_distinct_logprobs", "max_clusters", "max_distinct_outputs",
               "max_prob_range", "max_error_rate", "max_distinct_logprob_vectors",
               "max_distinct_token_sequences")
_INT_LIMITS = {"max_distinct_logprobs", "max_clusters", "max_distinct_outputs",
               "max_distinct_logprob_vectors", "max_distinct_token_sequences"}
DETERMINISTIC = {"max_distinct_logprobs": 1, "max_clusters": 1, "max_distinct_outputs": 1,
                 "max_prob_range": 0.0, "max_error_rate": 0.0}
# Limits that, unless set themselves, take the value of another once every level
# (config [limits], [check.limits], flags) has been applied.
DERIVED_LIMITS = {"max_distinct_logprob_vectors": "max_distinct_logprobs",
                  "max_distinct_token_sequences": "max_distinct_outputs"}
_TOP_KEYS = {"endpoint", "limits", "check", "out", "threshold_pct"}
_ENDPOINT_KEYS = {"base_url", "model", "api_key_env", "kernels"}
_CHECK_KEYS = {"name", "probe", "n", "concurrency", "levels", "limits", "logprobs"}
DEFAULT_CHECK = {"probe": "coin-flip", "n": 20, "concurrency": 4}


class GateConfigError(ValueError):
    """A bad config file or limit flag; the message names the file and the key."""


@dataclass
class Check:
    name: str
    probe: str  # built-in name or a path (resolved against the config's folder)
    n: int | None = None  # per level for load-sweep probes
    concurrency: int | None = None
    levels: list[int] | None = None
    limits: dict[str, float] = field(default_factory=dict)
    logprobs: bool = True  # false: a text-only check (the probe asks for no logprobs)


@dataclass
class GateConfig:
    source: str
    checks: list[Check]
    endpoint: dict[str, str] = field(default_factory=dict)
    out: str | None = None
    threshold_pct: float | None = None


def load_config(path: Path | None, flag_limits: dict[str, float | None]) -> GateConfig:
    """The config (or, without a file, one coin-flip check), with the limit flags
    applied over every check's limits."""
    if path is None:
        config = GateConfig("(flags)", [Check(name="coin-flip", **{**DEFAULT_CHECK, "limits": dict(DETERMINISTIC)})])
    else:
        config = parse_config(_read(path), str(path), base_dir=path.parent)
    flags = _limits({k: v for k, v in flag_limits.items() if v is not None}, "command line", "--")
    for check in config.checks:
        check.limits = effective_limits({**check.limits, **flags})
    return config


def effective_limits(limits: dict[str, float]) -> dict[str, float]:
    """The limits with each derived limit that was not set filled from its source."""
    out = {**DETERMINISTIC, **limits}
    for key, source in DERIVED_LIMITS.items():
        out.setdefault(key, out[source])
    return out


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise GateConfigError(f"{path}: no such config file; write one (see detaudit gate "
                              "--help) or leave out --config") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise GateConfigError(f"{path}: cannot read it ({exc})") from None


def parse_config(text: str, source: str, base_dir: Path = Path(".")) -> GateConfig:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise GateConfigError(f"{source}: not valid TOML ({exc})") from None
    _known(data, _TOP_KEYS, source, "")
    endpoint = _table(data, "endpoint", source)
    _known(endpoint, _ENDPOINT_KEYS, source, "endpoint.")
    for key, value in endpoint.items():
        if not isinstance(value, str) or not value:
            raise GateConfigError(f"{source}: endpoint.{key}: must be a non-empty string")
    if endpoint.get("kernels") not in (None, "batch-invariant", "default"):
        raise GateConfigError(f"{source}: endpoint.kernels: use batch-invariant or default")
    base = {**DETERMINISTIC, **_limits(_table(data, "limits", source), source, "limits.")}
    raw_checks = data.get("check", [])
    if not isinstance(raw_checks, list) or not all(isinstance(c, dict) for c in raw_checks):
        raise GateConfigError(f"{source}: check: write each check as a [[check]] table")
    if not raw_checks:
        raise GateConfigError(f"{source}: no [[check]] tables; add one, e.g.\n"
                              '  [[check]]\n  probe = "coin-flip"\n  n = 20')
    checks = [_check(c, i, source, base, base_dir) for i, c in enumerate(raw_checks)]
    names = [c.name for c in checks]
    if len(set(names)) != len(names):
        raise GateConfigError(f"{source}: check names must differ ({names}); set name = ... on each")
    out = data.get("out")
    if out is not None and not isinstance(out, str):
        raise GateConfigError(f"{source}: out: must be a folder path (a string)")
    threshold = data.get("threshold_pct")
    if threshold is not None and (not _is_number(threshold) or threshold < 0):
        raise GateConfigError(f"{source}: threshold_pct: must be a number >= 0 (percentage points)")
    return GateConfig(source, checks, dict(endpoint), out, threshold)


def _check(data: dict, i: int, source: str, base: dict, base_dir: Path) -> Check:
    where = f"check[{i}]."
    _known(data, _CHECK_KEYS, source, where)
    probe = data.get("probe")
    if not isinstance(probe, str) or not probe:
        raise GateConfigError(f"{source}: {where}probe: missing; name a built-in probe "
                              "(detaudit probes) or a .toml file")
    if probe.endswith(".toml") and not Path(probe).is_absolute():
        probe = str(base_dir / probe)
    for key in ("n", "concurrency"):
        value = data.get(key)
        if value is not None and not (_is_int(value) and value >= 1):
            raise GateConfigError(f"{source}: {where}{key}: must be a positive integer")
    levels = data.get("levels")
    if levels is not None and (not isinstance(levels, list) or not levels
                               or not all(_is_int(v) and v >= 0 for v in levels)):
        raise GateConfigError(f"{source}: {where}levels: must be a non-empty list of "
                              "non-negative integers, e.g. [0, 1, 4]")
    name = data.get("name", Path(probe).stem if probe.endswith(".toml") else probe)
    if not isinstance(name, str) or not name:
        raise GateConfigError(f"{source}: {where}name: must be a non-empty string")
    own = _limits(_table(data, "limits", source, where), source, where + "limits.")
    logprobs = data.get("logprobs", True)
    if not isinstance(logprobs, bool):
        raise GateConfigError(f"{source}: {where}logprobs: must be true or false (false: text only, "
                              "for a server without logprobs)")
    return Check(name=name, probe=probe, n=data.get("n"), concurrency=data.get("concurrency"),
                 levels=levels, limits={**base, **own}, logprobs=logprobs)


def _limits(table: dict, source: str, where: str) -> dict[str, float]:
    out = {}
    for key, value in table.items():
        shown = f"{where}{key}" if where != "--" else "--" + key.replace("_", "-")
        if key not in LIMIT_NAMES:
            raise GateConfigError(f"{source}: {shown}: not a limit; use one of {', '.join(LIMIT_NAMES)}")
        if key in _INT_LIMITS:
            if not (_is_int(value) and value >= 1):
                raise GateConfigError(f"{source}: {shown}: must be an integer >= 1 (1 = deterministic)")
        elif not (_is_number(value) and 0 <= value <= 1):
            raise GateConfigError(f"{source}: {shown}: must be a number from 0 to 1")
        out[key] = value
    return out


def _table(data: dict, key: str, source: str, where: str = "") -> dict:
    value = data.get(key, {})
    if not isinstance(value, dict):
        raise GateConfigError(f"{source}: {where}{key}: must be a table ([{key}])")
    return value


def _known(data: dict, allowed: set[str], source: str, where: str) -> None:
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise GateConfigError(f"{source}: {where}{unknown[0]}: unknown key; allowed here: "
                              f"{', '.join(sorted(allowed))}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


# ---- evaluation ---------------------------------------------------------------------------


@dataclass
class CheckResult:
    name: str
    probe: str
    status: str  # pass | fail (beyond limits) | error (the run failed)
    limits: dict[str, float]
    measured: dict[str, Any] = field(default_factory=dict)
    exceeded: list[dict[str, Any]] = field(default_factory=list)
    message: str = ""
    run_dir: str | None = None
    elapsed_s: float = 0.0
    groups: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "probe": self.probe, "status": self.status,
                "message": self.message, "run_dir": self.run_dir,
                "elapsed_s": round(self.elapsed_s, 3), "limits": self.limits,
                "measured": self.measured, "exceeded": self.exceeded, "groups": self.groups}


def evaluate(check: Check, analysis: Analysis, run_dir: str | None = None,
             run_failure: str | None = None, elapsed_s: float = 0.0) -> CheckResult:
    """Compare one run's analysis with the check's limits."""
    measured, worst = measure(analysis)
    limits = effective_limits(check.limits)
    result = CheckResult(check.name, check.probe, "pass", limits, measured,
                         run_dir=run_dir, elapsed_s=elapsed_s, groups=_groups(analysis))
    error_rate = measured["error_rate"]
    if run_failure or analysis.ok == 0:
        result.status = "error"
        result.message = run_failure or f"no request succeeded ({analysis.errors} errors)"
        return result
    if error_rate > limits["max_error_rate"]:
        result.status = "error"
        kinds = ", ".join(f"{k}: {v}" for k, v in analysis.errors_by_kind.items())
        result.message = (f"errors over budget: {analysis.errors} of {analysis.n} requests failed "
                          f"({error_rate:.1%} > max_error_rate {limits['max_error_rate']:g}; {kinds})")
        return result
    bad = analysis.bad_logprobs
    if bad["samples"]:
        result.status = "error"
        result.message = (f"bad data: {bad['values']} NaN or infinite logprob(s) in "
                          f"{bad['samples']} of {analysis.ok} samples; such a server cannot be "
                          "measured (see detaudit report on the run folder)")
        return result
    for key, value in (("max_distinct_logprobs", measured["distinct_logprobs"]),
                       ("max_clusters", measured["clusters"]),
                       ("max_distinct_outputs", measured["distinct_outputs"]),
                       ("max_prob_range", measured["prob_range"]),
                       ("max_distinct_token_sequences", measured["distinct_token_sequences"]),
                       ("max_distinct_logprob_vectors", measured["distinct_logprob_vectors"])):
        limit = limits[key]
        if value is not None and value > limit:
            result.exceeded.append({"limit": key, "max": limit, "measured": value,
                                    "over": value - limit, "where": worst.get(key)})
    if result.exceeded:
        result.status = "fail"
        result.message = "; ".join(_describe(e) for e in result.exceeded)
        varying = [g["group"] for g in result.groups if _varies(g)]
        if varying:
            result.message += f" (varies at {', '.join(varying)})"
    else:
        result.message = "within limits"
    return result


def measure(analysis: Analysis) -> tuple[dict[str, Any], dict[str, str]]:
    """The figures the limits apply to, and which token is the worst for each."""
    tokens = analysis.tokens
    worst: dict[str, str] = {}

    def top(key: str, value_of) -> Any:
        values = [(value_of(t), t.label) for t in tokens if not _nan(value_of(t))]
        if not values:
            return None
        value, label = max(values, key=lambda v: v[0])
        worst[key] = label
        return value

    d = analysis.divergence
    if d is not None and d.first_difference is not None:
        worst["max_distinct_logprob_vectors"] = f"position {d.first_difference}"
    if d is not None and d.min_position is not None:
        worst["max_distinct_token_sequences"] = f"position {d.min_position}"
    measured = {
        "n": analysis.n, "ok": analysis.ok, "errors": analysis.errors,
        "error_rate": analysis.errors / analysis.n if analysis.n else 0.0,
        "distinct_logprobs": top("max_distinct_logprobs", lambda t: t.distinct_logprobs),
        "clusters": top("max_clusters", lambda t: len(t.clusters)),
        "distinct_outputs": analysis.outputs_distinct,
        "prob_range": top("max_prob_range", lambda t: t.prob.range),
        "distinct_token_sequences": d.distinct_token_sequences if d is not None else None,
        "distinct_logprob_vectors": d.distinct_logprob_vectors if d is not None else None,
        "first_difference": d.first_difference if d is not None else None,
        "bad_logprobs": analysis.bad_logprobs["values"],
        "deterministic": analysis.deterministic,
        "logprobs": analysis.logprobs,  # not_requested / not_returned: text only
        "tar_raw": _number_or_none(analysis.agreement.tar_raw if analysis.agreement else None),
        "tar_answer": _number_or_none(analysis.agreement.tar_answer if analysis.agreement else None),
        "tokens": {t.label: {"distinct_logprobs": t.distinct_logprobs, "clusters": len(t.clusters),
                             "prob_range": None if _nan(t.prob.range) else t.prob.range}
                   for t in tokens},
    }
    return measured, worst


_GROUP_VECTOR_KEYS = ("distinct_token_sequences", "distinct_logprob_vectors", "first_difference")


def _groups(analysis: Analysis) -> list[dict[str, Any]]:
    """Per group: what varied there, and for completions the first differing position."""
    return [{"group": g["group"], "n": g["n"], "distinct_outputs": g["distinct_outputs"],
             **{k: g[k] for k in _GROUP_VECTOR_KEYS if k in g},
             "tokens": [{"label": t["label"], "distinct_logprobs": t["distinct_logprobs"]}
                        for t in g["tokens"]]} for g in analysis.groups]


def _varies(group: dict[str, Any]) -> bool:
    return (group["distinct_outputs"] > 1 or group.get("distinct_token_sequences", 1) > 1
            or group.get("distinct_logprob_vectors", 1) > 1
            or any(t["distinct_logprobs"] > 1 for t in group["tokens"]))


def _describe(e: dict[str, Any]) -> str:
    where = f" ({e['where']})" if e.get("where") else ""
    if e["limit"] == "max_prob_range":
        return (f"{e['limit']} {e['max']:g} exceeded{where}: probability range "
                f"{e['measured']:.3g}, over by {e['over']:.3g}")
    return f"{e['limit']} {e['max']:g} exceeded{where}: {e['measured']} measured, over by {e['over']}"


def _number_or_none(value: Any) -> Any:
    return None if _nan(value) else value


def _nan(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


# ---- outputs ------------------------------------------------------------------------------


def exit_code(results: list[CheckResult]) -> int:
    if any(r.status == "error" for r in results):
        return EXIT_RUN_FAILED
    if any(r.status == "fail" for r in results):
        return EXIT_NONDETERMINISTIC
    return EXIT_OK


def summary(results: list[CheckResult], source: str) -> dict[str, Any]:
    code = exit_code(results)
    status = {EXIT_OK: "pass", EXIT_NONDETERMINISTIC: "fail", EXIT_RUN_FAILED: "error"}[code]
    return {"gate": {"status": status, "exit_code": code, "config": source,
                     "passed": sum(r.status == "pass" for r in results),
                     "failed": sum(r.status == "fail" for r in results),
                     "errors": sum(r.status == "error" for r in results),
                     "checks": [r.to_dict() for r in results]}}


def junit_xml(results: list[CheckResult], suite: str = "detaudit gate") -> str:
    """One testcase per check: <failure> beyond limits, <error> when the run failed."""
    root = ET.Element("testsuites", name=suite)
    cases = ET.SubElement(root, "testsuite", name=suite, tests=str(len(results)),
                          failures=str(sum(r.status == "fail" for r in results)),
                          errors=str(sum(r.status == "error" for r in results)),
                          time=f"{sum(r.elapsed_s for r in results):.3f}")
    for r in results:
        case = ET.SubElement(cases, "testcase", classname=f"detaudit.{r.probe}", name=r.name,
                             time=f"{r.elapsed_s:.3f}")
        if r.status == "fail":
            ET.SubElement(case, "failure", message=r.message, type="nondeterministic").text = \
                "\n".join(_describe(e) for e in r.exceeded) + _run_line(r)
        elif r.status == "error":
            ET.SubElement(case, "error", message=r.message, type="run_failed").text = \
                r.message + _run_line(r)
        else:
            ET.SubElement(case, "system-out").text = f"within limits {r.limits}" + _run_line(r)
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def _run_line(r: CheckResult) -> str:
    return f"\nrun folder: {r.run_dir} (detaudit report {r.run_dir})" if r.run_dir else ""
