"""The regime map: where (if anywhere) the self-perceptual loss recovers part of the guidance gap.

    python benchmarks/quality/regime_map.py --quick --jobs 2   # 2 settings, 1 seed
    python benchmarks/quality/regime_map.py --jobs 2           # the full map (FULL)
    python benchmarks/quality/regime_map.py --flow --jobs 2    # two settings under rectified flow
    python benchmarks/quality/regime_map.py --flow --stage2-without-real-gap --jobs 2 --resume
        # stage 2 there too, though its gap is not real by the rule (labelled so)
    python benchmarks/quality/regime_map.py --strong-teacher --stage2-without-real-gap --resume
        # issue 28's strong-teacher test: the widest gap's setting, one seed (one seed's gap
        # cannot be real by the rule: the 3-seed map found it real)

The paper's claim (PAPER.md; issue 16) lives where MSE without guidance is unrealistic and
guidance fixes much of it. For each setting (data set x base channels x stage-1 length x
conditioning) and each seed:

1. stage 1 trains MSE from scratch (the digits preset's UNet with --base-channels C). The
   settings that differ only in stage-1 length share one run: the shorter one's final checkpoint
   is a checkpoint of the longer one (the learning rate is constant after warm-up, so a run
   resumed to more steps is the longer run);
2. class-conditional settings: `fastsp.evaluate --cfg-sweep` scores the stage-1 model at every
   scale of `scales` against the TRAINING split, with `sampling_seeds` sampling seeds. The
   guidance gap of one (training seed, sampling seed) is FID(cfg 1) - FID(best cfg), the best
   scale being the one of lowest mean training-split FID over all of them. The gap is real when
   its mean exceeds 2 standard deviations of those gaps (and 0);
3. where the gap is real (an unconditional setting runs only where its class-conditional twin's gap
   is real), stage 2 continues from stage 1's EMA for as many steps as stage 1, same seed, data and
   noise: the variants of `paper_variants` in every such setting, those of `variants` in the
   class-conditional setting of the widest real mean gap (`widest_setting`). Besides MSE continued
   and the paper's self-perceptual loss: its variants (timesteps, layers, MSE added), the normalised
   features (--perceptual-norm channel, energy), the strong teacher (the perceptual network is the
   final EMA of the longest stage-1 length of the same run and seed: a longer setting's, or a length
   of `teachers` trained on only for this; absent, and said so, where the run has none) and model
   guidance at three scales (class-conditional settings only). `curve_points` checkpoints of each
   run are scored without CFG on the training split (the FID-against-steps curve);
4. the best of each family (the normalised ones, the strong teacher, model guidance, and the
   rest: the paper's variants) is the one of lowest mean final training-split FID; then the
   held-out split scores, once, the final rows: MSE continued without CFG, MSE continued with
   the best scale of step 2, the paper's self-perceptual and each family's best, without CFG.
   The share of the guidance gap recovered is (FID_MSE - FID_row) / (FID_MSE - FID_MSE,bestCFG)
   on the held-out means.

Nothing on the held-out split chooses anything. Every result is a file of its own (regime_rows.py)
under RESULTS/rows/ written atomically (a JSON per stage-1 seed, teacher, stage-2 run, held-out
row); a row whose file exists is read back, and training runs resume from their checkpoints, so an
interrupted map continues where it stopped: rerun it with --resume. RESULTS is this map's own
folder (default runs/regime_map[_plan]/results, _plan: _quick, _flow, _strong_teacher): a folder
that already holds rows is continued only with --resume, and one whose files git tracks (the
published results under benchmarks/results/) is refused, so a fresh clone computes its own map and
never rewrites the committed one. `--jobs N` runs N one-thread workers that share the rows: a
worker claims a row with the kernel lock of a claim file beside it (fastsp.run_folder.RunLock, the
trainer's run lock), which goes with its worker however and wherever it ends, so a dead worker's
rows are taken over on the next pass; a worker waiting on rows says which and whose (pid).
RESULTS/table.md is rewritten from the row files after every pass; RESULTS/results.json holds them
all at the end.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import matplotlib
import numpy as np
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # regime_rows.py, beside this file

from regime_rows import obtain, read_row, results_folder, waiting_for, write_row  # noqa: E402

from fastsp import checkpoint as checkpoint_lib  # noqa: E402
from fastsp import config_cli  # noqa: E402
from fastsp.evaluation import evaluate_checkpoint  # noqa: E402
from fastsp.pipeline import write_comparison  # noqa: E402
from fastsp.quality import format_gap_share, guidance_gap_share  # noqa: E402
from fastsp.training.loop import train  # noqa: E402

CFG_RESCALE = 0.7  # as benchmarks/quality/reproduce.py
STAGE2_LR = 2e-4  # as benchmarks/quality/reproduce.py
STAGE2_SEED_OFFSET = 1000
GAP_STDS = 2.0  # a gap is real when its mean exceeds this many of its standard deviations
WAIT_SECONDS = 20  # how often a worker looks again for rows another worker holds
# (name, objective, extra training options): fixed before any result was seen
VARIANTS = (
    ("mse", "mse", []),
    ("sp", "self_perceptual", []),
    ("sp_plus_mse", "self_perceptual", ["--mse-weight", "1"]),
    ("sp_t_low", "self_perceptual", ["--perceptual-t", "0,499"]),
    ("sp_down1_mid", "self_perceptual", ["--perceptual-layers", "down1:1,mid:1"]),
    # PixelGen (2026) switches perceptual losses off for the noisiest 30% of timesteps
    ("sp_on_t_0_699", "self_perceptual", ["--perceptual-on-t", "0,699"]),
    # issue 28: features scaled by the real branch's, per channel (LPL) or by its energy
    ("sp_norm_channel", "self_perceptual", ["--perceptual-norm", "channel"]),
    ("sp_norm_energy", "self_perceptual", ["--perceptual-norm", "energy"]),
    # the perceptual network of a stronger MSE model of the same architecture (the run's longest
    # stage-1 length, `teacher_row`): its --perceptual-checkpoint is added per seed
    ("sp_strong_teacher", "self_perceptual", []),
    # model guidance (arXiv 2502.12154), the guidance-free competitor, scored without CFG
    ("mg_w0_3", "model_guidance", ["--mg-scale", "0.3"]),
    ("mg_w0_45", "model_guidance", ["--mg-scale", "0.45"]),
    ("mg_w0_6", "model_guidance", ["--mg-scale", "0.6"]),
)
STRONG_TEACHER = "sp_strong_teacher"
# Families of variants whose best (lowest mean final training-split FID) the held-out split scores,
# each beside the best of the others (the published map's `best_sp_variant`, as before).
FAMILIES = {
    "normalised": ("sp_norm_channel", "sp_norm_energy"),
    "strong teacher": (STRONG_TEACHER,),
    "model guidance": ("mg_w0_3", "mg_w0_45", "mg_w0_6"),
}
METRICS = ("fid", "precision", "recall", "inception_score_analogue", "class_accuracy")

# Sized by per-step rates measured with two one-thread workers on the idle 2-core CPU (batch 64,
# 16x16: base 8 about 0.26 s per step, base 16 about 0.56 s; base 32 costs 1.4 s and 32x32 letters
# 4x, both out of this budget) and by sampling at about 2.8 ms per image and DDIM step (base 16).
# Letters and digits at 16x16; capacity (base 8, 16) and stage-1 length (300, 600) on letters;
# the unconditional twin of one setting. Measured: 69.8 min with --jobs 2 (2026-12-02), before
# issue 28 added the normalised, strong-teacher and model-guidance variants and the 1200-step
# teacher of base 8 (not measured since).
FULL = dict(
    data=("digits", "letters"),
    resolution={"digits": 16, "letters": 16},
    channels={"digits": (8,), "letters": (8, 16)},
    stage1={"digits": (600,), "letters": (600,)},
    extra_stage1=(("letters", 16, 300),),  # (data, channels, stage-1 steps): more lengths
    unconditional=(("letters", 16, 300),),  # (data, channels, stage-1 steps)
    # (data, channels, stage-1 steps, cond): lengths trained only as strong teachers (no sweep,
    # no stage 2 of their own)
    teachers=(("letters", 8, 1200, "class"),),
    seeds=(0, 1, 2),
    sampling_seeds=(0,),
    scales=(1.0, 1.5, 2.0, 3.0),
    variants=(  # the setting of the widest gap
        *("mse", "sp", "sp_plus_mse", "sp_on_t_0_699", "sp_norm_channel", "sp_norm_energy"),
        *(STRONG_TEACHER, "mg_w0_3", "mg_w0_45", "mg_w0_6"),
    ),
    paper_variants=("mse", "sp", STRONG_TEACHER),  # every other setting with a real gap
    curve_points=2,
    num=300,
    heldout_num=500,
    steps=20,
)
# One class-conditional setting per data set, one seed, two sampling seeds.
QUICK = dict(
    data=("digits", "letters"),
    resolution={"digits": 16, "letters": 16},
    channels={"digits": (16,), "letters": (16,)},
    stage1={"digits": (300,), "letters": (300,)},
    extra_stage1=(),
    unconditional=(),
    seeds=(0,),
    sampling_seeds=(0, 1),
    scales=(1.0, 1.5, 3.0),
    variants=("mse", "sp"),
    paper_variants=("mse", "sp"),
    curve_points=2,
    num=300,
    heldout_num=300,
    steps=20,
)


def setting_name(data: str, channels: int, stage1: int, cond: str, resolution: int) -> str:
    return f"{data}{resolution}_c{channels}_s{stage1}_{cond}"


# Rectified flow (issues 23 and 28): two settings of the FULL map with a real guidance gap under
# DDPM, their 3 seeds and sampling, trained and sampled with --diffusion flow (beside
# regime_map/'s rows). letters16_c16_s300 (issue 23: MSE and the paper's loss) and the DDPM map's
# widest gap, letters16_c8_s600, with its strong teacher's length; the setting of the wider real
# gap under flow gets issue 28's comparison (MSE, its best CFG, the paper's loss, the normalised
# features, the strong teacher, model guidance), the other MSE and the paper's loss.
FLOW = dict(
    FULL,
    data=("letters",),
    channels={"letters": (8, 16)},
    stage1={"letters": ()},
    extra_stage1=(("letters", 8, 600), ("letters", 16, 300)),
    unconditional=(),
    teachers=(("letters", 8, 1200, "class"), ("letters", 16, 600, "class")),
    variants=(
        *("mse", "sp", "sp_norm_channel", "sp_norm_energy", STRONG_TEACHER),
        *("mg_w0_3", "mg_w0_45", "mg_w0_6"),
    ),
    paper_variants=("mse", "sp"),
    diffusion="flow",
)
# Issue 28's strong-teacher test: the FULL map's setting of the widest guidance gap (letters, base
# 8, 600 steps), one seed; stage 2 with the paper's loss and with the perceptual network of the
# same run trained on to 1200 steps, beside MSE continued.
STRONG_TEACHER_TEST = dict(
    FULL,
    data=("letters",),
    channels={"letters": (8,)},
    extra_stage1=(),
    unconditional=(),
    teachers=(("letters", 8, 1200, "class"),),
    seeds=(0,),
    variants=("mse", "sp", STRONG_TEACHER),
    paper_variants=("mse", "sp", STRONG_TEACHER),
)


def compared(gap: dict, plan: dict) -> bool:
    """Whether stage 2 runs on a setting of this gap: where the gap is real, or everywhere under
    the plan option `stage2_without_real_gap` (--stage2-without-real-gap: a measurement the
    rule would skip, labelled as such in the table; the rule itself stays as it is)."""
    return gap["real"] or plan.get("stage2_without_real_gap", False)


def train_run(argv: list[str]) -> Path:
    """One training run (resumed if its folder has checkpoints); its final checkpoint."""
    cfg, model_cfg = config_cli.parse_args(argv)
    return train(cfg, model_cfg)


def common(
    data: str, resolution: int, channels: int, cond: str, seed: int, plan: dict
) -> list[str]:
    return [
        *("--preset", "digits", "--data", data, "--resolution", str(resolution)),
        *("--base-channels", str(channels), "--cond", cond, "--seed", str(seed)),
        *("--resume", "--sample-every", "0", "--log-every", "100", "--device", "cpu"),
        *("--diffusion", plan.get("diffusion", "ddpm")),
    ]


def scores(checkpoint: Path, plan: dict, real_split: str, num: int, **options) -> dict:
    """fastsp.evaluation's metrics (and the sweep's rows, if any) of one checkpoint."""
    start = time.perf_counter()
    result = evaluate_checkpoint(
        checkpoint, num=num, steps=plan["steps"], real_split=real_split, **options
    )
    out = {k: result["metrics"][k] for k in METRICS}
    if "cfg_sweep" in result:
        out["sweep"] = {
            f"{row['cfg']:g}": {k: row["metrics"][k] for k in METRICS}
            for row in result["cfg_sweep"]["rows"]
        }
    out["seconds"] = round(time.perf_counter() - start, 1)
    return out


def stage1_run_dir(work: Path, setting: dict, seed: int) -> Path:
    """One run per (data, resolution, channels, conditioning, seed), whatever its length."""
    s = setting
    return work / f"{s['data']}{s['resolution']}_c{s['channels']}_{s['cond']}_seed{seed}"


def stage1_row(rows: Path, work: Path, setting: dict, seed: int, plan: dict) -> dict | None:
    """Stage 1 of one seed and, class-conditional, its CFG sweeps on the training split; None
    while a shorter setting of the same run (or this row) is with another worker."""
    for shorter in setting["shorter"]:  # the run passes through their lengths first
        if read_row(rows / "stage1" / f"{shorter}_seed{seed}.json") is None:
            return None

    def compute() -> dict:
        start = time.perf_counter()
        argv = [
            *common(
                setting["data"],
                setting["resolution"],
                setting["channels"],
                setting["cond"],
                seed,
                plan,
            ),
            *("--steps", str(setting["stage1"]), "--checkpoint-every", "0"),
            *("--out", str(stage1_run_dir(work, setting, seed))),
        ]
        checkpoint = train_run(argv)
        row = {
            "setting": setting,
            "seed": seed,
            "checkpoint": str(checkpoint),
            "train_seconds": round(time.perf_counter() - start, 1),  # from the shorter run's end
        }
        if setting["cond"] == "class":
            sweep = ",".join(f"{s:g}" for s in plan["scales"])
            row["sweeps"] = {
                str(s): scores(
                    checkpoint,
                    plan,
                    "train",
                    plan["num"],
                    cfg_sweep=sweep,
                    cfg_rescale=CFG_RESCALE,
                    seed=s,
                )["sweep"]
                for s in plan["sampling_seeds"]
            }
        else:
            row["no_cfg"] = scores(checkpoint, plan, "train", plan["num"])
        return row

    return obtain(rows / "stage1" / f"{setting['name']}_seed{seed}.json", compute)


def guidance_gap(stage1: list[dict]) -> dict:
    """The scale of lowest mean training-split FID over every sweep, and the gap it opens."""
    sweeps = [sweep for row in stage1 for sweep in row["sweeps"].values()]
    scales = list(sweeps[0])
    mean_fid = {s: statistics.mean(sw[s]["fid"] for sw in sweeps) for s in scales}
    best = min(scales, key=lambda s: mean_fid[s])
    gaps = [sw["1"]["fid"] - sw[best]["fid"] for sw in sweeps]
    mean = statistics.mean(gaps)
    std = statistics.stdev(gaps) if len(gaps) > 1 else float("nan")
    return {
        "best_cfg": float(best),
        "train_fid_by_cfg": mean_fid,
        "gaps": gaps,
        "gap_mean": mean,
        "gap_std": std,
        "real": bool(mean > 0 and mean > GAP_STDS * std),  # NaN std (1 value): never real
    }


def no_cfg_fid(stage1: dict, plan: dict) -> float:
    """A stage-1 (or teacher) row's training-split FID without CFG (sampling seed 0 of a sweep)."""
    if "sweeps" in stage1:
        return stage1["sweeps"][str(plan["sampling_seeds"][0])]["1"]["fid"]
    return stage1["no_cfg"]["fid"]


