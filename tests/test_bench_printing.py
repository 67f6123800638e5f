"""The benchmark scripts' printing modes (--from RESULTS.json --markdown), which bench/tables.py runs to write
BENCHMARKS.md's tables: every printed figure is the results file's, and the derived columns are computed
from them."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
sys.path.insert(0, str(REPO / "bench"))


def _rows(text: str) -> list[list[str]]:
    """The body rows of a printed Markdown table, as lists of cells."""
    lines = [line for line in text.strip().splitlines() if line.startswith("|")]
    assert lines[1].startswith("|---")
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]


@pytest.mark.parametrize("name", ["step_latency_2026-12-01.json", "step_latency_2026-11-25.json"])
def test_step_latency_prints_a_results_files_runs(name, capsys):
    import step_latency

    results = json.loads((RESULTS / name).read_text())
    assert step_latency.main(["--from", str(RESULTS / name), "--markdown"]) == 0
    out = capsys.readouterr().out
    assert "{" not in out  # the table alone
    rows = _rows(out)
    assert len(rows) == len(results["runs"])
    port = results["port"]
    for run, row in zip(results["runs"], rows):
        assert row[0] == run["preset"] and row[2] == str(run["batch"])
        assert row[6] == f"{run['median_s']:.2f} ({run['min_s']:.2f}-{run['max_s']:.2f})"
        assert row[7] == f"{run['gflop_step']:.0f}"
        assert float(row[8]) == pytest.approx(run["gflop_step"] / run["median_s"], abs=0.5)
        assert row[9] == f"{run['peak_rss_mib']:,} MiB"
        gb = port["peak_gb"][run["preset"]]
        assert row[-2] == f"{gb:.1f} GB"
        assert float(row[-1]) == pytest.approx(run["peak_rss_mib"] * 2**20 / (gb * 1e9), abs=0.005)
        if "step_s" in port:
            assert float(row[-3].rstrip("x")) == pytest.approx(port["step_s"][run["preset"]] / run["median_s"], abs=0.05)


def test_step_latency_prints_gpu_runs_with_their_device_and_memory(capsys):
    import step_latency

    path = RESULTS / "step_latency_h200_2026-12-04.json"
    results = json.loads(path.read_text())
    assert step_latency.main(["--from", str(path), "--markdown"]) == 0
    rows = _rows(capsys.readouterr().out)
    assert len(rows) == len(results["runs"])
    for run, row in zip(results["runs"], rows):
        assert row[-5] == run["device"] and row[-4] == ("yes" if run["amp"] else "no")
        assert row[-3] == (run["compile"] or "off")
        assert float(row[-2]) == pytest.approx(1 / run["median_s"], abs=0.05)
        assert row[-1] == f"{run['peak_gpu_mib']:,} MiB"


def test_step_latency_adds_its_run_to_a_results_file(tmp_path, capsys):
    """--out on a tiny step of the demo model: the run joins the file's runs, and --from prints it."""
    import step_latency
    import torch

    threads = torch.get_num_threads()
    out = tmp_path / "steps.json"
    try:
        for _ in range(2):
            # glibc's own allocator: this test's process keeps its malloc settings for the tests after it
            assert step_latency.main(["--preset", "demo", "--batch", "1", "--steps", "1", "--warmup", "0",
                                      "--threads", "1", "--device", "cpu", "--host-allocator", "glibc",
                                      "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    runs = json.loads(out.read_text())["runs"]
    assert len(runs) == 2 and runs[-1] == printed
    assert printed["steps"] == 1 and printed["warmup"] == 0 and "--out" in printed["command"]
    assert step_latency.main(["--from", str(out), "--markdown"]) == 0
    rows = _rows(capsys.readouterr().out)
    ckpt = printed["checkpoint_images"]
    assert len(rows) == 2 and rows[0][0] == "demo" and rows[0][5] == "1 (0)"
    assert ckpt == 0  # the demo preset's train.checkpoint_images, the default of --checkpoint-images
    assert rows[0][3] == "off" and rows[0][4] == "glibc's"


def test_sparse_mode_prints_a_results_files_thresholds(capsys):
    import sparse_mode

    path = RESULTS / "sparse_mode_demo_2026-11-25.json"
    results = json.loads(path.read_text())
    assert sparse_mode.main(["--from", str(path), "--markdown"]) == 0
    rows = _rows(capsys.readouterr().out)
    assert len(rows) == len(results["rows"])
    for r, row in zip(results["rows"], rows):
        assert float(row[0].split()[0]) == r["threshold"]
        assert float(row[1]) == r["median_s"] and float(row[2].rstrip("x")) == r["speedup_vs_first"]
        assert float(row[3].rstrip("%")) == pytest.approx(100 * r["glimpse_share"])
        assert [float(x) for x in row[4:]] == [r["ap50"], r["ap"], r["val_loss"], r["val_mse"]]
    with pytest.raises(SystemExit):  # measuring needs a run and its store
        sparse_mode.main([])


def test_store_read_prints_runs_side_by_side(tmp_path, capsys):
    """Each run a column: its median images/s per method, and how many runs reached 1,000/s; a method one
    run lacks is a dash. Runs may come as separate files (the script's --out) or in one file's "runs"."""
    import store_read

    path = RESULTS / "store_read_2026-11-25.json"
    runs = json.loads(path.read_text())["runs"]
    assert store_read.main(["--from", str(path), "--markdown"]) == 0
    rows = {row[0]: row[1:] for row in _rows(capsys.readouterr().out)}
    for result in runs[0]["results"]:
        label = next(k for k in rows if k.startswith(store_read.LABELS[result["method"]]))
        rates = [next(x["images_per_s_median"] for x in r["results"] if x["method"] == result["method"])
                 for r in runs]
        assert rows[label][:3] == [f"{x:,}" for x in rates]
        assert rows[label][3] == f"{sum(x >= 1000 for x in rates)} of 3"
    assert rows["other load while measuring (CPUs)"][:3] == [f"{r['other_load_cores']:.2f}" for r in runs]

    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps({"date": "2026-01-01T09:00:00", "other_load_cores": 0.1,
                             "results": [{"method": "oindex", "images_per_s_median": 1500}]}))
    b.write_text(json.dumps({"date": "2026-01-01T10:30:00", "other_load_cores": 0.2,
                             "results": [{"method": "new method", "images_per_s_median": 900}]}))
    assert store_read.main(["--from", str(a), str(b), "--markdown"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("| method | 09:00 | 10:30 |")
    rows = {row[0]: row[1:] for row in _rows(out)}
    assert rows[store_read.LABELS["oindex"]] == ["1,500", "–", "1 of 1"]
    assert rows["new method"] == ["–", "900", "0 of 1"]


def test_room3d_speed_prints_the_per_process_rates(capsys):
    import room3d_speed

    path = RESULTS / "room3d_scenes_2026-11-25.json"
    runs = json.loads(path.read_text())["runs"]
    assert room3d_speed.main(["--from", str(path), "--markdown"]) == 0
    rows = _rows(capsys.readouterr().out)
    expected = [(run, r) for run in runs for r in run["scenes"]]
    assert len(rows) == len(expected)
    for (run, r), row in zip(expected, rows):
        assert row[:3] == [r["preset"], "-".join(map(str, r["objects"])), run["scenes_lp_num_threads"]]
        assert [float(x) for x in row[3].split(", ")] == r["scenes_per_s_runs"]
        assert float(row[4]) == r["scenes_per_s_median"] and float(row[5]) == r["ms_per_scene_median"]
        assert row[6] == ("pass" if r["pass_80_per_s"] else "fail")


def test_room3d_speed_prints_breakdown_e2e_and_projection(capsys):
    """The other tables of a whole run: each part's ms with the last preset's share (the shares add up to
    one), each end-to-end run's repeats and rate, each configuration's projection to 77,000 frames."""
    import room3d_speed

    path = RESULTS / "room3d_speed_2026-12-04.json"
    run = json.loads(path.read_text())
    tables = {}
    for t in ("breakdown", "e2e", "projection"):
        assert room3d_speed.main(["--from", str(path), "--markdown", "--table", t]) == 0
        tables[t] = _rows(capsys.readouterr().out)
    presets = run["scenes"]
    parts = list(presets[0]["breakdown"]["ms_per_frame"])
    rows = tables["breakdown"]
    assert [row[0] for row in rows[:-1]] == parts
    for part, row in zip(parts, rows):
        assert [float(x) for x in row[1:-1]] == [p["breakdown"]["ms_per_frame"][part] for p in presets]
        assert float(row[-1].rstrip("%")) == pytest.approx(100 * presets[-1]["breakdown"]["share"][part], abs=0.06)
    assert sum(float(row[-1].rstrip("%")) for row in rows[:-1]) == pytest.approx(100, abs=0.6)
    assert len(tables["e2e"]) == len(run["e2e"]) and len(tables["projection"]) == len(run["projection"])
    for r, row in zip(run["e2e"], tables["e2e"]):
        assert row[0] == r["preset"] and int(row[1]) == r["workers"] and int(row[3]) == r["frames"]
        assert float(row[5]) == r["frames_per_s"] == pytest.approx(r["frames"] / r["wall_s"], rel=0.01)
        assert [float(x) for x in row[4].split(", ")] == [round(w, 1) for w in r["wall_s_repeats"]]
    for r, row in zip(run["projection"], tables["projection"]):
        assert float(row[4].split()[0]) == pytest.approx(77000 / r["frames_per_s_largest_n"] / 60, abs=0.06)
        assert row[5] == ("pass" if r["pass_20_min"] else "fail")


def test_straightforward_step_computes_what_the_optimised_step_does(monkeypatch):
    """step_latency --straightforward swaps in full-canvas compositing and the tiled spatial broadcast: on the
    same weights, images and noise, the loss and every gradient agree with the optimised model's. (Chunks
    draw the noise in another order; their own tests compare them with the plain pass.)"""
    import space.model
    import step_latency
    import torch

    from space.config import resolve_config

    calls = {"windowed": 0, "full": 0}
    for name, key in (("composite_windowed", "windowed"), ("composite", "full")):
        def counted(*args, _f=getattr(space.model, name), _k=key, **kwargs):
            calls[_k] += 1
            return _f(*args, **kwargs)
        monkeypatch.setattr(space.model, name, counted)  # restored after the test
    cfg = resolve_config("demo", None, ["model.image_size=32", "model.grid_size=4"])
    torch.manual_seed(0)
    fast = space.model.SPACE(cfg.model).double().train()
    plain = space.model.SPACE(cfg.model).double().train()
    plain.load_state_dict(fast.state_dict())
    fast.set_checkpoint_images(0)
    step_latency.straightforward(plain)
    x = torch.rand(3, 3, 32, 32, dtype=torch.float64)
    grads = []
    for model, used in ((fast, {"windowed": 1, "full": 0}), (plain, {"windowed": 0, "full": 1})):
        torch.manual_seed(1)
        before = dict(calls)
        loss = model(x, 0)["terms"]["loss"]
        loss.backward()
        assert {k: calls[k] - before[k] for k in calls} == used  # each model composites its own way
        grads.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    assert float(grads[0][0]) == pytest.approx(float(grads[1][0]), rel=1e-9)
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)


def test_step_ratios_times_the_variants_taking_turns_against_current(tmp_path, capsys):
    """bench/step_ratios.py: each round runs current, straightforward and the release (a stand-in checkout
    whose step_latency prints a fixed step) in that order; the table gives each one's time as a multiple of
    current's, and --from prints it again. A --release that is no checkout is refused."""
    import step_ratios

    release = tmp_path / "old"
    (release / "bench").mkdir(parents=True)
    (release / "bench" / "step_latency.py").write_text(
        "import json\nprint('old step')\n"
        "print(json.dumps({'median_s': 100.0, 'min_s': 99.0, 'max_s': 101.0, 'peak_rss_mib': 9000}))\n")
    out = tmp_path / "ratios.json"
    assert step_ratios.main(["--preset", "demo", "--batch", "1", "--steps", "1", "--warmup", "0", "--threads", "1",
                             "--rounds", "1", "--release", str(release), "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    assert [r["variant"] for r in results["runs"]] == ["current", "straightforward", "release"]
    assert results["runs"][1]["straightforward"] and not results["runs"][0]["straightforward"]
    assert results["runs"][1]["checkpoint_images"] == 0
    capsys.readouterr()
    assert step_ratios.main(["--from", str(out), "--markdown"]) == 0
    rows = _rows(capsys.readouterr().out)
    assert [r[1] for r in rows] == ["current", "straightforward", "release"] and rows[0][-1] == "1.00x"
    assert rows[0][0] == "demo"
    current = results["runs"][0]["median_s"]
    assert rows[2][-1] == f"{100.0 / current:.2f}x" and rows[2][5] == "9,000 MiB"
    with pytest.raises(SystemExit):
        step_ratios.main(["--release", str(tmp_path), "--preset", "demo"])
    assert "no bench/step_latency.py there" in capsys.readouterr().err
