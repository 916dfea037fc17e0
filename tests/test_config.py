"""The typed configuration: one definition of every key, validated once, frozen, readable flat."""

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fl_app.config import CHOICES, DEFAULTS, GROUPS, SETTINGS, Config, make_config, read_scenario


def test_every_key_is_one_typed_field_and_the_flat_view_round_trips():
    config = make_config({"zo-queries": "3", "client-lr": 2e-4, "mode": "fo-fo", "eval-test": "false"})
    assert (config.zo.queries, config.optim.client_lr, config.run.mode, config.eval.test) == (3, 2e-4, "fo-fo", False)
    assert config["zo-queries"] == 3 and set(config) == set(DEFAULTS) == set(SETTINGS)
    assert make_config(dict(config)) == config and config.updated({"zo-queries": 5}).zo.queries == 5
    assert config.client_order == "fo" and make_config().client_order == "zo"
    names = [(group, f.name) for group, cls in GROUPS.items() for f in dataclasses.fields(cls)]
    assert len(names) == len(SETTINGS)  # no key maps to two fields, no field lacks a key
    for key, (group, f) in SETTINGS.items():
        assert type(getattr(getattr(Config(), group), f.name)) is type(DEFAULTS[key])


def test_config_is_frozen_and_hashable():
    config = make_config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.zo.queries = 9
    assert hash(config) == hash(make_config()) and make_config({"seed": 1}) != config


@pytest.mark.parametrize("key", sorted(CHOICES))
def test_each_choice_key_refuses_a_value_outside_its_choices(key):
    with pytest.raises(ValueError, match=re.escape(f"config key '{key}' must be one of {CHOICES[key]!r}")):
        make_config({key: "nonsense"})


def test_the_choices_are_the_ones_the_modules_use():
    from fl_app.protocol import WIRE_DTYPES
    from fl_app.subset import SELECTORS
    from fl_app.trainable import PARAM_MODES
    from fl_app.zo import DIRECTIONS

    assert CHOICES["zo-directions"] is DIRECTIONS and CHOICES["subset-selector"] is SELECTORS
    assert CHOICES["client-params"] is CHOICES["server-params"] is PARAM_MODES
    assert tuple(WIRE_DTYPES) == CHOICES["wire-dtype"]


def test_resume_takes_a_boolean_or_a_run_folder():
    """resume = true in TOML (or Flower's --run-config) is a boolean; false turns it off."""
    assert make_config({"resume": True, "out-dir": "/runs/a"}).run.resume == "true"
    assert make_config({"resume": "false"}).run.resume == "" and make_config({"resume": False}).run.resume == ""
    assert make_config({"resume": "/runs/a"}).run.resume == "/runs/a"
    with pytest.raises(ValueError, match="'resume' = 'true' continues the run in 'out-dir', but out-dir is not set"):
        make_config({"resume": True})
    with pytest.raises(ValueError, match="a tuning study .* cannot be resumed"):
        make_config({"resume": "/runs/a", "tune-trials": 2})


@pytest.mark.subprocess
def test_every_key_has_help_and_hosl_config_keys_lists_them_all():
    from fl_app.config_cli import keys_markdown, keys_text

    assert all(f.metadata["help"].strip() for _, f in SETTINGS.values())
    text = keys_text()
    assert all(f"  {key} = " in text for key in DEFAULTS) and "[optim]" in text
    assert '  client-lr-schedule = "constant"   (constant, linear, cosine)' in text
    out = subprocess.run(
        [sys.executable, "-m", "fl_app.config_cli", "--keys"], capture_output=True, text=True, check=True
    ).stdout
    assert out == text
    shipped = (Path(__file__).resolve().parents[1] / "docs" / "reference" / "config.md").read_text()
    assert shipped == keys_markdown(), (
        "docs/reference/config.md is stale: hosl-config --markdown > docs/reference/config.md"
    )


def test_config_imports_nothing_from_fl_app_that_imports_it():
    """config.py sits at the bottom of fl_app: what it imports (outside its __main__ guard) must not import
    it back, directly or through others, so reading settings never pulls the library above them in."""
    import ast

    root = Path(__file__).resolve().parents[1]

    def fl_imports(module: str) -> set[str]:
        tree = ast.parse((root / (module.replace(".", "/") + ".py")).read_text())
        found = set()
        for node in tree.body:  # top level only: the __main__ guard's import is not walked
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("fl_app"):
                found.add(node.module)
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.startswith("fl_app")}
        return found

    seen, todo = set(), list(fl_imports("fl_app.config"))
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo += fl_imports(module)
    assert seen and "fl_app.config" not in seen, seen


@pytest.mark.parametrize(
    ("key", "value", "bound"),
    [
        ("stream-port", 70_000, "[0, 65535]"),  # not a port
        ("max-frame-mb", 4096, "[1, 2047]"),  # overflows gRPC's 32-bit message limit
        ("num-rounds", 10**12, "[1, 1e+06]"),  # a round list that exhausts memory
        ("zo-queries", 100_000, "[1, 256]"),  # frames no server accepts
        ("num-clients", 10**9, "[1, 1e+06]"),
        ("session-buffer-mb", 10**9, "[1, 1.04858e+06]"),
    ],
)
def test_numeric_keys_have_ranges_that_keep_a_run_possible(key, value, bound):
    with pytest.raises(ValueError, match=re.escape(f"config key '{key}' must be in {bound}, got {value}")):
        make_config({key: value})


@pytest.mark.parametrize("path", sorted(Path("sim_configs").glob("*.toml")), ids=lambda p: p.stem)
def test_every_shipped_scenario_is_a_valid_config(path):
    config = make_config(read_scenario(path))
    assert config.federation.num_clients >= 1 and config.data.task


@pytest.mark.parametrize(
    ("key", "value"), [("probe-messages", 10**9), ("round-timeout", 1e300), ("step-timeout", 1e12)]
)
def test_round_trips_and_timeouts_are_bounded(key, value):
    with pytest.raises(ValueError, match=key):
        make_config({key: value})