def stage2_row(rows: Path, work: Path, setting: dict, seed: int, variant, stage1: dict, plan):
    """One continuation from stage 1's EMA and its training-split FID curve (no CFG)."""
    name, objective, extra = variant

    def compute() -> dict:
        start_fid = no_cfg_fid(stage1, plan)
        start = time.perf_counter()
        run_dir = work / setting["name"] / f"seed{seed}" / name
        every = setting["stage1"] // plan["curve_points"]
        argv = [
            *common(
                setting["data"],
                setting["resolution"],
                setting["channels"],
                setting["cond"],
                seed + STAGE2_SEED_OFFSET,
                plan,
            ),
            *("--init", stage1["checkpoint"], "--lr", str(STAGE2_LR), "--objective", objective),
            *("--steps", str(setting["stage1"]), "--checkpoint-every", str(every)),
            *("--keep-last", "0", "--out", str(run_dir), *extra),
        ]
        final = train_run(argv)
        seconds = time.perf_counter() - start
        curve = [[0, start_fid]]  # step 0: stage 1 itself, without CFG (sampling seed 0)
        for checkpoint in checkpoint_lib.list_checkpoints(run_dir):
            step = checkpoint_lib.read_state(checkpoint)["step"]
            curve.append([step, scores(checkpoint, plan, "train", plan["num"])["fid"]])
        return {
            "setting": setting,
            "seed": seed,
            "variant": name,
            "options": [objective, *extra],
            "checkpoint": str(final),
            "train_seconds": round(seconds, 1),
            "train_fid_curve": curve,
            "train_fid": curve[-1][1],
        }

    return obtain(rows / "stage2" / f"{setting['name']}_{name}_seed{seed}.json", compute)


