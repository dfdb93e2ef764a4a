"""Training, read top to bottom: `train` claims the run folder, `build_run` plans and assembles
the run (fastsp.training.plan, fastsp.training.assembly), `run_loop` trains it.

Determinism across world sizes: the data stream (fastsp.data.ShardedBatchSampler) and the noise,
timesteps and label dropout of a step are functions of (seed, step) over the *global* batch; each
rank takes its contiguous slice. With equal-size micro-batches the mean of the ranks' mean losses
is the global mean, so N processes compute the same update as one process with the same global
batch (up to float summation order).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

from fastsp import checkpoint as checkpoint_lib
from fastsp import config_file, dist, preemption, run_folder
from fastsp.config import DiTConfig, TrainConfig, UNetConfig
from fastsp.data_stream import make_loader
from fastsp.errors import ExpectedStop, GraphCaptureError, NumericalFault, Preempted, RankLost
from fastsp.faults import kill_point
from fastsp.training.assembly import Run, assemble
from fastsp.training.outputs import (
    Progress,
    save_step_checkpoint,
    start_outputs,
    write_backends,
    write_samples,
)
from fastsp.training.plan import check_out_and_data, plan_run


def train(cfg: TrainConfig, model_cfg: UNetConfig | DiTConfig) -> Path:
    """Build and run (or resume) a training run; returns the final checkpoint's folder.

    The run folder is claimed first (fastsp.run_folder.claimed: made if new, locked by rank 0,
    RANK as torchrun sets it), so a second trainer on it stops before reading anything; a start
    that fails, or that a signal stops (fastsp.preemption), leaves no folder it made behind.
    """
    stop_before_training(agree=False)  # asked for during the imports: nothing is made yet
    check_out_and_data(cfg)  # before the claim, which would leave its lock file in the data
    with run_folder.claimed(cfg.out, is_main=os.environ.get("RANK", "0") == "0"):
        run = build_run(cfg, model_cfg)
        stop_before_training(agree=True)
        return run_loop(run)


def build_run(cfg: TrainConfig, model_cfg: UNetConfig | DiTConfig) -> Run:
    """The run of (cfg, model_cfg), planned (every refusal before anything is built) and
    assembled; writes no file. Between the two it assigns the environment a captured DDP step
    needs and starts the process group (fastsp.dist.init), both process-wide, so the plan's
    graph decision reaches NCCL before it starts. The caller checks --out against the data
    and claims the run folder first (`train`)."""
    plan = plan_run(cfg, model_cfg)
    os.environ.update(plan.graph.environment)
    info = dist.init(cfg.device)
    return assemble(plan, info)


def run_loop(run: Run) -> Path:
    """Train `run` from its start step to cfg.steps; returns the final checkpoint's folder.

    Rank 0 writes the run folder: config.json, backends.json, metrics.jsonl, sample grids and
    checkpoints. SIGTERM/SIGINT stop after the current step with a checkpoint (`Preempted`).
    """
    cfg, info, run_dir, train_step = run.cfg, run.info, run.run_dir, run.step
    device, start_step = info.device, run.start_step
    config_text = config_file.dumps(cfg, run.model_cfg)
    if start_step >= cfg.steps:  # e.g. --steps 5 --resume on a run at step 10
        if info.is_main:
            print(
                f"nothing to do: {run.resume_from} is at step {start_step} and --steps is "
                f"{cfg.steps}; {run_dir} is left as it was (pass a larger --steps to train on)"
            )
        return run.resume_from

    metrics = start_outputs(run, config_text)  # rank 0: the run folder and the first lines

    # ---- the loop ------------------------------------------------------------------------------
    batches = iter(
        make_loader(
            run.dataset,
            cfg.batch_size,
            info.rank,
            info.world_size,
            cfg.seed,
            start_step,
            cfg.num_workers,
        )
    )
    bad_items = 0  # items the data set substituted (--on-bad-data skip), counted on the host
    # Files found bad when the data set was built (--on-bad-data skip), left out of every epoch.
    bad_files = len(getattr(run.dataset, "bad_files", []))
    steps_since_log, log_start = 0, time.perf_counter()
    progress = Progress(cfg.steps, start_step, info.is_main)
    final_checkpoint = run.resume_from
    # The entry points install the handlers at their start (fastsp.preemption); a caller of the
    # Python API gets them for the loop, and its own back afterwards.
    owns_handlers = not preemption.installed()
    stop_signal = preemption.install()
    deterministic_before = torch.are_deterministic_algorithms_enabled()
    if cfg.deterministic:
        use_deterministic_algorithms()
    step = start_step
    try:
        for step in range(start_step, cfg.steps):
            batch = next(batches)
            bad_items += int(batch["bad"].sum()) if "bad" in batch else 0  # a CPU tensor
            if step == start_step:
                capture_step(run, batch, log=print if info.is_main else lambda message: None)
            # One step on the device (fastsp.step): randomness from (seed, step), forward,
            # perceptual pass, loss, backward, clip, fused AdamW (skipped if not finite), EMA.
            train_step.run(batch, step, learning_rate(cfg, step), 1.0 - ema_decay(cfg, step))

            done = step + 1
            steps_since_log += 1
            progress.update()
            checkpoint_now = done == cfg.steps or (
                cfg.checkpoint_every and done % cfg.checkpoint_every == 0
            )
            if done % cfg.log_every == 0 or checkpoint_now:
                totals = torch.stack(
                    [
                        train_step.loss_sum,
                        train_step.grad_norm_sum,
                        train_step.good_steps,
                        torch.tensor(float(bad_items), device=device),
                    ]
                )
                totals = dist.all_reduce_mean(totals)
                # Host syncs, once per log interval: these sums and the streak below.
                loss_value, grad_norm_value, good, bad_data = totals.tolist()
                # The longest run since the last log, so a run of K that ended between two
                # logs stops training too (each rank skips the same steps: DDP averages the
                # gradients before the finiteness check).
                worst_in_a_row = int(train_step.worst_bad_in_a_row.item())
                if worst_in_a_row >= cfg.max_bad_steps:
                    raise NumericalFault(
                        f"stopped at step {done}: {worst_in_a_row} consecutive steps had "
                        f"non-finite gradients (their updates were skipped); the last checkpoint "
                        f"({checkpoint_lib.latest_checkpoint(run_dir) or 'none yet'}) is intact. "
                        "Lower --lr, check the data for NaN/inf values, or raise --max-bad-steps"
                    )
                elapsed = time.perf_counter() - log_start
                images_per_s = cfg.batch_size * steps_since_log / elapsed
                if metrics is not None:
                    # means over the finite steps; null (not 0) for an interval without one
                    values = {
                        "loss": loss_value / good if good else None,
                        "lr": learning_rate(cfg, step),
                        "images_per_s": images_per_s,
                        "grad_norm": grad_norm_value / good if good else None,
                        "skipped_steps": steps_since_log - round(good),
                        "bad_items": round(bad_data * info.world_size),
                        "bad_files": bad_files,
                    }
                    metrics.write(done, values)
                    progress.log(done, values["loss"], images_per_s)
                train_step.reset_metrics()
                bad_items = 0
                steps_since_log, log_start = 0, time.perf_counter()
            # SIGTERM / SIGINT on any rank: all ranks stop after this same step, with a checkpoint.
            preempted = (
                stop_signal.requested
                if info.world_size == 1
                else dist.any_rank(stop_signal.requested)
            )
            if checkpoint_now or preempted:
                final_checkpoint = save_step_checkpoint(run, done, config_text)
            kill_point(f"step:{done}")
            # Optional outputs after the checkpoint, so that they can never cost the training;
            # none once a stop is asked for.
            if (
                (info.is_main or cfg.parallel == "fsdp")
                and not preempted
                and (done == cfg.steps or (cfg.sample_every and done % cfg.sample_every == 0))
            ):
                write_samples(run, done)
            if preempted:
                # Every rank says where it stopped before anyone exits (torchrun then terminates
                # the slower ranks as soon as one has exited).
                # One write per line: two ranks share torchrun's stderr, and print() writes the
                # text and its newline separately, so lines from different ranks interleave.
                sys.stderr.write(f"\nrank {info.rank}: stopping after step {done}\n")
                sys.stderr.flush()
                dist.barrier()
                raise Preempted(
                    f"stopped by {stop_signal.name or 'a signal to another rank'} after step "
                    f"{done}; checkpoint written: "
                    f"{checkpoint_lib.latest_checkpoint(run_dir)}. Continue with --resume"
                )
    except RuntimeError as error:  # a collective failed: named when a peer's process is gone
        lost = dist.lost_ranks() if not isinstance(error, ExpectedStop) else ""
        if not lost:
            raise
        raise RankLost(
            f"rank {info.rank}: {lost} died during step {step + 1}; the last checkpoint "
            f"({checkpoint_lib.latest_checkpoint(run_dir) or 'none yet'}) is intact. Rerun "
            "with --resume (torchrun --max-restarts=N resumes by itself)"
        ) from None
    finally:
        torch.use_deterministic_algorithms(deterministic_before)
        if owns_handlers:
            preemption.uninstall()
        progress.close()
        if metrics is not None:
            metrics.close()
    dist.barrier()
    if info.is_main:
        print(
            f"run folder: {run_dir}\n  checkpoint: {final_checkpoint}\n"
            f"  samples: {run_dir / 'samples'}\n"
            f"  metrics: {run_dir / 'metrics.jsonl'}"
        )
    return checkpoint_lib.latest_checkpoint(run_dir) or run_dir


def capture_step(run: Run, batch: dict[str, torch.Tensor], log=print) -> None:
    """Capture the step as one CUDA graph on its first batch where the plan says so
    (fastsp.training.graph_plan.plan_graph); backends.json then says what happened."""
    if not run.plan.graph.captured:
        return  # backends.json already says why the step runs eagerly
    # With DDP a failed capture stops the run (fastsp.errors.GraphCaptureError), on every rank: a
    # rank whose capture worked would otherwise wait in the graph's all-reduce for one that left.
    failed = None
    try:
        captured = run.step.capture(batch, log=log)
    except GraphCaptureError as error:
        failed = error
    if run.step.config.ddp and dist.any_rank(failed is not None):
        raise failed or GraphCaptureError(
            "CUDA graph capture of the DDP step failed on another rank (its error says why); "
            "rerun with --no-cuda-graph"
        )
    run.backends["cuda_graph"] = (
        "captured: the whole step replays as one CUDA graph"
        if captured
        else f"eager ({run.step.graph_error or 'capture is not supported here, see the log'})"
    )
    if run.run_dir.exists():
        write_backends(run)


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up over lr_warmup_steps, then constant."""
    if cfg.lr_warmup_steps == 0:
        return cfg.lr
    return cfg.lr * min(1.0, (step + 1) / cfg.lr_warmup_steps)


def ema_decay(cfg: TrainConfig, step: int) -> float:
    """The configured decay, warmed up as min(decay, (1 + step) / (10 + step)).

    Without the warm-up a 0.999 EMA after 1,000 steps still holds 0.999^1000 = 37% of the random
    initial weights; with it the EMA is an average over roughly the last (step / 10) steps early on.
    """
    return min(cfg.ema_decay, (1 + step) / (10 + step))


def use_deterministic_algorithms() -> None:
    """--deterministic: torch's deterministic kernels, so that a rerun or a resumed run is
    bit-identical on CUDA as it is on the CPU. cuBLAS needs a fixed workspace size for that, set
    before its first use (PyTorch's reproducibility notes); the loop's first step is that use."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False


def stop_before_training(agree: bool) -> None:
    """Raise Preempted if a stop was asked for (fastsp.preemption) before the first write;
    `agree`: on any rank (the process group is up), so that every rank stops."""
    stop = preemption.install() if preemption.installed() else None
    requested = stop is not None and stop.requested
    if agree:
        requested = dist.any_rank(requested)
    if requested:
        raise Preempted(
            f"stopped by {(stop and stop.name) or 'a signal to another rank'} before training "
            "started; nothing was written. Rerun the same command"
        )
