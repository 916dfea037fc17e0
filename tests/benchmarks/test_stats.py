"""benchmarks.stats: both tests of a paired difference, each ± labelled SE or SD."""

import math

import pytest

from benchmarks import stats


def test_a_per_example_difference_has_its_standard_error_flips_and_mcnemar():
    a, b = [1, 1, 1, 0, 1, 0], [1, 0, 0, 0, 1, 1]
    got = stats.per_example(a, b)
    assert got["points"] == pytest.approx(100 / 6) and (got["gained"], got["lost"]) == (2, 1)
    assert got["se"] == pytest.approx(100 * 0.7527726527 / math.sqrt(6)) and got["p"] == pytest.approx(1.0)
    both = stats.pooled([a, a], [b, b])
    assert both["points"] == pytest.approx(got["points"]) and both["se"] < got["se"]  # pooling shrinks the SE


def test_the_seed_level_test_is_a_paired_t_with_n_minus_one_degrees_of_freedom():
    got = stats.over_seeds([-0.3, 1.5, 0.3])
    assert got["n"] == 3 and got["mean"] == pytest.approx(0.5)
    assert got["sd"] == pytest.approx(0.9165, abs=1e-4) and got["se"] == pytest.approx(0.9165 / math.sqrt(3), abs=1e-4)
    t = got["mean"] / got["se"]
    assert got["p"] == pytest.approx(1 - t / math.sqrt(t * t + 2))  # Student's t with 2 df in closed form
    assert stats.over_seeds([0.5])["p"] is None and stats.over_seeds([1.0, 1.0])["p"] is None
    assert stats.clears({"mean": 3.0, "se": 1.0}) and not stats.clears({"points": 1.9, "se": 1.0})
    assert not stats.clears(stats.over_seeds([2.0]))  # one seed has no standard error


def test_every_formatted_plus_minus_says_what_it_is():
    assert stats.fmt_sd([-0.5, -0.3]) == "-0.4 ± 0.1 SD" and stats.fmt_sd([0.25]) == "+0.2"
    seeds = stats.fmt_seeds(stats.over_seeds([-0.3, 1.5, 0.3]))
    assert seeds == "+0.5 ± 0.5 SE over 3 seeds (SD 0.9), paired t p 0.44"
    example = stats.fmt_per_example(stats.per_example([1, 0, 1], [0, 0, 1]))
    assert example.startswith("+33.3 ± 33.3 SE per example, flips +1 / -0")


def test_the_share_of_the_headroom_has_an_interval_that_widens_with_noise():
    share, low, high = stats.share_interval([0.5, 0.6, 0.4], [1.0, 1.1, 0.9])
    assert share == pytest.approx(0.5) and low < 0.5 < high
    _, low2, high2 = stats.share_interval([0.5, 1.5, -0.5], [1.0, 1.1, 0.9])
    assert high2 - low2 > high - low
    assert all(math.isnan(x) for x in stats.share_interval([0.5], [0.0]))