def same_run(a: dict, b: dict) -> bool:
    """Whether two settings share one stage-1 run (they differ at most in its length)."""
    return all(a[k] == b[k] for k in ("data", "resolution", "channels", "cond"))


def teacher_row(rows: Path, work: Path, setting: dict, seed: int, plan: dict) -> dict | None:
    """The strong teacher of `setting` for one seed: the final checkpoint (its EMA is the
    perceptual network) of the longest length of the same stage-1 run, a longer setting's stage-1
    row or a length of plan['teachers'], trained on once every setting of the run is done.
    {"absent": why} where the run is no longer than `setting`; None while pending."""
    longer = [o for o in settings(plan) if same_run(o, setting) and o["stage1"] > setting["stage1"]]
    lengths = [
        steps
        for data, channels, steps, cond in plan.get("teachers", ())
        if (data, channels, cond) == (setting["data"], setting["channels"], setting["cond"])
        and steps > max([setting["stage1"], *(o["stage1"] for o in longer)])
    ]
    if not lengths:
        if not longer:
            return {"absent": "no longer stage-1 run of this setting"}
        return stage1_row(rows, work, max(longer, key=lambda o: o["stage1"]), seed, plan)
    run = [setting, *longer]
    if any(read_row(rows / "stage1" / f"{o['name']}_seed{seed}.json") is None for o in run):
        return None  # the run passes through their lengths first
    s, steps = setting, max(lengths)
    name = setting_name(s["data"], s["channels"], steps, s["cond"], s["resolution"])

    def compute() -> dict:
        start = time.perf_counter()
        argv = [
            *common(s["data"], s["resolution"], s["channels"], s["cond"], seed, plan),
            *("--steps", str(steps), "--checkpoint-every", "0"),
            *("--out", str(stage1_run_dir(work, s, seed))),
        ]
        checkpoint = train_run(argv)
        return {
            "teacher": name,
            "seed": seed,
            "checkpoint": str(checkpoint),
            "train_seconds": round(time.perf_counter() - start, 1),  # from the longest setting
            "no_cfg": scores(checkpoint, plan, "train", plan["num"]),  # how strong it is
        }

    return obtain(rows / "teacher" / f"{name}_seed{seed}.json", compute)


