"""The scaling study's sweep and report (benchmarks.scaling); its runs are in test_flower_apps."""

from benchmarks.scaling import MINILM, TINY, Point, busiest, plot, plot_virtual, sweep, table


def test_sweeps_cover_each_study_and_share_equal_runs():
    quick = sweep("quick")
    studies = {study for study, _ in quick}
    assert studies == {"clients", "partition"}
    assert len({p for _, p in quick}) < len(quick)  # IID personal at 16 clients serves both studies
    full = sweep("full")
    assert {"fraction", "concurrency", "clients-minilm", "partition-minilm"} <= {s for s, _ in full}
    assert max(p.clients for _, p in full if p.scenario == TINY) == 1024
    assert {p.alpha for s, p in full if s == "partition-minilm"} == {0.0, 1.0, 0.3, 0.1}
    assert [(p.clients, p.fraction) for _, p in sweep("10k")] == [(10_000, 0.1)]
    assert [(p.clients, p.rounds) for _, p in sweep("1k")] == [(1000, 1)]
    virtual = [p for _, p in sweep("virtual")]
    assert [(p.clients, p.supernodes) for p in virtual] == [(10_000, 10), (10_000, 20), (10_000, 50), (100_000, 20)]
    assert all(p.clients * p.fraction == 1000 for p in virtual)
    minilm = [p for _, p in sweep("minilm-1000")]
    assert {(p.clients, p.client_state) for p in minilm} == {(c, k) for c in (1, 1000) for k in ("weights", "seeds")}


def test_a_virtual_point_runs_its_clients_on_few_nodes_and_draws_data_beyond_the_task():
    point = Point(TINY, 100_000, fraction=0.01, rounds=3, nodes=20, client_state="seeds")
    got = dict(o.split("=", 1) for o in point.overrides("/tmp/x"))
    assert got["virtual-clients"] == "true" and got["client-state"] == "seeds" and point.supernodes == 20
    assert got["partition"] == "draw" and got["min-partition-size"] == "4" and int(got["n-train"]) <= 67_000
    assert point.key().endswith("-n20-seeds")
    plain = dict(o.split("=", 1) for o in Point(TINY, 64).overrides("/tmp/x"))
    assert plain["virtual-clients"] == "false" and plain["partition"] == "iid" and Point(TINY, 64).supernodes == 64


def test_a_point_changes_only_its_settings_and_scales_the_data_with_the_clients():
    got = dict(o.split("=", 1) for o in Point(TINY, 64, alpha=0.1, bottoms="synced").overrides("/tmp/x"))
    assert got["num-clients"] == "64" and got["n-train"] == "256" and got["partition"] == "dirichlet"
    assert got["dirichlet-alpha"] == "0.1" and got["bottoms"] == "synced" and got["max-concurrent-clients"] == "4"
    iid = dict(o.split("=", 1) for o in Point(MINILM, 4).overrides("/tmp/x"))
    assert iid["partition"] == "iid" and iid["n-train"] == "128"


def test_profile_summary_counts_each_function_once_per_stack():
    raw = "\n".join(
        [
            "main (server_app/app.py:10);flow (server_app/app.py:60);flow (server_app/app.py:61) 3",
            "worker (flwr/vce_api.py:122) 1",
            "idle (threading.py:1) 6",
        ]
    )
    summary = busiest(raw)
    shares = dict(summary["functions"])
    assert summary["samples"] == 10
    assert shares == {"main (server_app/app.py)": 0.3, "flow (server_app/app.py)": 0.3, "worker (flwr/vce_api.py)": 0.1}


def test_table_names_the_partition_and_formats_missing_figures():
    row = {
        "clients": 8,
        "supernodes": 8,
        "client_state": "weights",
        "client_state_bytes": 3 * 2**10,
        "state_seconds": 0.25,
        "clients_per_round": 8.0,
        "concurrency": 4,
        "alpha": 0.1,
        "bottoms": "personal",
        "seconds_per_round": 2.5,
        "steps_per_second": 3.2,
        "server_peak_rss": 2**30,
        "actor_peak_rss": 2**29,
        "client_step_peak": 2**20,
        "bytes_per_round": 3 * 2**20,
        "accuracy": [0.5, None],
        "test_accuracy": None,
        "dropped": 0,
    }
    line = table([row]).splitlines()[-1]
    assert "| Dirichlet 0.1 |" in line and "| 1024.0 |" in line and "| 0.500 / n/a |" in line
    assert line.endswith("| n/a | 3.0 | 0.250 | 0 |") and line.startswith("| 8 | 8 | weights |")
    assert "| drawn per client |" in table([{**row, "partition": "draw"}])


def test_plots_are_written_for_the_studies_present(tmp_path):
    def row(clients, alpha=0.0, bottoms="personal"):
        return {
            "model": "tiny",
            "clients": clients,
            "rounds": 2,
            "alpha": alpha,
            "bottoms": bottoms,
            "seconds_per_round": clients / 10,
            "steps_per_second": 5.0,
            "accuracy": [0.5, 0.6],
        }

    rows = {
        "clients": [row(1), row(16)],
        "partition": [row(16, a, b) for b in ("personal", "synced") for a in (0.0, 0.1)],
    }
    paths = plot(rows, tmp_path)
    assert [p.name for p in paths] == ["scaling_cost.png", "scaling_accuracy.png"]
    assert all(p.stat().st_size > 10_000 for p in paths)


def test_the_virtual_sizes_plot_each_runs_round_time_and_server_memory(tmp_path):
    row = {"clients": 10_000, "supernodes": 20, "client_state": "seeds", "seconds_per_round": 38.0}
    rows = {"a": [{**row, "server_peak_rss": 2**29}], "b": [{**row, "clients": 100_000, "server_peak_rss": 2**30}]}
    path = plot_virtual(rows, tmp_path / "scaling_virtual.png")
    assert path.read_bytes()[:4] == b"\x89PNG"
