"""detaudit: does an LLM give the same answer twice? Measure it, and show the fix.

    import detaudit
    run = detaudit.run(n=20)       # detaudit.api.run: a stored run
    run.summary()                  # the JSON summary of `detaudit run --json`
    run.samples()                  # pandas, one row per sample and tracked token
    detaudit.open_run("results/<run-id>")
    detaudit.matrix(axes="load,n")  # detaudit.api.matrix: one verdict per axis
    detaudit.crosscheck("results/<run-id>", reference="tiny")   # server vs teacher forcing

The names below are loaded on first use, so ``import detaudit`` (and ``detaudit --help``)
imports no pandas, scipy, torch or openai.
"""

__version__ = "0.1.0"

# public name -> the module that defines it
_LAZY = {
    "run": "detaudit.api", "open_run": "detaudit.api", "Run": "detaudit.api",
    "matrix": "detaudit.api", "open_matrix": "detaudit.api", "Matrix": "detaudit.api",
    "crosscheck": "detaudit.api",
    "UsageProblem": "detaudit.session", "RunFailed": "detaudit.runner",
    "StoreError": "detaudit.store", "ProbeError": "detaudit.probes",
}
__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'detaudit' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