def heldout_row(rows: Path, setting: dict, seed: int, label: str, checkpoint: str, plan, **opts):
    """One final row, scored once on the held-out split."""
    tag = label.replace(", ", "_").replace(" ", "_")
    path = rows / "heldout" / f"{setting['name']}_{tag}_seed{seed}.json"
    return obtain(
        path,
        lambda: {
            "setting": setting,
            "seed": seed,
            "row": label,
            "checkpoint": checkpoint,
            "options": opts,
            "heldout": scores(Path(checkpoint), plan, "heldout", plan["heldout_num"], **opts),
        },
    )


def settings(plan: dict) -> list[dict]:
    """Class-conditional settings first (an unconditional one needs its twin's gap), shorter
    stage 1 before longer; each names the shorter settings its stage-1 run passes through."""
    keys = []
    for data in plan["data"]:
        for channels in plan["channels"][data]:
            extra = [n for d, c, n in plan["extra_stage1"] if (d, c) == (data, channels)]
            lengths = (*plan["stage1"][data], *extra)
            keys += [(data, channels, stage1, "class") for stage1 in sorted(lengths)]
    keys += [(data, channels, stage1, "none") for data, channels, stage1 in plan["unconditional"]]
    out = []
    for data, channels, stage1, cond in keys:
        resolution = plan["resolution"][data]
        shorter = [
            setting_name(data, channels, other, cond, resolution)
            for d, c, other, k in keys
            if (d, c, k) == (data, channels, cond) and other < stage1
        ]
        out.append(
            dict(
                name=setting_name(data, channels, stage1, cond, resolution),
                data=data,
                resolution=resolution,
                channels=channels,
                stage1=stage1,
                cond=cond,
                shorter=shorter,
            )
        )
    return out


