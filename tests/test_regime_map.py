"""The regime map's bookkeeping (benchmarks/quality/regime_map.py, regime_rows.py): row claims
shared by --jobs workers, settings that share one stage-1 run, the table of a map in progress, the
issue-28 variants (strong teacher, families chosen on the training split) on faked training, and
the published rows read back unchanged. No real training: the map itself is a benchmark."""

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
    setting = regime_map.settings(anyway)[0]
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


def test_every_variant_goes_to_the_widest_real_gap_before_a_wider_one_the_rule_calls_noise():
    real = regime_map.guidance_gap([{"sweeps": {"0": _sweep(40 + d, 30)}} for d in (0, 1, 2)])
    noisy = regime_map.guidance_gap([{"sweeps": {"0": _sweep(40 + d, 30)}} for d in (-9, 0, 30)])
    assert real["real"] and not noisy["real"] and noisy["gap_mean"] > real["gap_mean"]
    anyway = dict(regime_map.FLOW, stage2_without_real_gap=True)
    gaps = {"narrow_real": real, "wide_noise": noisy}
    assert regime_map.widest_setting(gaps, anyway) == "narrow_real"
    assert regime_map.widest_setting(gaps, regime_map.FLOW) == "narrow_real"
    # with no real gap, the option's settings compete; without it, none gets stage 2
    only_noise = {"wide_noise": noisy, "other": dict(noisy, gap_mean=1.0)}
    assert regime_map.widest_setting(only_noise, anyway) == "wide_noise"
    assert regime_map.widest_setting(only_noise, regime_map.FLOW) is None


class FakeTraining:
    """The map's training and scoring, faked: a run is a folder of empty checkpoints at every
    --checkpoint-every and at --steps; a checkpoint's FID is the table's entry for the variant its
    path names (stage-1 runs: `stage1`), CFG lowering it by 20. Records every call."""

    def __init__(self, monkeypatch, fids: dict):
        self.fids, self.trained, self.scored = fids, [], []
        monkeypatch.setattr(regime_map, "train_run", self.train)
        monkeypatch.setattr(regime_map, "scores", self.scores)
        monkeypatch.setattr(regime_map.checkpoint_lib, "list_checkpoints", self.checkpoints)
        monkeypatch.setattr(
            regime_map.checkpoint_lib,
            "read_state",
            lambda path: {"step": int(Path(path).name.split("_")[1])},
        )

    @staticmethod
    def checkpoints(run_dir):
        return sorted((Path(run_dir) / "checkpoints").glob("step_*"))

    def train(self, argv):
        regime_map.config_cli.parse_args(argv)  # the trainer's options, values and their checks
        self.trained.append(argv)
        value = dict(zip(argv[::1], argv[1:], strict=False))
        every, steps = int(value.get("--checkpoint-every", 0)), int(value["--steps"])
        for step in [*(range(every, steps, every) if every else ()), steps]:
            (Path(value["--out"]) / "checkpoints" / f"step_{step:08d}").mkdir(parents=True)
        return Path(value["--out"]) / "checkpoints" / f"step_{steps:08d}"

    def fid(self, checkpoint) -> float:
        names = [n for n in self.fids if f"/{n}/" in f"{checkpoint}/"]
        return self.fids[names[0]] if names else self.fids["stage1"]

    def scores(self, checkpoint, plan, real_split, num, **options):
        self.scored.append((str(checkpoint), real_split, options))
        metrics = dict(precision=0.5, recall=0.5, inception_score_analogue=1.0, class_accuracy=0.5)
        fid = self.fid(checkpoint) - (20.0 if options.get("cfg", 1) != 1 else 0.0)
        out = dict(metrics, fid=fid)
        if "cfg_sweep" in options:
            out["sweep"] = {"1": dict(metrics, fid=fid), "1.5": dict(metrics, fid=fid - 20)}
        return out


