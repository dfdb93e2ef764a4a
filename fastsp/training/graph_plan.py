"""The one decision of whether a run's step is captured as a CUDA graph (`plan_graph`), the
reasons it is not, and the environment a captured DDP step needs before its process group
starts. The plan (fastsp.training.plan) makes it once; the step (`fastsp.step.TrainStep.capture`),
the assembly (DDP on a side stream) and backends.json follow it.
"""

from __future__ import annotations

from dataclasses import dataclass

# PyTorch's CUDA-graph notes ("Usage with torch.nn.parallel.DistributedDataParallel"): a DDP
# backward can be captured only with NCCL's async error handling off, set before the process
# group starts. torchrun's agent puts TORCH_NCCL_ASYNC_ERROR_HANDLING (default "1") into every
# worker's environment, so the value is assigned, not set as a default.
NCCL_GRAPH_ENVIRONMENT = {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "0"}


@dataclass(frozen=True)
class GraphPlan:
    """The one answer to "is the step captured as a CUDA graph, and why not" (`plan_graph`):
    the trainer captures (`TrainStep.capture`), builds DDP on a side stream and assigns
    `environment` before the process group starts exactly when `captured`."""

    reasons: tuple[str, ...]  # why the step runs eagerly; empty: it is captured at the first step
    environment: dict[str, str]  # to assign before init_process_group (NCCL_GRAPH_ENVIRONMENT)

    @property
    def captured(self) -> bool:
        return not self.reasons

    def describe(self) -> str:
        """backends.json's cuda_graph line before the first step."""
        if self.captured:
            return "to be captured at the first step"
        return "eager (" + "; ".join(self.reasons) + ")"

    def describe_environment(self) -> str:
        """backends.json's graph_environment line."""
        if not self.environment:
            return "unchanged (no CUDA-graph capture with DDP on CUDA)"
        assigned = ", ".join(f"{name}={value}" for name, value in self.environment.items())
        return f"{assigned} (assigned for CUDA-graph capture of DDP)"


def fused_adamw(cfg) -> bool:
    """Whether a run of `cfg` (a TrainConfig) steps with torch's fused AdamW, which takes
    `found_inf` and the learning rate as device tensors (no host sync: capturable). The
    reference step uses torch's default AdamW, as fastsp.reference does; apex FusedAdam has no
    found_inf."""
    return cfg.optimizer == "adamw" and cfg.train_step == "fast"


def plan_graph(cfg, world_size: int, device_type: str) -> GraphPlan:
    """Whether a run of `cfg` (a TrainConfig: cuda_graph, train_step, optimizer) with
    `world_size` processes on `device_type` captures its step, the reasons it does not, and
    the environment a captured DDP step needs (nothing for one process or the gloo/CPU path)."""
    reasons = []
    if device_type != "cuda":
        reasons.append(f"the step runs on {device_type}, CUDA graphs need CUDA")
    if not fused_adamw(cfg):
        reasons.append("the optimizer is not torch's fused AdamW (no found_inf: a host sync)")
    if cfg.train_step == "reference":
        reasons.append("the reference step is the eager oracle")
    if not cfg.cuda_graph:
        reasons.append("--no-cuda-graph")
    if cfg.parallel == "fsdp":  # its per-block all-gathers and frees run on its own streams
        reasons.append("--parallel fsdp: torch does not capture FSDP2's all-gathers in a graph")
    captured_ddp = not reasons and world_size > 1
    return GraphPlan(tuple(reasons), dict(NCCL_GRAPH_ENVIRONMENT) if captured_ddp else {})
