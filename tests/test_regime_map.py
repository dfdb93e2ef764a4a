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


HOLD_CLAIM = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.pwrite(fd, f"{os.getpid()}\\n".encode(), 0)
print("held", flush=True)
time.sleep(60)
"""


def _hold_claim(path: Path) -> subprocess.Popen:
    """Another worker (a process of its own) holding the kernel lock of `path`'s claim."""
    lock = path.with_name(path.name + ".claim")
    lock.parent.mkdir(parents=True, exist_ok=True)
    other = subprocess.Popen(
        [sys.executable, "-c", HOLD_CLAIM, str(lock)], stdout=subprocess.PIPE, text=True
    )
    assert other.stdout.readline() == "held\n"
    return other


def test_a_row_held_by_a_live_worker_is_pending_and_a_dead_workers_is_taken_over(tmp_path):
    row = tmp_path / "rows" / "stage1" / "x_seed0.json"
    other = _hold_claim(row)
    try:
        computed = []
        regime_map.waiting_for.clear()
        assert regime_map.obtain(row, lambda: computed.append(1) or {"v": 1}) is None
        assert computed == [] and not row.exists()
        assert regime_map.waiting_for == {row: f"pid {other.pid}"}  # whom it waits for
    finally:
        other.kill()  # kill -9: a preempted node's worker, which cleans nothing up
        other.wait()
    assert row.with_name(row.name + ".claim").exists()  # left behind, but no longer locked
    # its worker is gone: the claim is taken over, the row computed, written and released
    assert regime_map.obtain(row, lambda: {"v": 2}) == {"v": 2}
    assert regime_map.read_row(row) == {"v": 2}
    assert not row.with_name(row.name + ".claim").exists()
    # done rows are read back, never recomputed
    assert regime_map.obtain(row, lambda: pytest.fail("recomputed a done row")) == {"v": 2}
    # unless the checkpoint a row names is gone (rows copied from another machine)
    regime_map.write_row(row, {"checkpoint": str(tmp_path / "gone")})
    assert regime_map.obtain(row, lambda: {"v": 3}) == {"v": 3}


def test_a_map_writes_its_own_results_and_never_the_committed_ones(tmp_path, monkeypatch):
    parser_args = regime_map.argparse.Namespace
    committed = SCRIPT.parents[1] / "results" / "quality" / "regime_map"
    with pytest.raises(SystemExit, match="holds results committed to git"):
        regime_map.results_folder(parser_args(results=str(committed), resume=True), "")
    monkeypatch.chdir(tmp_path)  # a fresh clone's working folder
    fresh = regime_map.results_folder(parser_args(results=None, resume=False), "_quick")
    assert fresh == Path("runs/regime_map_quick/results")
    regime_map.write_row(fresh / "rows" / "stage1" / "a.json", {"v": 1})
    with pytest.raises(SystemExit, match="pass --resume to continue it"):
        regime_map.results_folder(parser_args(results=None, resume=False), "_quick")
    assert regime_map.results_folder(parser_args(results=None, resume=True), "_quick") == fresh


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


def _held(fid: float) -> dict:
    return dict(_sweep(fid, fid)["1"])


def test_stage2_without_a_real_gap_runs_only_under_its_plan_option_and_is_labelled():
    unreal = regime_map.guidance_gap([{"sweeps": {"0": _sweep(40 + d, 40)}} for d in (-5, 0, 8)])
    assert not unreal["real"]
    assert not regime_map.compared(unreal, regime_map.FLOW)  # the rule stays the rule
    anyway = dict(regime_map.FLOW, stage2_without_real_gap=True)
    assert regime_map.compared(unreal, anyway)
    (setting,) = regime_map.settings(anyway)
    stage2 = {
        name: [{"train_fid": fid, "train_fid_curve": [[0, 60.0], [300, fid]]}]
        for name, fid in (("mse", 50.0), ("sp", 45.0))
    }
    heldout = {
        "MSE, no CFG": [_held(60.0)],
        "MSE, best CFG": [_held(40.0)],
        "self-perceptual, no CFG": [_held(55.0)],
    }
    done = dict(setting=setting, gap=unreal, stage1=[], compared=True, status="done", stage2=stage2)
    text = regime_map.table([dict(done, best_sp_variant="sp", heldout=heldout)], anyway)
    assert "| no (stage 2 run anyway) |" in text
    assert "every setting: --stage2-without-real-gap" in text
    assert "guidance gap not real by the rule, stage 2 run anyway" in text
    # share = (60 - 55) / (60 - 40) on the held-out means
    assert "| self-perceptual, no CFG | 55 | 0.5 | 0.5 | 0.5 | 0.25 |" in text
    # the plain plan leaves such a setting out of stage 2, as before
    plain = regime_map.table([dict(done, compared=False, status="done")], regime_map.FLOW)
    assert "No setting has a real guidance gap, so no stage 2 was run." in plain
    assert "run anyway" not in plain