def twin_of(name: str) -> str:
    """The class-conditional setting of the same data, channels and stage-1 length."""
    return name.replace("_none", "_class")


def run_setting(rows: Path, work: Path, setting: dict, plan: dict, gap: dict, names) -> dict:
    """What this worker can do of one setting whose twin's gap `gap` is known: stage 1 (done rows
    are read back) and, where the gap is real, stage 2 with the variants `names` and the
    held-out rows. The result says whether rows are still with another worker ("pending")."""
    out = {"setting": setting, "gap": gap if setting["cond"] == "class" else None}
    out["compared"] = compared(gap, plan)
    if setting["cond"] != "class" and not out["compared"]:
        return dict(out, status="not run", stage1=[])
    stage1 = [stage1_row(rows, work, setting, seed, plan) for seed in plan["seeds"]]
    out["stage1"] = [row for row in stage1 if row is not None]
    if None in stage1:
        return dict(out, status="pending")
    if not out["compared"]:
        return dict(out, status="done")
    variants, out["notes"] = stage2_variants(rows, work, setting, plan, names)
    if variants is None:
        return dict(out, status="pending")
    stage2 = {
        name: [
            stage2_row(rows, work, setting, seed, (name, objective, extra[seed]), row, plan)
            for seed, row in zip(plan["seeds"], stage1, strict=True)
        ]
        for name, objective, extra in variants
    }
    if any(None in runs for runs in stage2.values()):
        return dict(out, status="pending")

    def best(candidates) -> str | None:
        present = [n for n in candidates if n in stage2]
        return min(
            present, key=lambda n: statistics.mean(r["train_fid"] for r in stage2[n]), default=None
        )

    in_family = {name for members in FAMILIES.values() for name in members}
    best_sp = best(name for name in stage2 if name != "mse" and name not in in_family)
    best_of = {family: best(members) for family, members in FAMILIES.items()}
    best_of = {family: name for family, name in best_of.items() if name is not None}
    scored = [name for name in dict.fromkeys((best_sp, *best_of.values())) if name != "sp"]
    final, pending = {}, False
    for i, seed in enumerate(plan["seeds"]):
        mse = stage2["mse"][i]["checkpoint"]
        entries = {"MSE, no CFG": (mse, {})}
        if setting["cond"] == "class":
            entries["MSE, best CFG"] = (mse, {"cfg": gap["best_cfg"], "cfg_rescale": CFG_RESCALE})
        entries["self-perceptual, no CFG"] = (stage2["sp"][i]["checkpoint"], {})
        for name in scored:
            entries[f"{name}, no CFG"] = (stage2[name][i]["checkpoint"], {})
        for label, (checkpoint, opts) in entries.items():
            row = heldout_row(rows, setting, seed, label, checkpoint, plan, **opts)
            pending |= row is None
            final.setdefault(label, []).append(row["heldout"] if row else None)
    out.update(stage2=stage2, best_sp_variant=best_sp, best_of_family=best_of, heldout=final)
    return dict(out, status="pending" if pending else "done")


