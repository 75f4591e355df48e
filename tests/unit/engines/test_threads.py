"""Issue 13: the local engine gives torch the physical cores this process may use, and the knob is respected."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from aligner_core.engines.local.threads import default_threads, usable_cpus

ROOT = Path(__file__).resolve().parents[3]
SCRIPT = """
import os, sys, torch
sys.path.insert(0, {root!r})
if {pin}:
    os.sched_setaffinity(0, {{sorted(os.sched_getaffinity(0))[0]}})
torch.set_num_threads(8)  # what torch would pick on a big host
from tests.conftest import build_model, build_tokenizer
from aligner_core.engines.local import TransformersEngine
tok = build_tokenizer()
TransformersEngine(build_model(tok), tok)
print(torch.get_num_threads())
"""


def threads_after_engine(*, pin: bool, env: dict[str, str]) -> int:
    clean = {
        k: v
        for k, v in os.environ.items()
        if k not in {"OMP_NUM_THREADS", "MKL_NUM_THREADS", "ALIGNER_CPU_THREADS"}
    }
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT.format(root=str(ROOT), pin=pin)],
        capture_output=True,
        text=True,
        env={**clean, **env},
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    return int(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="CPU affinity is Linux-only")
def test_threads_follow_the_cpus_the_process_may_use():
    assert threads_after_engine(pin=True, env={}) == 1  # pinned to one CPU: one thread, not torch's 8


def test_the_knob_and_the_standard_variables_win():
    assert threads_after_engine(pin=False, env={"ALIGNER_CPU_THREADS": "3"}) == 3
    assert threads_after_engine(pin=False, env={"OMP_NUM_THREADS": "5"}) == 8  # the user's own choice stays


def test_the_default_is_within_what_the_process_may_use():
    assert 1 <= default_threads() <= usable_cpus()
