"""Every adversarial input of benchmarks/fuzz_inputs.py (nested JSON, zip bombs, huge lines,
wrong types, devices, pipes, broken links, a full disk...) ends in one clear line naming the
file, or in a skip count: in a child process under a memory limit and a time limit, with no
traceback, nothing left behind and a persona's dataset untouched. The inputs and the checks
live in the benchmark, so the test and the figures it prints can never drift apart."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _load_fuzz_inputs():
    spec = importlib.util.spec_from_file_location("fuzz_inputs", REPO / "benchmarks" / "fuzz_inputs.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


fuzz = _load_fuzz_inputs()


@pytest.mark.parametrize("name", list(fuzz.CASES))
def test_an_adversarial_input_ends_in_one_clear_line_or_a_skip(name, tmp_path):
    # RLIMIT_AS, /dev/full and /proc/self/fd are Linux's, where this project runs and is tested.
    assert sys.platform.startswith("linux") and Path("/dev/full").exists(), "the fuzz set needs Linux"
    result = fuzz.run_case(fuzz.CASES[name], tmp_path)
    assert result.problems == [], f"{name}: {result.problems} ({result.error_line})"
    assert result.outcome in ("error", "skip")
