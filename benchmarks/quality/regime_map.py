"""The regime map: where (if anywhere) the self-perceptual loss recovers part of the guidance gap.

    python benchmarks/quality/regime_map.py --quick     # 2 settings, 1 seed (< 15 min, idle CPU)
    python benchmarks/quality/regime_map.py             # the full map (not run; see FULL)

The paper's claim (PAPER.md; issue 16) lives where MSE without guidance is unrealistic and
guidance fixes much of it. For each setting (data set x base channels x stage-1 length x
conditioning) and each seed:

1. stage 1 trains MSE from scratch (the digits preset's UNet with --base-channels C);
2. class-conditional settings: `fastsp.evaluate --cfg-sweep` scores the stage-1 model at every
   scale of CFG_SCALES against the TRAINING split, with `sampling_seeds` sampling seeds. The
   guidance gap of one (training seed, sampling seed) is FID(cfg 1) - FID(best cfg), the best
   scale being the one of lowest mean training-split FID over all of them. The gap is real when
   its mean exceeds 2 standard deviations of those gaps (and 0);
3. where the gap is real (for an unconditional setting: where its class-conditional twin's is),
   stage 2 continues from stage 1's EMA for as many steps as stage 1, same seed, data and noise:
   MSE continued and self-perceptual with the paper's defaults in every such setting, and every
   other VARIANT too in the setting of the widest mean gap (and its unconditional twin). Every `every` steps a checkpoint is scored without CFG on the training split (the
   FID-against-steps curve);
4. the best self-perceptual variant is the one of lowest mean final training-split FID; then the
   held-out split scores, once, the final rows: MSE continued without CFG, MSE continued with the
   best scale of step 2, the paper's self-perceptual and the best variant, without CFG. The share
   of the guidance gap recovered is (FID_MSE - FID_SP) / (FID_MSE - FID_MSE,bestCFG) on the
   held-out means.

Nothing on the held-out split chooses anything. Every result is a file of its own under
RESULTS/rows/ written atomically (a JSON per stage-1 seed, per stage-2 run, per held-out row);
a row whose file exists is skipped, and training runs resume from their checkpoints (`--resume`),
so an interrupted map continues where it stopped. RESULTS/table.md is rewritten from the row files
after every row; RESULTS/results.json holds them all.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from fastsp import checkpoint as checkpoint_lib
from fastsp import config as config_lib
from fastsp.evaluate import evaluate_checkpoint
from fastsp.quality import format_gap_share, guidance_gap_share
from fastsp.trainer import train

CFG_SCALES = (1.0, 1.25, 1.5, 2.0, 3.0)
CFG_RESCALE = 0.7  # as benchmarks/quality/reproduce.py
STAGE2_LR = 2e-4  # as benchmarks/quality/reproduce.py
STAGE2_SEED_OFFSET = 1000
GAP_STDS = 2.0  # a gap is real when its mean exceeds this many of its standard deviations
RESOLUTION = {"digits": 16, "letters": 32}  # each data set's native side (full map)
# (name, objective, extra training options): fixed before any result was seen
VARIANTS = (
    ("mse", "mse", []),
    ("sp", "self_perceptual", []),
    ("sp_plus_mse", "self_perceptual", ["--mse-weight", "1"]),
    ("sp_t_low", "self_perceptual", ["--perceptual-t", "0,499"]),
    ("sp_down1_mid", "self_perceptual", ["--perceptual-layers", "down1:1,mid:1"]),
    # PixelGen (2026) switches perceptual losses off for the noisiest 30% of timesteps
    ("sp_on_t_0_699", "self_perceptual", ["--perceptual-on-t", "0,699"]),
)
METRICS = ("fid", "precision", "recall", "inception_score_analogue", "class_accuracy")

# Not run, and not sized by measurement: by the idle per-step rates of the ablations (digits at
# 16x16, base 16: 0.24 s per MSE step) and a 4x cost for letters at 32x32, stage 1 and the sweeps
# alone take about 2.5 hours; stage 2 adds about 2.6x the stage-1 time of each setting with a real
# gap (MSE + self-perceptual) and about 9x in the setting of the widest gap (every variant).
FULL = dict(
    data=("digits", "letters"),
    resolution=RESOLUTION,
    channels={"digits": (8, 16), "letters": (16,)},
    stage1={"digits": (400, 1200), "letters": (600,)},
    conds=("class", "none"),
    seeds=(0, 1, 2),
    sampling_seeds=(0,),
    scales=CFG_SCALES,
    variants=tuple(v[0] for v in VARIANTS),  # in the setting of the widest gap
    paper_variants=("mse", "sp"),  # in every other setting with a real gap
    every=250,
    num=500,
    heldout_num=1000,
    steps=25,
)
# Sized by the idle per-step rates (above) for about 13 minutes on the idle 2-core CPU with one
# thread: one class-conditional setting per data set, letters at 16x16 (32x32 costs 4x per step).
QUICK = dict(
    data=("digits", "letters"),
    resolution={"digits": 16, "letters": 16},
    channels={"digits": (16,), "letters": (16,)},
    stage1={"digits": (300,), "letters": (300,)},
    conds=("class",),
    seeds=(0,),
    sampling_seeds=(0, 1),
    scales=(1.0, 1.5, 3.0),
    variants=("mse", "sp"),
    paper_variants=("mse", "sp"),
    every=150,
    num=300,
    heldout_num=300,
    steps=20,
)


def setting_name(data: str, channels: int, stage1: int, cond: str, resolution: int) -> str:
    return f"{data}{resolution}_c{channels}_s{stage1}_{cond}"


def write_row(path: Path, row: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    checkpoint_lib.atomic_write_text(path, json.dumps(row, indent=2) + "\n")


def read_row(path: Path) -> dict | None:
    """The row's contents, or None when it is not done (missing, or unreadable: done again)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def train_run(argv: list[str]) -> Path:
    """One training run (resumed if its folder has checkpoints); its final checkpoint."""
    cfg, model_cfg = config_lib.parse_args(argv)
    return train(cfg, model_cfg)


