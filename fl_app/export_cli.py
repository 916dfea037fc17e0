"""hosl-export's command line: arguments are read, and their errors answered, before torch loads.

hosl-export RUN_DIR --out DIR [--client N | --synced] [--adapters | --merge] [--states DIR]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def parser() -> argparse.ArgumentParser:
    found = argparse.ArgumentParser(
        prog="hosl-export", description="What a user takes away from a run: the trained model in Hugging Face format."
    )
    found.add_argument("run_dir", type=Path, help="the run's folder (results.json, checkpoint.pt)")
    found.add_argument("--out", type=Path, required=True, help="a new (or empty) folder for the model")
    which = found.add_mutually_exclusive_group()
    which.add_argument("--client", type=int, help="export client N's personal bottom")
    which.add_argument("--synced", action="store_true", help="export the synced bottom")
    parts = found.add_mutually_exclusive_group()
    parts.add_argument("--adapters", action="store_true", help="LoRA runs: peft adapters only")
    parts.add_argument("--merge", action="store_true", help="LoRA runs: the merged model only (no adapters)")
    found.add_argument("--states", type=Path, help="where the clients' states are (default: RUN_DIR/clients/<run>)")
    return found


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    from fl_app.checkpoint import CheckpointRefused
    from fl_app.export import ExportError, export_run  # loads torch and transformers

    try:
        chosen = "adapters" if args.adapters else "model" if args.merge else "auto"
        out = export_run(args.run_dir.resolve(), args.out.resolve(), args.client, args.synced, args.states, chosen)
    except (ExportError, CheckpointRefused) as err:  # a client state that does not fit is refused by restore
        print(f"hosl-export: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"[hosl] exported to {out}")


if __name__ == "__main__":
    main()
