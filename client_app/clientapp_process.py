"""Flower's ``flwr-clientapp``, started without the rest of its CLI package (0.6 s per message).

    python client_app/clientapp_process.py ARGS      # ARGS: flwr-clientapp's own

Flower's SuperExec starts ``flwr-clientapp`` for every message. Its module sits in
``flwr.supernode.cli``, whose ``__init__`` also imports the whole SuperNode command: 0.6 of the
1.5 s a start takes on this machine. This loads the same module from its file, skipping that
``__init__``, and runs Flower's own ``flwr_clientapp()``: same arguments, same behaviour.
``scripts/start_node.sh`` puts it first on the SuperNode's PATH as ``flwr-clientapp``. It runs as
a script, not as ``client_app.…``, so the run's own ``client_app`` (from its FAB) is the one Flower
loads.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path

if sys.path and Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    del sys.path[0]  # run as a script: this folder's app.py, worker.py... must not shadow other modules

import flwr  # noqa: E402


def load_flwr_clientapp() -> Callable[[], None]:
    """Flower's ``flwr_clientapp`` entry point, its module loaded without ``flwr.supernode.cli``."""
    path = Path(flwr.__file__).parent / "supernode" / "cli" / "flwr_clientapp.py"
    spec = importlib.util.spec_from_file_location("flwr_clientapp_alone", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load Flower's flwr-clientapp from {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.flwr_clientapp


if __name__ == "__main__":
    sys.argv[0] = "flwr-clientapp"  # what Flower's exit handling looks for
    load_flwr_clientapp()()
