"""One home per shared default and rule (detaudit/defaults.py): every user agrees with it."""

from __future__ import annotations

import copy

import pytest

from detaudit import load as load_sweep
from detaudit import session
from detaudit.commands import run as run_cmd
from detaudit.commands import serve as serve_cmd
from detaudit.defaults import DEFAULT_BATCH_SIZES, KERNEL_IMPLS, KERNEL_MODES, is_local_model
from detaudit.probes import load_probe


def test_load_configure_leaves_its_config_alone():
    probe = load_probe("load-sweep")
    config = session.backend_config(None, None, None, "OPENAI_API_KEY", None, None)
    before = copy.deepcopy(config)
    _, configured, n = load_sweep.configure(probe, config, "0,2,5", None, 3)
    assert config == before and config["batch_sizes"] == list(DEFAULT_BATCH_SIZES)
    assert configured["batch_sizes"] == [1, 3, 6] and n == 9


def test_is_local_model(tmp_path):
    assert is_local_model(None) and is_local_model("tiny") and is_local_model(str(tmp_path))
    assert not is_local_model("gpt-4o") and not is_local_model(str(tmp_path / "missing"))
    # the backend choice uses that rule, and a URL always means a server
    assert session.backend_config(None, str(tmp_path), None, "K", None, None)["backend"] == "local"
    assert session.backend_config(None, "tiny", "http://127.0.0.1:9/v1", "K", None, None)["backend"] == "openai"


def test_every_kernel_choice_is_the_engines_list():
    from local_backend import kernels  # the engine's own check of a mode (imports torch)

    assert kernels.MODES == KERNEL_MODES and kernels.IMPLEMENTATIONS == KERNEL_IMPLS
    assert [k.value for k in run_cmd.Kernels] == list(KERNEL_MODES)
    assert [k.value for k in serve_cmd.Kernels] == list(KERNEL_MODES)
    assert [k.value for k in run_cmd.KernelImpl] == list(KERNEL_IMPLS)


def test_gate_config_kernels_are_checked_against_the_same_names(tmp_path):
    from detaudit.gate import GateConfigError, parse_config

    with pytest.raises(GateConfigError, match="use batch-invariant or default"):
        parse_config('[endpoint]\nkernels = "fast"\n', "detaudit.toml", base_dir=tmp_path)