ISSUE28_FIDS = dict(
    stage1=100.0,
    mse=70.0,
    sp=120.0,
    sp_norm_channel=90.0,
    sp_norm_energy=80.0,
    sp_strong_teacher=65.0,
    mg_w0_3=60.0,
    mg_w0_45=55.0,
    mg_w0_6=58.0,
)


def _run_map(tmp_path, plan):
    """Passes of the map until no row is pending (one worker: nothing waits)."""
    results, pending = regime_map.one_pass(tmp_path / "rows", tmp_path / "work", plan)
    assert not pending
    return results


def test_the_strong_teacher_is_the_same_run_trained_on_and_each_family_sends_its_best(
    tmp_path, monkeypatch
):
    fake = FakeTraining(monkeypatch, ISSUE28_FIDS)
    plan = dict(
        regime_map.STRONG_TEACHER_TEST,
        stage2_without_real_gap=True,  # one seed: the rule cannot call a gap real
        variants=("mse", "sp", *(n for family in regime_map.FAMILIES.values() for n in family)),
    )
    (result,) = _run_map(tmp_path, plan)
    stage1_dir = str(tmp_path / "work" / "letters16_c8_class_seed0")
    runs = [(a[a.index("--out") + 1], a[a.index("--steps") + 1]) for a in fake.trained]
    # stage 1 to 600 steps, then the same run on to 1200 (the teacher), then stage 2 from 600
    assert runs[:2] == [(stage1_dir, "600"), (stage1_dir, "1200")]
    teacher = f"{stage1_dir}/checkpoints/step_00001200"
    stage2 = fake.trained[2:]
    by_variant = {Path(argv[argv.index("--out") + 1]).name: argv for argv in stage2}
    assert sorted(by_variant) == sorted(plan["variants"])  # each trained once
    assert by_variant["sp_strong_teacher"][-2:] == ["--perceptual-checkpoint", teacher]
    assert "--perceptual-checkpoint" not in by_variant["sp"]
    assert by_variant["mg_w0_45"][-2:] == ["--mg-scale", "0.45"]
    for name, argv in by_variant.items():  # every stage 2 starts from stage 1's 600 steps
        assert argv[argv.index("--init") + 1] == f"{stage1_dir}/checkpoints/step_00000600", name
        assert argv[argv.index("--steps") + 1] == "600"
    # chosen on the training split, scored once each on the held-out split
    assert result["best_of_family"] == {
        "normalised": "sp_norm_energy",
        "strong teacher": "sp_strong_teacher",
        "model guidance": "mg_w0_45",
    }
    labels = [
        "MSE, no CFG",
        "MSE, best CFG",
        "self-perceptual, no CFG",
        "sp_norm_energy, no CFG",
        "sp_strong_teacher, no CFG",
        "mg_w0_45, no CFG",
    ]
    assert list(result["heldout"]) == labels
    heldout = [(Path(c).parts[-3], o) for c, split, o in fake.scored if split == "heldout"]
    assert heldout == [
        ("mse", {}),
        ("mse", {"cfg": 1.5, "cfg_rescale": regime_map.CFG_RESCALE}),
        ("sp", {}),
        ("sp_norm_energy", {}),
        ("sp_strong_teacher", {}),
        ("mg_w0_45", {}),
    ]
    text = regime_map.table([result], plan)
    assert (
        "Best of each family on the training split: normalised `sp_norm_energy`, model guidance "
        "`mg_w0_45`. Strong teacher: the perceptual network is the final EMA of "
        "`letters16_c8_s1200_class` (training-split FID 100 without CFG)." in text
    )
    # share = (70 - 55) / (70 - 50) on the held-out means
    assert "| mg_w0_45, no CFG | 55 | 0.5 | 0.5 | 0.5 | 0.75 |" in text
    assert "| sp_strong_teacher, no CFG | 65 | 0.5 | 0.5 | 0.5 | 0.25 |" in text
    # a resumed map reads every row back: nothing trained or scored again
    trained, scored = len(fake.trained), len(fake.scored)
    assert _run_map(tmp_path, plan)[0]["heldout"] == result["heldout"]
    assert (len(fake.trained), len(fake.scored)) == (trained, scored)


