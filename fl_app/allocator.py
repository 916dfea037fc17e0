"""The client process's memory allocator.

glibc's malloc serves a step's freed activations from its heap once its dynamic mmap threshold has
risen (up to 32 MiB), and the heap fragments: a SmolLM2 hosl client at 16 x 256 peaked 1.67x an
inference-only client. A fixed low threshold bounds the peak but maps every large block afresh
(+18-35 % step time); mimalloc (the ``cmeel-mimalloc`` package, preloaded) bounds it at glibc's speed
(``docs/results/client_allocator.md``). A client process's allocator is chosen when it starts, so
``scripts/start_node.sh`` starts a node's worker (and a cold node's ClientApp processes) with
:func:`process_env`; ``python -m fl_app.allocator`` prints it as shell ``export`` lines.
"""

from __future__ import annotations

import argparse
import ctypes
import shlex
import sys
from importlib import metadata
from pathlib import Path

ALLOCATORS = ("mimalloc", "glibc")
_LINUX = sys.platform.startswith("linux")  # preloading (LD_PRELOAD) is Linux's
DEFAULT = "mimalloc" if _LINUX else "glibc"
MIMALLOC_DIST = "cmeel-mimalloc"
# mimalloc gives freed pages back this long after they were freed (its default, 1 s, re-faults a
# SmolLM2 step's large blocks: ~10 % of its time); a worker gives them back after each message instead
PURGE_DELAY_MS = 10_000
try:  # the process's global symbols: mimalloc's when it was preloaded
    _MI_COLLECT = getattr(ctypes.CDLL(None), "mi_collect", None)
except (OSError, TypeError):  # no global symbol table to ask (Windows)
    _MI_COLLECT = None


def mimalloc_library() -> Path | None:
    """The installed ``libmimalloc.so`` (from the ``cmeel-mimalloc`` distribution), or None."""
    try:
        files = metadata.distribution(MIMALLOC_DIST).files or []
    except metadata.PackageNotFoundError:
        return None
    for file in files:
        if file.name == "libmimalloc.so":
            path = Path(file.locate()).resolve()
            if path.is_file():
                return path
    return None


def process_env(allocator: str = DEFAULT) -> dict[str, str]:
    """Environment variables that start a client process with ``allocator`` ({} for glibc's own)."""
    if allocator not in ALLOCATORS:
        raise ValueError(f"allocator: {allocator!r} is not one of {', '.join(ALLOCATORS)}")
    if allocator == "glibc":
        return {}
    if not _LINUX:
        raise ValueError(f"allocator: mimalloc is preloaded on Linux only (this is {sys.platform}); use glibc")
    library = mimalloc_library()
    if library is None:
        raise ValueError(f"allocator: mimalloc needs the {MIMALLOC_DIST} package (pip install {MIMALLOC_DIST})")
    return {"LD_PRELOAD": str(library), "MIMALLOC_PURGE_DELAY": str(PURGE_DELAY_MS)}


def active_allocator() -> str:
    """The allocator this process runs with: mimalloc if it was preloaded, else the C library's."""
    return "glibc" if _MI_COLLECT is None else "mimalloc"


def purge_mimalloc() -> bool:
    """Give mimalloc's freed pages back to the OS now (``mi_collect``); False if it is not this process's."""
    if _MI_COLLECT is None:
        return False
    _MI_COLLECT(ctypes.c_bool(True))
    return True


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--allocator", default=DEFAULT, help=f"one of {', '.join(ALLOCATORS)} (default {DEFAULT})")
    args = parser.parse_args(argv)
    try:
        env = process_env(args.allocator)
    except ValueError as err:
        raise SystemExit(str(err)) from None
    for key, value in env.items():
        print(f"export {key}={shlex.quote(value)}")


if __name__ == "__main__":
    main()