def stage2_variants(rows: Path, work: Path, setting: dict, plan: dict, names):
    """The variants of `names` that apply to `setting`, each with its extra options per seed
    (the strong teacher's --perceptual-checkpoint), and the table's note on each variant that is
    absent or has a teacher; (None, notes) while a teacher is pending."""
    variants, notes = [], {}
    for name, objective, extra in (v for v in VARIANTS if v[0] in names):
        per_seed = {seed: extra for seed in plan["seeds"]}
        if objective == "model_guidance" and setting["cond"] != "class":
            notes["model guidance"] = "absent: it needs a condition"
            continue
        if name == STRONG_TEACHER:
            teachers = [teacher_row(rows, work, setting, seed, plan) for seed in plan["seeds"]]
            if None in teachers:
                return None, notes
            if "absent" in teachers[0]:
                notes["strong teacher"] = "absent: " + teachers[0]["absent"]
                continue
            teacher = teachers[0].get("teacher") or teachers[0]["setting"]["name"]
            fids = mean_std([no_cfg_fid(row, plan) for row in teachers])
            notes["strong teacher"] = (
                f"the perceptual network is the final EMA of `{teacher}` (training-split FID "
                f"{fids} without CFG)"
            )
            per_seed = {
                seed: [*extra, "--perceptual-checkpoint", row["checkpoint"]]
                for seed, row in zip(plan["seeds"], teachers, strict=True)
            }
        variants.append((name, objective, per_seed))
    return variants, notes


def widest_setting(gaps: dict[str, dict], plan: dict) -> str | None:
    """The setting that gets every variant: of the real gaps, the widest; only where no gap is
    real, the widest of those stage 2 runs on anyway (--stage2-without-real-gap), so that a
    wider gap the rule calls noise never takes the comparison from a real one."""
    real = [name for name, gap in gaps.items() if gap["real"]]
    candidates = real or [name for name, gap in gaps.items() if compared(gap, plan)]
    return max(candidates, key=lambda name: gaps[name]["gap_mean"], default=None)


def one_pass(rows: Path, work: Path, plan: dict) -> tuple[list[dict], bool]:
    """Everything this worker can do now, in order: every class-conditional stage 1 (phase 1),
    then, once every gap is known, stage 2 and held-out rows, the setting of the widest gap
    first. Returns the settings' results and whether any row is still with another worker."""
    all_settings = settings(plan)
    stage1 = {
        s["name"]: [stage1_row(rows, work, s, seed, plan) for seed in plan["seeds"]]
        for s in all_settings
        if s["cond"] == "class"
    }
    if any(None in runs for runs in stage1.values()):
        partial = [
            {"setting": s, "gap": None, "stage1": [r for r in stage1[s["name"]] if r is not None]}
            for s in all_settings
            if s["cond"] == "class"
        ]
        return [dict(r, compared=False, status="pending") for r in partial], True
    gaps = {name: guidance_gap(runs) for name, runs in stage1.items()}
    widest = widest_setting(gaps, plan)

    def priority(s: dict) -> tuple:
        return (s["name"] != widest, s["cond"] != "class", -gaps[twin_of(s["name"])]["gap_mean"])

    results = {}
    for setting in sorted(all_settings, key=priority):
        names = plan["variants"] if setting["name"] == widest else plan["paper_variants"]
        gap = gaps[twin_of(setting["name"])]
        results[setting["name"]] = run_setting(rows, work, setting, plan, gap, names)
    ordered = [results[s["name"]] for s in all_settings]
    return ordered, any(r["status"] == "pending" for r in ordered)


def mean_std(values: list[float | None]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.3g}"
    return f"{statistics.mean(values):.3g} ± {statistics.stdev(values):.2g}"


def gap_line(r: dict) -> str:
    s, gap = r["setting"], r["gap"]
    if s["cond"] != "class":
        fids = [row["no_cfg"]["fid"] for row in r["stage1"]]
        cells = [mean_std(fids), "— (unconditional)", "—", "—"]
        real = "twin's: " + ("yes" if r["compared"] else "no (not run)")
    elif gap is None:
        cells, real = ["…", "…", "…", "…"], "running"
    else:
        best = f"{gap['best_cfg']:g}"
        cells = [
            f"{gap['train_fid_by_cfg']['1']:.3g}",
            best,
            f"{gap['train_fid_by_cfg'][best]:.3g}",
            mean_std(gap["gaps"]),
        ]
        real = "yes" if gap["real"] else "no"
        if r["compared"] and not gap["real"]:
            real += " (stage 2 run anyway)"
    return f"| `{s['name']}` | {len(r['stage1'])} | " + " | ".join(cells) + f" | {real} |"


