"""Exit 0 if a run finished: its log (``flwr run --stream``'s output) names the run's results.json
and that file says "finished"; else exit 1 saying why. flwr run itself exits 0 when the ServerApp
fails, and its stream can end before the run does. Used by scripts/flwr_run.sh and
scripts/deploy_local.sh (which also names the run config, whose out-dir holds results.json).

    python scripts/run_finished.py LOG [RUN_CONFIG_TOML]
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import tomllib


def results_path(log: str, run_config: Path | None) -> Path | None:
    """The results.json the run's last line names, else the run config's out-dir's (if it sets one)."""
    written = re.findall(r"\[hosl\] results written to (.+)", log)
    if written:
        return Path(written[-1].strip())
    if run_config is not None and run_config.is_file():
        out = tomllib.loads(run_config.read_text()).get("out-dir")
        return Path(out) / "results.json" if out else None
    return None


def why_not_finished(log: str, run_config: Path | None = None) -> str | None:
    """None if the run finished, else one line saying why not (or why it cannot be told)."""
    errors = re.findall(r"\[hosl\] error: .*", log)
    path = results_path(log, run_config)
    if path is not None and path.exists():
        try:
            status = json.loads(path.read_text()).get("status")
        except (OSError, ValueError) as err:
            return f"the run's {path} cannot be read: {err}"
        return None if status == "finished" else f"the run did not finish: {path} says status {status!r}"
    if errors:
        return f"the run failed: {errors[-1]}"
    if "Exit Code:" in log or "Traceback" in log:
        return "the run failed: the ServerApp raised (its traceback is above)"
    return (
        "the log ended before the run's last line ('[hosl] results written to ...'): it may still be running or "
        "have failed; `flwr ls` and `flwr log <run id>` say which, its results.json's status whether it finished"
    )


def main(argv: list[str]) -> int:
    config = Path(argv[1]) if len(argv) > 1 else None
    reason = why_not_finished(Path(argv[0]).read_text(errors="replace"), config)
    if reason is not None:
        print(f"[hosl] {reason}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
