"""docs/results.md is what `python -m benchmarks.results` builds from the reports in docs/results/: each
report under its command with its stamp and plots, headlines computed from the reports' JSON, and
reports not written yet named as such."""

from pathlib import Path

from benchmarks.report import write_report
from benchmarks.results import SECTIONS, accuracy_headline, build

DOCS = Path(__file__).resolve().parents[2] / "docs"


def test_shipped_results_md_is_the_generators_output():
    assert (DOCS / "results.md").read_text() == build(DOCS), "docs/results.md is stale: python -m benchmarks.results"


def test_sections_carry_their_report_stamp_plots_and_computed_headline(tmp_path):
    rows = {
        task: {
            "runs": {
                mode: [{"test": acc + 0.01 * s} for s in range(3)]
                for mode, acc in {"zero-shot": 0.5, "fo-fo": fo, "hosl": hosl, "zo-zo": 0.55}.items()
            }
        }
        for task, fo, hosl in (("sst2", 0.80, 0.78), ("rte", 0.60, 0.61))
    }
    write_report(
        tmp_path / "results" / "accuracy", "# Title\n\nBody, plot `accuracy_test.png`.\n\n## Sub\n\n| a |\n|---|", rows
    )
    (tmp_path / "results" / "accuracy_test.png").write_bytes(b"png")
    text = build(tmp_path)
    assert "hosl - fo-fo is between -2.0 and +1.0" in text and "hosl - zo-zo between +6.0 and +23.0" in text
    at = [s.stem for s in SECTIONS].index("accuracy")
    own = text[text.index("## " + SECTIONS[at].title) : text.index("## " + SECTIONS[at + 1].title)]
    assert f"Reproduce: `{SECTIONS[at].command}`" in own and "### Sub" in own and "# Title" not in own
    assert "![accuracy_test.png](results/accuracy_test.png)" in own and "Measured at commit" in own
    for section in SECTIONS[:at] + SECTIONS[at + 1 :]:
        assert f"Not measured yet: `{section.command}` writes `docs/results/{section.stem}.md`" in text

    tuning = next(s for s in SECTIONS if s.stem == "tuning")
    write_report(
        tmp_path / "results" / "tuning",
        "# Tuning\n\nBody.",
        {"study": {}},
        "python -m benchmarks.tune_compare --seeds 0",
    )
    text = build(tmp_path)  # a report that records its own command is reproduced by that command
    assert "Reproduce: `python -m benchmarks.tune_compare --seeds 0` (report: `docs/results/tuning.md`)" in text
    assert f"Reproduce: `{tuning.command}`" not in text
    aggregate = {"rte": [{"run": "full", "test": [0.52, 0.53, 0.52]}]}  # a study that did not learn its task
    data = {"study": {}, "aggregate": aggregate, "constant_answer": {"rte": [0.527] * 3}}
    write_report(
        tmp_path / "results" / "tuning", "# Tuning\n\nBody.", data, "python -m benchmarks.tune_compare --seeds 0"
    )
    assert "**tuning**: Best constant answer (the test split's most common label, no model) on test: rte 52.7" in (
        build(tmp_path)
    )


def test_accuracy_headline_reports_gaps_only_where_a_mode_learned_the_task():
    rows = {
        task: {
            "majority": [majority] * 3,
            "runs": {
                mode: [{"test": acc + 0.01 * s} for s in range(3)]
                for mode, acc in {"zero-shot": 0.5, "fo-fo": fo, "hosl": hosl, "zo-zo": 0.55}.items()
            },
        }
        for task, majority, fo, hosl in (("sst2", 0.5, 0.80, 0.78), ("rte", 0.6, 0.60, 0.605))
    }
    line = accuracy_headline(rows)
    assert line.startswith("Over 2 task(s) (sst2, rte) and 3 seed(s)")  # a partial study says which tasks it covers
    assert "majority class (by more than 2 points and two standard errors) on sst2 (" in line
    assert "hosl - fo-fo is between -2.0 and -2.0" in line and "hosl - zo-zo between +23.0 and +23.0" in line
    assert "frozen bottom" not in line  # no control run
    rows["sst2"]["control"] = [{"test": 0.775 + 0.01 * s} for s in range(3)]
    line = accuracy_headline(rows)
    assert "hosl - frozen bottom, what hosl's ZO bottom adds to its server's training, is between +0.5 and +0.5" in line
    assert line.endswith("beyond two standard errors of zero on sst2.")  # the same +0.5 on every seed
    rows["sst2"]["control"][0]["test"] = 0.795  # seed 0 now -1.5 points: the gap is within the noise
    assert accuracy_headline(rows).endswith("between -0.2 and -0.2 points, beyond two standard errors of zero on none.")
    rows["sst2"]["majority"] = [0.9] * 3
    assert "on none" in accuracy_headline(rows) and "between" not in accuracy_headline(rows)