def heldout_lines(r: dict) -> list[str]:
    s, held = r["setting"], r["heldout"]
    unreal = r["gap"] is not None and not r["gap"]["real"]
    fid = {label: statistics.mean(x["fid"] for x in rows) for label, rows in held.items()}
    curves = {
        name: mean_std([run["train_fid"] for run in runs]) for name, runs in r["stage2"].items()
    }
    lines = [
        f"#### `{s['name']}` (stage 2: {s['stage1']} steps of each loss; best variant on the "
        f"training split: `{r['best_sp_variant']}`)"
        + (": guidance gap not real by the rule, stage 2 run anyway" if unreal else ""),
        "",
        "Final training-split FID (no CFG) of each stage-2 run: "
        + ", ".join(f"`{name}` {value}" for name, value in curves.items())
        + ".",
        "",
    ]
    best_of = r.get("best_of_family", {})  # absent from the results of maps before issue 28
    chosen = [f"{family} `{name}`" for family, name in best_of.items() if len(FAMILIES[family]) > 1]
    notes = [f"{family.capitalize()}: {note}." for family, note in r.get("notes", {}).items()]
    if chosen or notes:
        best = "Best of each family on the training split: " + ", ".join(chosen) + ". "
        lines += [(best if chosen else "") + " ".join(notes), ""]
    lines += [
        "| row | FID ↓ | precision ↑ | recall ↑ | class accuracy ↑ | share of the guidance gap "
        "recovered |",
        "|---|---|---|---|---|---|",
    ]
    for label, rows in held.items():
        cells = [mean_std([x[k] for x in rows]) for k in METRICS if k != "inception_score_analogue"]
        share = "—"
        if label.endswith("no CFG") and not label.startswith("MSE") and "MSE, best CFG" in fid:
            share = format_gap_share(
                guidance_gap_share(fid["MSE, no CFG"], fid[label], fid["MSE, best CFG"])
            )
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {share} |")
    return lines + [""]


def table(results: list[dict], plan: dict) -> str:
    lines = [
        "### Guidance gap of stage 1 (MSE), training split",
        "",
        "| setting | seeds | FID no CFG | best CFG | FID best CFG | gap (mean ± std) | real? |",
        "|---|---|---|---|---|---|---|",
        *(gap_line(r) for r in results),
    ]
    anyway = plan.get("stage2_without_real_gap", False)
    chosen = "every setting: --stage2-without-real-gap" if anyway else "settings with a real gap"
    lines += ["", f"### Held-out split, final rows ({chosen})", ""]
    compared = [r for r in results if r["compared"]]
    if not compared and all(
        r["gap"] is not None for r in results if r["setting"]["cond"] == "class"
    ):
        lines.append("No setting has a real guidance gap, so no stage 2 was run.")
    for r in compared:
        if r["status"] == "done":
            lines += heldout_lines(r)
        else:
            lines += [f"#### `{r['setting']['name']}`: stage 2 running", ""]
    sampler = "flow Euler" if plan.get("diffusion") == "flow" else "DDIM"
    lines += [
        "",
        f"Stage-1 sweeps: CFG {', '.join(f'{x:g}' for x in plan['scales'])} (rescale "
        f"{CFG_RESCALE:g}), {plan['num']} samples, {plan['steps']} {sampler} steps, sampling seeds "
        f"{', '.join(map(str, plan['sampling_seeds']))}, against the training split; a gap is "
        f"real when its mean exceeds {GAP_STDS:g} std of the per-(seed, sampling seed) gaps. "
        f"Stage 2: learning rate {STAGE2_LR:g} from stage 1's EMA. Held-out rows: "
        f"{plan['heldout_num']} samples; share = (FID_MSE - FID_SP) / "
        "(FID_MSE - FID_MSE,bestCFG) on the held-out means ('no gap' when guidance does not "
        "lower MSE's FID).",
    ]
    return "\n".join(lines) + "\n"


