"""benchmarks.deploy_rounds: a round's fixed cost is its wall time less its steps', counted as the
sessions ran (the longest with clients at once, all of them one at a time)."""

from benchmarks.deploy_rounds import fixed_seconds, report


def _results(window: int) -> dict:
    rounds = [
        {"seconds": 10.0, "step_seconds": {"sum": 4.0, "max": 3.0}},
        {"seconds": 6.0, "step_seconds": {"sum": 2.0, "max": 1.5}},
    ]
    return {"config": {"max-concurrent-clients": window}, "rounds": rounds}


def test_fixed_cost_subtracts_the_longest_session_when_clients_run_at_once_and_all_when_one_at_a_time():
    assert fixed_seconds(_results(2)) == [7.0, 4.5]
    assert fixed_seconds(_results(1)) == [6.0, 4.0]


def test_the_report_names_both_paths_their_ratio_and_whether_the_losses_agree():
    path = {"fixed_seconds": [20.0, 22.0], "round_seconds": [25.0, 27.0], "ordered_fixed_seconds": [30.0]}
    warm = {"fixed_seconds": [2.0, 2.2], "round_seconds": [7.0, 7.2], "ordered_fixed_seconds": [3.0]}
    found = {
        "scenario": "s.toml", "rounds": 2, "repeats": 1, "paths": {"cold": path, "warm": warm},
        "same_losses": False, "steps_compared": 12, "fixed_ratio_cold_to_warm": 10.0,
    }  # fmt: skip
    text = report(found)
    assert (
        "| cold | 25.0 / 27.0 | 20.0 / 22.0 | 21.0 | 30.0 |" in text
        and "| warm | 7.0 / 7.2 | 2.0 / 2.2 | 2.1 |" in text
    )
    assert "10.0x" in text and "(12 steps): DIFFERENT" in text
