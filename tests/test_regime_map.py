"""The regime map's bookkeeping (benchmarks/quality/regime_map.py): row claims shared by
--jobs workers, settings that share one stage-1 run, and the table of a map in progress. No
training here: the map itself is a benchmark, not part of the test run."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")
SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "quality" / "regime_map.py"
spec = importlib.util.spec_from_file_location("regime_map", SCRIPT)
regime_map = importlib.util.module_from_spec(spec)
spec.loader.exec_module(regime_map)


def _write_claim(path: Path, pid: int) -> None:
    lock = path.with_name(path.name + ".claim")
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.write_text(f"{regime_map.socket.gethostname()} {pid}\n")


def test_a_row_held_by_a_live_worker_is_pending_and_a_dead_workers_is_taken_over(tmp_path):
    row = tmp_path / "rows" / "stage1" / "x_seed0.json"
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _write_claim(row, other.pid)
        computed = []
        assert regime_map.obtain(row, lambda: computed.append(1) or {"v": 1}) is None
        assert computed == [] and not row.exists()
    finally:
        other.kill()
        other.wait()
    # its worker is gone: the claim is taken over, the row computed, written and released
    assert regime_map.obtain(row, lambda: {"v": 2}) == {"v": 2}
    assert regime_map.read_row(row) == {"v": 2}
    assert not row.with_name(row.name + ".claim").exists()
    # done rows are read back, never recomputed
    assert regime_map.obtain(row, lambda: pytest.fail("recomputed a done row")) == {"v": 2}


def test_a_failed_row_releases_its_claim_and_writes_nothing(tmp_path):
    row = tmp_path / "r.json"

    def fail():
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        regime_map.obtain(row, fail)
    assert not row.exists() and not row.with_name("r.json.claim").exists()


def test_settings_of_one_run_name_the_shorter_ones_and_unconditional_twins_follow():
    settings = regime_map.settings(regime_map.FULL)
    names = [s["name"] for s in settings]
    assert len(names) == len(set(names))
    by_name = {s["name"]: s for s in settings}
    assert by_name["letters16_c16_s600_class"]["shorter"] == ["letters16_c16_s300_class"]
    assert by_name["letters16_c16_s300_class"]["shorter"] == []
    assert by_name["letters16_c16_s300_none"]["shorter"] == []  # another run: other conditioning
    assert names.index("letters16_c16_s300_class") < names.index("letters16_c16_s600_class")
    conds = [s["cond"] for s in settings]
    assert conds == sorted(conds, key=lambda c: c != "class")  # twins' gaps come first
    assert regime_map.twin_of("letters16_c16_s300_none") in by_name


def _sweep(fid_no_cfg: float, fid_cfg: float) -> dict:
    metrics = dict(precision=0.5, recall=0.5, inception_score_analogue=1.0, class_accuracy=0.5)
    return {"1": dict(metrics, fid=fid_no_cfg), "1.5": dict(metrics, fid=fid_cfg)}


def test_the_gap_is_real_only_beyond_two_standard_deviations():
    rows = [{"sweeps": {"0": _sweep(50 + d, 40)}} for d in (0.0, 1.0, 2.0)]
    gap = regime_map.guidance_gap(rows)
    assert gap["best_cfg"] == 1.5 and gap["gap_mean"] == pytest.approx(11.0)
    assert gap["real"]
    noisy = [{"sweeps": {"0": _sweep(40 + d, 40)}} for d in (-5.0, 0.0, 8.0)]
    assert not regime_map.guidance_gap(noisy)["real"]  # mean 1 < 2 std
    assert not regime_map.guidance_gap(rows[:1])["real"]  # one value: no std, never real


def test_the_table_of_a_map_in_progress_marks_what_is_running():
    settings = regime_map.settings(regime_map.QUICK)
    results = [
        {"setting": s, "gap": None, "stage1": [], "compared": False, "status": "pending"}
        for s in settings
    ]
    text = regime_map.table(results, regime_map.QUICK)
    assert text.count("| running |") == len(settings)
    assert "No setting has a real guidance gap" not in text  # not known yet