def test_without_a_longer_run_or_a_condition_those_variants_are_absent_and_said_so(
    tmp_path, monkeypatch
):
    fake = FakeTraining(monkeypatch, ISSUE28_FIDS)
    plan = dict(
        regime_map.STRONG_TEACHER_TEST,
        stage2_without_real_gap=True,
        teachers=(),
        unconditional=(("letters", 8, 600),),
        variants=("mse", "sp", "sp_strong_teacher", "mg_w0_45"),
        paper_variants=("mse", "sp", "sp_strong_teacher", "mg_w0_45"),
    )
    cond, uncond = _run_map(tmp_path, plan)
    assert [Path(a[a.index("--out") + 1]).name for a in fake.trained].count(
        "sp_strong_teacher"
    ) == 0
    assert cond["notes"] == {"strong teacher": "absent: no longer stage-1 run of this setting"}
    assert uncond["notes"] == {
        "strong teacher": "absent: no longer stage-1 run of this setting",
        "model guidance": "absent: it needs a condition",
    }
    assert list(uncond["heldout"]) == ["MSE, no CFG", "self-perceptual, no CFG"]
    assert list(cond["heldout"])[-1] == "mg_w0_45, no CFG"
    text = regime_map.table([cond, uncond], plan)
    assert "Model guidance: absent: it needs a condition." in text


def test_a_longer_setting_of_the_same_run_is_the_teacher_and_nothing_trains_for_it(tmp_path):
    plan = regime_map.FULL
    by_name = {s["name"]: s for s in regime_map.settings(plan)}
    rows = tmp_path / "rows"
    longer = tmp_path / "s600"
    longer.mkdir()
    for name in ("letters16_c16_s300_class", "letters16_c16_s600_class"):  # phase 1: done
        regime_map.write_row(
            rows / "stage1" / f"{name}_seed0.json",
            {"setting": by_name[name], "checkpoint": str(longer)},
        )
    row = regime_map.teacher_row(rows, tmp_path, by_name["letters16_c16_s300_class"], 0, plan)
    assert row["checkpoint"] == str(longer)
    row = regime_map.teacher_row(rows, tmp_path, by_name["letters16_c16_s300_none"], 0, plan)
    assert row == {"absent": "no longer stage-1 run of this setting"}
    # a teacher length waits for the settings its run passes through first
    assert (
        regime_map.teacher_row(rows, tmp_path, by_name["letters16_c8_s600_class"], 0, plan) is None
    )


def test_the_published_rows_read_back_as_they_were_published(tmp_path, monkeypatch):
    """A resumed map of before issue 28 neither recomputes nor misreads its rows: the committed
    rows of one setting give the committed table's lines again, with nothing trained or scored."""
    published = SCRIPT.parents[1] / "results" / "quality" / "regime_map"
    monkeypatch.chdir(tmp_path)
    for path in (published / "rows").rglob("letters16_c16_s300_class*.json"):
        Path(regime_map.read_row(path)["checkpoint"]).mkdir(parents=True, exist_ok=True)
    monkeypatch.setattr(regime_map, "train_run", lambda argv: pytest.fail(f"trained {argv}"))
    monkeypatch.setattr(regime_map, "scores", lambda *a, **k: pytest.fail("scored again"))
    plan = regime_map.FULL
    setting = {s["name"]: s for s in regime_map.settings(plan)}["letters16_c16_s300_class"]
    rows = published / "rows"
    stage1 = [regime_map.stage1_row(rows, Path("work"), setting, seed, plan) for seed in (0, 1, 2)]
    gap = regime_map.guidance_gap(stage1)
    result = regime_map.run_setting(rows, Path("work"), setting, plan, gap, ("mse", "sp"))
    assert result["status"] == "done"
    lines = regime_map.heldout_lines(result)
    committed = (published / "table.md").read_text()
    for line in lines:
        if line.startswith("|"):
            assert line in committed