def common(data: str, resolution: int, channels: int, cond: str, seed: int) -> list[str]:
    return [
        *("--preset", "digits", "--data", data, "--resolution", str(resolution)),
        *("--base-channels", str(channels), "--cond", cond, "--seed", str(seed)),
        *("--resume", "--sample-every", "0", "--log-every", "100", "--device", "cpu"),
    ]


def scores(checkpoint: Path, plan: dict, real_split: str, num: int, **options) -> dict:
    """fastsp.evaluate's metrics (and the sweep's rows, if any) of one checkpoint."""
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


def stage1_row(rows: Path, work: Path, setting: dict, seed: int, plan: dict) -> dict:
    """Stage 1 of one seed and, class-conditional, its CFG sweeps on the training split."""
    path = rows / "stage1" / f"{setting['name']}_seed{seed}.json"
    done = read_row(path)
    if done is not None:
        return done
    start = time.perf_counter()
    argv = [
        *common(setting["data"], setting["resolution"], setting["channels"], setting["cond"], seed),
        *("--steps", str(setting["stage1"]), "--checkpoint-every", "0"),
        *("--out", str(work / setting["name"] / f"seed{seed}" / "stage1")),
    ]
    checkpoint = train_run(argv)
    row = {
        "setting": setting,
        "seed": seed,
        "checkpoint": str(checkpoint),
        "train_seconds": round(time.perf_counter() - start, 1),
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
    write_row(path, row)
    return row


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


def stage2_row(rows: Path, work: Path, setting: dict, seed: int, variant, stage1: dict, plan):
    """One continuation from stage 1's EMA and its training-split FID curve (no CFG)."""
    name, objective, extra = variant
    init = stage1["checkpoint"]
    start_fid = (
        stage1["sweeps"][str(plan["sampling_seeds"][0])]["1"]["fid"]
        if "sweeps" in stage1
        else stage1["no_cfg"]["fid"]
    )
    path = rows / "stage2" / f"{setting['name']}_{name}_seed{seed}.json"
    done = read_row(path)
    if done is not None:
        return done
    start = time.perf_counter()
    run_dir = work / setting["name"] / f"seed{seed}" / name
    argv = [
        *common(
            setting["data"],
            setting["resolution"],
            setting["channels"],
            setting["cond"],
            seed + STAGE2_SEED_OFFSET,
        ),
        *("--init", init, "--lr", str(STAGE2_LR), "--objective", objective),
        *("--steps", str(setting["stage1"]), "--checkpoint-every", str(plan["every"])),
        *("--keep-last", "0", "--out", str(run_dir), *extra),
    ]
    final = train_run(argv)
    seconds = time.perf_counter() - start
    curve = [[0, start_fid]]  # step 0: stage 1 itself, without CFG (sampling seed 0)
    for checkpoint in checkpoint_lib.list_checkpoints(run_dir):
        step = checkpoint_lib.read_state(checkpoint)["step"]
        curve.append([step, scores(checkpoint, plan, "train", plan["num"])["fid"]])
    row = {
        "setting": setting,
        "seed": seed,
        "variant": name,
        "options": [objective, *extra],
        "checkpoint": str(final),
        "train_seconds": round(seconds, 1),
        "train_fid_curve": curve,
        "train_fid": curve[-1][1],
    }
    write_row(path, row)
    return row


def heldout_row(rows: Path, setting: dict, seed: int, label: str, checkpoint: str, plan, **opts):
    """One final row, scored once on the held-out split."""
    path = rows / "heldout" / f"{setting['name']}_{label}_seed{seed}.json"
    done = read_row(path)
    if done is not None:
        return done
    row = {
        "setting": setting,
        "seed": seed,
        "row": label,
        "checkpoint": checkpoint,
        "options": opts,
        "heldout": scores(Path(checkpoint), plan, "heldout", plan["heldout_num"], **opts),
    }
    write_row(path, row)
    return row


def settings(plan: dict) -> list[dict]:
    """Class-conditional settings first: an unconditional one needs its twin's gap."""
    out = []
    for cond in sorted(plan["conds"], key=lambda c: c != "class"):
        for data in plan["data"]:
            for channels in plan["channels"][data]:
                for stage1 in plan["stage1"][data]:
                    resolution = plan["resolution"][data]
                    name = setting_name(data, channels, stage1, cond, resolution)
                    out.append(
                        dict(
                            name=name,
                            data=data,
                            resolution=resolution,
                            channels=channels,
                            stage1=stage1,
                            cond=cond,
                        )
                    )
    return out


def twin_of(name: str) -> str:
    """The class-conditional setting of the same data, channels and stage-1 length."""
    return name.replace("_none", "_class")


def run_setting(rows: Path, work: Path, setting: dict, plan: dict, gaps: dict, names) -> dict:
    """Stage 1 (done rows are read back), and where the gap is real, stage 2 with the variants
    `names` and the held-out rows."""
    stage1 = [stage1_row(rows, work, setting, seed, plan) for seed in plan["seeds"]]
    gap = guidance_gap(stage1) if setting["cond"] == "class" else None
    real = (gaps.get(twin_of(setting["name"])) or {}).get("real", False)
    out = {"setting": setting, "gap": gap, "compared": real, "stage1": stage1}
    if not real:
        return out
    variants = [v for v in VARIANTS if v[0] in names]
    stage2 = {
        v[0]: [
            stage2_row(rows, work, setting, seed, v, row, plan)
            for seed, row in zip(plan["seeds"], stage1, strict=True)
        ]
        for v in variants
    }
    sp_names = [name for name in stage2 if name != "mse"]
    best_sp = min(sp_names, key=lambda n: statistics.mean(r["train_fid"] for r in stage2[n]))
    final = {}
    for i, seed in enumerate(plan["seeds"]):
        mse = stage2["mse"][i]["checkpoint"]
        entries = {"MSE, no CFG": (mse, {})}
        if gap is not None:
            entries["MSE, best CFG"] = (mse, {"cfg": gap["best_cfg"], "cfg_rescale": CFG_RESCALE})
        entries["self-perceptual, no CFG"] = (stage2["sp"][i]["checkpoint"], {})
        if best_sp != "sp":
            entries[f"{best_sp}, no CFG"] = (stage2[best_sp][i]["checkpoint"], {})
        for label, (checkpoint, opts) in entries.items():
            tag = label.replace(", ", "_").replace(" ", "_")
            final.setdefault(label, []).append(
                heldout_row(rows, setting, seed, tag, checkpoint, plan, **opts)["heldout"]
            )
    out.update(stage2=stage2, best_sp_variant=best_sp, heldout=final)
    return out


def mean_std(values: list[float | None]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.3g}"
    return f"{statistics.mean(values):.3g} ± {statistics.stdev(values):.2g}"


def table(results: list[dict], plan: dict) -> str:
    lines = [
        "### Guidance gap of stage 1 (MSE), training split",
        "",
        "| setting | seeds | FID no CFG | best CFG | FID best CFG | gap (mean ± std) | real? |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        s, gap = r["setting"], r["gap"]
        if gap is None:
            fids = [row["no_cfg"]["fid"] for row in r["stage1"]]
            cells = [mean_std(fids), "— (unconditional)", "—", "—"]
            real = "twin's: " + ("yes" if r["compared"] else "no")
        else:
            best = f"{gap['best_cfg']:g}"
            cells = [
                f"{gap['train_fid_by_cfg']['1']:.3g}",
                best,
                f"{gap['train_fid_by_cfg'][best]:.3g}",
                mean_std(gap["gaps"]),
            ]
            real = "yes" if gap["real"] else "no"
        lines.append(
            f"| `{s['name']}` | {len(r['stage1'])} | " + " | ".join(cells) + f" | {real} |"
        )
    compared = [r for r in results if r["compared"]]
    lines += ["", "### Held-out split, final rows (settings with a real gap)", ""]
    if not compared:
        lines.append("No setting has a real guidance gap, so no stage 2 was run.")
    for r in compared:
        s, held = r["setting"], r["heldout"]
        fid = {label: statistics.mean(x["fid"] for x in rows) for label, rows in held.items()}
        lines += [
            f"#### `{s['name']}` (stage 2: {s['stage1']} steps of each loss; best variant on the "
            f"training split: `{r['best_sp_variant']}`)",
            "",
            "| row | FID ↓ | precision ↑ | recall ↑ | class accuracy ↑ | share of the guidance gap "
            "recovered |",
            "|---|---|---|---|---|---|",
        ]
        for label, rows in held.items():
            cells = [
                mean_std([x[k] for x in rows]) for k in METRICS if k != "inception_score_analogue"
            ]
            share = "—"
            if label.endswith("no CFG") and not label.startswith("MSE") and "MSE, best CFG" in fid:
                share = format_gap_share(
                    guidance_gap_share(fid["MSE, no CFG"], fid[label], fid["MSE, best CFG"])
                )
            lines.append(f"| {label} | " + " | ".join(cells) + f" | {share} |")
        lines.append("")
    lines += [
        "",
        f"Stage-1 sweeps: CFG {', '.join(f'{x:g}' for x in plan['scales'])} (rescale "
        f"{CFG_RESCALE:g}), {plan['num']} samples, {plan['steps']} DDIM steps, sampling seeds "
        f"{', '.join(map(str, plan['sampling_seeds']))}, against the training split; a gap is "
        f"real when its mean exceeds {GAP_STDS:g} std of the per-(seed, sampling seed) gaps. "
        f"Held-out rows: {plan['heldout_num']} samples; share = (FID_MSE - FID_SP) / "
        "(FID_MSE - FID_MSE,bestCFG) on the held-out means ('no gap' when guidance does not "
        "lower MSE's FID).",
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 settings, 1 seed (< 15 min)")
    parser.add_argument(
        "--out", default=None, help="training runs (default runs/regime_map[_quick])"
    )
    parser.add_argument(
        "--results",
        default=None,
        help="row files and table (default benchmarks/results/quality/regime_map[_quick])",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    plan = QUICK if args.quick else FULL
    suffix = "_quick" if args.quick else ""
    work = Path(args.out or f"runs/regime_map{suffix}")
    results_dir = Path(args.results or f"benchmarks/results/quality/regime_map{suffix}")
    rows = results_dir / "rows"
    os.environ.setdefault("FASTSP_CACHE", str(Path.home() / ".cache" / "fastsp"))
    started = time.time()
    # Phase 1: every stage 1 and its guidance gap. Phase 2: stage 2 where the gap is real; every
    # variant in the setting of the widest gap (in mean gaps), MSE and the paper's loss elsewhere
    # (all variants everywhere would not fit the time budget).
    gaps = {
        s["name"]: guidance_gap([stage1_row(rows, work, s, seed, plan) for seed in plan["seeds"]])
        for s in settings(plan)
        if s["cond"] == "class"
    }
    real = [name for name, gap in gaps.items() if gap["real"]]
    widest = max(real, key=lambda name: gaps[name]["gap_mean"], default=None)
    results = []
    for setting in settings(plan):
        every = twin_of(setting["name"]) == widest
        names = plan["variants"] if every else plan["paper_variants"]
        results.append(run_setting(rows, work, setting, plan, gaps, names))
        minutes = (time.time() - started) / 60
        text = table(results, plan) + f"\nWall time of this invocation so far: {minutes:.1f} min.\n"
        checkpoint_lib.atomic_write_text(results_dir / "table.md", text)
        print(f"{setting['name']} done ({minutes:.1f} min)", flush=True)
    minutes = (time.time() - started) / 60
    summary = {"plan": plan, "minutes_this_invocation": minutes, "results": results}
    write_row(results_dir / "results.json", summary)
    print(table(results, plan))
    print(f"wall time {minutes:.1f} min; wrote {results_dir / 'table.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
