"""The client processes' allocator: mimalloc preloaded by default, glibc's on request."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fl_app.allocator import DEFAULT, PURGE_DELAY_MS, mimalloc_library, process_env

ROOT = Path(__file__).resolve().parents[1]
ACTIVE = "from fl_app.allocator import active_allocator; print(active_allocator())"


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}


def test_the_default_is_mimalloc_from_its_package() -> None:
    library = mimalloc_library()
    assert DEFAULT == "mimalloc" and library is not None and library.name == "libmimalloc.so" and library.is_file()
    assert process_env() == {"LD_PRELOAD": str(library), "MIMALLOC_PURGE_DELAY": str(PURGE_DELAY_MS)}
    assert process_env("glibc") == {}


@pytest.mark.subprocess
def test_an_unknown_allocator_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="allocator: 'jemalloc' is not one of mimalloc, glibc"):
        process_env("jemalloc")
    done = subprocess.run(
        [sys.executable, "-m", "fl_app.allocator", "--allocator", "tcmalloc"], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode != 0 and "'tcmalloc' is not one of" in done.stderr


@pytest.mark.subprocess
def test_a_process_started_with_the_env_runs_mimalloc_and_one_without_runs_glibc() -> None:
    def active(env: dict[str, str]) -> str:
        done = subprocess.run([sys.executable, "-c", ACTIVE], cwd=ROOT, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    assert active({**_clean_env(), **process_env()}) == "mimalloc"
    assert active(_clean_env()) == "glibc"


@pytest.mark.subprocess
def test_the_shell_lines_start_node_evaluates_preload_mimalloc() -> None:
    script = f'eval "$({sys.executable} -m fl_app.allocator)"; exec {sys.executable} -c "{ACTIVE}"'
    done = subprocess.run(["bash", "-c", script], cwd=ROOT, env=_clean_env(), capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "mimalloc", done.stderr
    glibc = subprocess.run(
        [sys.executable, "-m", "fl_app.allocator", "--allocator", "glibc"], cwd=ROOT, capture_output=True, text=True
    )
    assert glibc.returncode == 0 and glibc.stdout == ""


@pytest.mark.subprocess
def test_the_end_of_message_release_gives_mimallocs_freed_pages_back() -> None:
    """Under mimalloc freed pages stay mapped for MIMALLOC_PURGE_DELAY; a step's release leaves them (they
    are reused by the next step), the worker's forced release after each message gives them back."""
    script = """
import torch
from fl_app.metrics import release_freed_memory
def rss():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS")) / 1024
base = rss()
blocks = [torch.ones(1_000_000 * (1 + i % 7)) for i in range(40)]  # 4-28 MB each, ~600 MB
del blocks
freed = rss() - base
assert release_freed_memory()
stepped = rss() - base
release_freed_memory(force=True)
print(freed, stepped, rss() - base)
"""
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env={**_clean_env(), **process_env()}, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    freed, stepped, released = map(float, done.stdout.split())
    assert freed > 400 and stepped > 400 and released < 50, (freed, stepped, released)
