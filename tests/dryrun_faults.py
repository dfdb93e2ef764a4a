"""Faults planted into copies of the training step, each dry-run on fake CUDA in this process.

    python tests/dryrun_faults.py OUT.json

Run by tests/test_dryrun.py as its own process: importing fastsp.dryrun registers fake CUDA for
the whole process (it must come before torch). Writes {fault: the dry run's one-line report, or
null if the planted step passed}.
"""

import json
import sys

import fastsp.dryrun as dryrun  # first: before torch  # isort: skip

import torch  # noqa: E402

from fastsp.errors import DryRunFault
from fastsp.step import TrainStep  # noqa: E402


class CPUTensorInACUDAOp(TrainStep):
    def update_ema(self):
        super().update_ema()
        self.ema_params[0].add_(torch.ones(self.ema_params[0].shape))  # built on the CPU


class HostRead(TrainStep):
    def update_ema(self):
        if self.ema_step_weight.item() > 0:  # the EMA skipped on the host
            super().update_ema()


class HostToDeviceCopy(TrainStep):
    def update_ema(self):
        table = torch.linspace(0, 1, 11).to(self.device)  # built on the host at every step
        self.ema_step_weight.mul_(table[10])
        super().update_ema()


class PerceptualOutsideAutocast(TrainStep):
    """The bf16 frozen network run with autocast off: fp32 activations meet bf16 weights."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        features = self.perceptual_loss.features
        network = features.network

        def without_autocast(*inputs, **options):
            with torch.autocast("cuda", enabled=False):
                return network(*inputs, **options)

        features.network = without_autocast


class CPULearningRate(TrainStep):
    """The learning rate a CPU tensor: the fused kernel reads it on the host, outside a graph."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.lr = torch.zeros(())
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr


# name: (the planted step, its options); host_read_eager is no fault: an eager step may sync
FAULTS = {
    "cpu_tensor": (CPUTensorInACUDAOp, []),
    "host_read": (HostRead, []),
    "host_read_eager": (HostRead, ["--no-cuda-graph"]),
    "host_to_device": (HostToDeviceCopy, []),
    "autocast_dtype": (PerceptualOutsideAutocast, ["--objective", "self_perceptual"]),
    "cpu_lr": (CPULearningRate, []),
}


def main(out: str) -> None:
    found = {}
    for name, (step_class, options) in FAULTS.items():
        cfg, model_cfg = dryrun.dry_configs(["--preset", "tiny", *options])
        try:
            dryrun.dry_step(cfg, model_cfg, step_class)
            found[name] = None
        except DryRunFault as fault:
            found[name] = str(fault)
    with open(out, "w", encoding="utf-8") as f:
        json.dump(found, f, indent=2)


if __name__ == "__main__":
    main(sys.argv[1])