def figure(results: list[dict], results_dir: Path) -> bool:
    """RESULTS/figure.png: training-split FID (no CFG) against stage-2 steps, one panel per
    compared setting (mean over seeds, min-max band; dashed: stage 1 with its best CFG); and
    RESULTS/samples.png: the setting with every variant, seed 0, MSE without CFG, MSE with the
    best CFG and the self-perceptual rows without CFG, from the same noise and labels, one row
    above the other."""
    compared = [r for r in results if r["compared"] and r["status"] == "done"]
    if not compared:
        return False
    fig, axes = plt.subplots(1, len(compared), figsize=(4.5 * len(compared), 4), squeeze=False)
    for ax, r in zip(axes[0], compared, strict=True):
        for name, runs in r["stage2"].items():
            steps = [step for step, _ in runs[0]["train_fid_curve"]]
            fids = np.array([[fid for _, fid in run["train_fid_curve"]] for run in runs])
            (line,) = ax.plot(steps, fids.mean(0), marker="o", label=name)
            if len(runs) > 1:
                ax.fill_between(steps, fids.min(0), fids.max(0), color=line.get_color(), alpha=0.15)
        if r["gap"] is not None:
            best = f"{r['gap']['best_cfg']:g}"
            fid = r["gap"]["train_fid_by_cfg"][best]
            ax.axhline(fid, color="gray", linestyle="--", label=f"stage 1 (MSE), CFG {best}")
        ax.set_title(r["setting"]["name"], fontsize=9)
        ax.set_xlabel("stage-2 step")
        ax.set_ylabel("training-split FID, no CFG")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(results_dir / "figure.png", dpi=110)
    plt.close(fig)
    widest = max(compared, key=lambda r: (len(r["stage2"]), r["setting"]["cond"] == "class"))
    runs = {"MSE, no CFG": Path(widest["stage2"]["mse"][0]["checkpoint"])}
    guidance = {}
    if widest["gap"] is not None:
        runs["MSE, best CFG"] = runs["MSE, no CFG"]
        guidance["MSE, best CFG"] = (widest["gap"]["best_cfg"], CFG_RESCALE)
    best_of = widest.get("best_of_family", {}).values()
    for name in dict.fromkeys(("sp", widest["best_sp_variant"], *best_of)):
        runs[f"{name}, no CFG"] = Path(widest["stage2"][name][0]["checkpoint"])
    num = 40 if widest["setting"]["data"] == "letters" else 50  # labels 0, 1, ... in order
    write_comparison(
        results_dir / "samples.png",
        runs,
        num,
        steps=25,
        seed=0,
        device="cpu",
        guidance=guidance,
        columns=num // 2,
        stacked=True,  # sample i of every row in one column: the same noise and label
    )
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 settings, 1 seed")
    parser.add_argument(
        "--flow",
        action="store_true",
        help="letters16_c8_s600_class and letters16_c16_s300_class under --diffusion flow",
    )
    parser.add_argument(
        "--strong-teacher",
        action="store_true",
        help="issue 28's strong-teacher test: letters16_c8_s600_class, one seed",
    )
    parser.add_argument(
        "--stage2-without-real-gap",
        action="store_true",
        help="run stage 2 and the held-out rows where the gap is not real too (labelled so)",
    )
    parser.add_argument(
        "--out", default=None, help="training runs (default runs/regime_map[_plan])"
    )
    parser.add_argument(
        "--results",
        default=None,
        help="row files, table and figures (default runs/regime_map[_plan]/results)",
    )
    parser.add_argument(
        "--resume", action="store_true", help="continue the map whose rows --results holds"
    )
    parser.add_argument(
        "--jobs", type=int, default=1, help="one-thread workers sharing the rows (default 1)"
    )
    parser.add_argument(
        "--seeds",
        default=None,
        help="training seeds, comma-separated (default: the plan's; a resumed map with more "
        "seeds reads the rows of those it has back)",
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # a --jobs child
    args = parser.parse_args()
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")
    torch.set_num_threads(1)
    if args.quick + args.flow + args.strong_teacher > 1:
        parser.error("pass at most one of --quick, --flow and --strong-teacher")
    plan, suffix = (
        (QUICK, "_quick")
        if args.quick
        else (FLOW, "_flow")
        if args.flow
        else (STRONG_TEACHER_TEST, "_strong_teacher")
        if args.strong_teacher
        else (FULL, "")
    )
    if args.stage2_without_real_gap:
        plan = dict(plan, stage2_without_real_gap=True)
    if args.seeds is not None:
        try:
            seeds = tuple(dict.fromkeys(int(seed) for seed in args.seeds.split(",")))
        except ValueError:
            parser.error(f"--seeds takes comma-separated integers (0,1,2), got {args.seeds!r}")
        plan = dict(plan, seeds=seeds)
    work = Path(args.out or f"runs/regime_map{suffix}")
    results_dir = results_folder(args, suffix) if not args.worker else Path(args.results)
    rows = results_dir / "rows"
    os.environ.setdefault("FASTSP_CACHE", str(Path.home() / ".cache" / "fastsp"))
    worker_args = [*sys.argv[1:], "--results", str(results_dir), "--jobs", "1", "--worker"]
    workers = [
        subprocess.Popen([sys.executable, __file__, *worker_args]) for _ in range(args.jobs - 1)
    ]
    started = time.time()
    while True:
        waiting_for.clear()
        results, pending = one_pass(rows, work, plan)
        minutes = (time.time() - started) / 60
        text = table(results, plan) + f"\nWall time of this invocation so far: {minutes:.1f} min.\n"
        checkpoint_lib.atomic_write_text(results_dir / "table.md", text)
        if not pending:
            break
        held = sorted(f"{path.relative_to(rows)} ({who})" for path, who in waiting_for.items())
        print(
            f"waiting {WAIT_SECONDS} s for rows other workers hold: {', '.join(held) or 'none'}"
            " (a row whose worker died is taken over on the next pass)",
            flush=True,
        )
        time.sleep(WAIT_SECONDS)  # rows this pass needs are with another worker
    failed = [w.args for w in workers if w.wait() != 0]
    if args.worker:
        return 0
    minutes = (time.time() - started) / 60
    text = table(results, plan) + f"\nWall time of this invocation: {minutes:.1f} min.\n"
    checkpoint_lib.atomic_write_text(results_dir / "table.md", text)
    summary = {"plan": plan, "minutes_this_invocation": minutes, "results": results}
    write_row(results_dir / "results.json", summary)
    plotted = figure(results, results_dir)
    print(text)
    print(f"wrote {results_dir}/table.md" + (", figure.png, samples.png" if plotted else ""))
    if failed:
        print(f"error: {len(failed)} worker(s) failed; rerun the same command to resume")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
