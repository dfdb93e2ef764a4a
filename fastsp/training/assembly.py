"""The assembly of a planned run: model, EMA, perceptual loss, optimizer, DDP and its stream,
torch.compile, and the step (fastsp.step.TrainStep), with the resumed state loaded.

`assemble(plan, device)` is the one assembly: the trainer (fastsp.training.loop.build_run), the
dry run (fastsp.dryrun) and the step benchmark (benchmarks/bench_step.py, through build_run)
all call it, so what they build is what a run trains. It writes no file and touches no
process-wide state besides seeding torch's global generator (the models' initialisation); the
environment a captured DDP step needs and the process group are the caller's (build_run), since
both must come before it. `on_meta=True` builds the networks on the meta device and
materialises them on `device` with `to_empty`: the dry run's fake CUDA, where nothing is read.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from fastsp import checkpoint as checkpoint_lib
from fastsp import diffusers_unet, dist, families
from fastsp.attention import describe_backend as describe_attention
from fastsp.config import DiTConfig, TrainConfig, UNetConfig
from fastsp.errors import ConfigError
from fastsp.family_attention import use_attention
from fastsp.family_config import DiffusersConfig, find_denoiser_folder
from fastsp.feature_loss import feature_mse_backend
from fastsp.model_guidance import ModelGuidance
from fastsp.models import build_model
from fastsp.perceptual import SelfPerceptualLoss
from fastsp.step import StepConfig, TrainStep
from fastsp.training.graph_plan import fused_adamw
from fastsp.training.plan import Plan
from fastsp.unet import decide_attention, record_fmha


@dataclasses.dataclass
class Run:
    """A planned, assembled training run that has not started: `assemble` writes no file.

    fastsp.training.loop.run_loop trains it. Benchmarks and tests time and inspect `run.step`,
    the very step the loop runs. The networks are fastsp.models' (a UNet or a DiT).
    """

    plan: Plan
    info: dist.DistInfo  # this process's rank, the world size and the device
    model: torch.nn.Module  # the online model's fp32 master weights
    ema: torch.nn.Module
    optimizer: torch.optim.Optimizer
    perceptual_loss: SelfPerceptualLoss | None
    step: TrainStep
    start_step: int  # 0, or the step of the checkpoint resumed from
    backends: dict[str, str]  # what runs each part of the step (attention, feature MSE, ...)

    @property
    def cfg(self) -> TrainConfig:
        return self.plan.cfg

    @property
    def model_cfg(self) -> UNetConfig | DiTConfig:
        return self.plan.model_cfg

    @property
    def run_dir(self) -> Path:
        return self.plan.run_dir

    @property
    def dataset(self):
        return self.plan.dataset

    @property
    def resume_from(self) -> Path | None:
        return self.plan.resume_from


def assemble(
    plan: Plan,
    info: dist.DistInfo,
    *,
    on_meta: bool = False,
    step_class: type[TrainStep] = TrainStep,
) -> Run:
    """Build the run of `plan` on info.device as rank info.rank of plan.world_size (DDP when
    more than one: the process group must be up), loading plan.init_from, plan.perceptual_from
    and plan.resume_from where they are set. `step_class`: a TrainStep subclass (the dry run's
    planted faults)."""
    cfg, model_cfg, device = plan.cfg, plan.model_cfg, info.device
    torch.manual_seed(cfg.seed)
    # A fresh run starts from --init's weights (stage 2 from stage 1's EMA); a resumed one from
    # its checkpoint, loaded below.
    # On the meta device: outside the fake-tensor mode a dry run calls this in (the perceptual
    # loss's tables branch on the schedule's values), materialised inside it below.
    with torch._subclasses.fake_tensor.unset_fake_temporarily() if on_meta else nullcontext():
        source = plan.init_from if plan.resume_from is None else None
        model = new_network(plan, device, on_meta, source)
        if cfg.lora_rank:
            from fastsp import lora

            model = lora.add_adapters(model, cfg, model_cfg)
            if plan.lora_init_from is not None and plan.resume_from is None:
                lora.load_adapter(model, plan.lora_init_from)
            ema = lora.ema_copy(model)  # the adapters' EMA; the base tensors are the model's
        else:
            ema = copy.deepcopy(model).requires_grad_(False).eval()
        perceptual_loss = build_perceptual_loss(plan, ema, device, on_meta, model)
    if on_meta:
        frozen = [perceptual_loss.perceptual] if perceptual_loss is not None else []
        for network in {id(n): n for n in [model, ema, *frozen]}.values():
            network.to_empty(device=device)  # strides (channels_last) and dtypes kept
        if cfg.lora_rank:
            lora.tie_frozen(ema, model)
    fsdp = cfg.parallel == "fsdp"
    if fsdp:  # every network sharded, then the optimizer over the shards
        from fastsp.training import parallel

        frozen = [perceptual_loss.perceptual] if perceptual_loss is not None else []
        for network in {id(n): n for n in [model, ema, *frozen]}.values():
            parallel.shard(network, device, plan.bf16)
    optimizer = build_optimizer(cfg, [p for p in model.parameters() if p.requires_grad], device)
    start_step = 0
    if plan.resume_from is not None:
        load = parallel.load_training_state if fsdp else checkpoint_lib.load_training_state
        state = load(plan.resume_from, model, ema, optimizer)
        start_step = state["step"]
    online = model
    # The one side stream of a captured DDP step: DDP is built on it, and TrainStep.capture
    # warms up and captures on it (it says why). None for an eager step, which runs on the
    # stream DDP was built on, and for one process, whose capture makes its own.
    ddp = plan.world_size > 1 and not fsdp
    stream = torch.cuda.Stream(device) if plan.graph.captured and ddp else None
    if ddp:
        online = wrap_ddp(model, device, stream)
    networks = [model] + ([perceptual_loss.features.network] if perceptual_loss else [])
    dtype = torch.bfloat16 if plan.bf16 else torch.float32  # what the attention layers see
    attention_backend = describe_attention(model_cfg.attention_backend, device)
    if isinstance(model_cfg, DiffusersConfig):  # diffusers' processors: xformers or SDPA
        backend = model_cfg.attention_backend
        attention_backend = use_attention([*networks, ema], backend, device, dtype, cfg.compile)
    attention_fmha = None
    if device.type == "cuda" and model_cfg.attention_backend in ("auto", "xformers"):
        attention_fmha = record_fmha(networks, device, dtype)
    if cfg.compile:
        # Dynamo must not trace xformers' support checks (fastsp.attention): each attention
        # layer's kernel is chosen here, once, outside compiled code.
        attention_backend = decide_attention(networks, device, dtype) or attention_backend
        online = torch.compile(online)
        if perceptual_loss is not None:
            features = perceptual_loss.features
            features.network = torch.compile(features.network)
    dataset = plan.dataset
    step = step_class(
        StepConfig.from_train(
            cfg,
            model_cfg,
            world_size=plan.world_size,
            rank=info.rank,
            bf16=plan.bf16,
            context_shape=dataset.context_shape if model_cfg.context_dim else None,
            pooled_dim=getattr(dataset, "pooled_dim", 0),
            time_ids=getattr(dataset, "has_time_ids", False),
        ),
        model=model,
        online=online,
        ema=ema,
        optimizer=optimizer,
        schedule=plan.schedule,
        perceptual_loss=perceptual_loss,
        device=device,
        # CFG dropout's context: the empty prompt's embedding of fastsp.prepare's shards
        null_context=getattr(dataset, "null_context", None),
        null_pooled=getattr(dataset, "null_pooled", None),
        stream=stream,
        model_guidance=build_model_guidance(plan, ema),
    )
    backends = {
        "attention": attention_backend,
        **({"attention_fmha": attention_fmha} if attention_fmha else {}),
        "feature_mse": feature_mse_backend(device),
        "optimizer": describe_optimizer(optimizer, device),
        "precision": "bf16 autocast, fp32 master weights" if plan.bf16 else "fp32",
        "compile": "torch.compile (online and perceptual networks)" if cfg.compile else "off",
        "parallel": describe_parallel(plan),
        "lora": describe_lora(plan, model),
        "cuda_graph": plan.graph.describe(),
        "graph_environment": plan.graph.describe_environment(),
    }
    return Run(plan, info, model, ema, optimizer, perceptual_loss, step, start_step, backends)


def new_network(
    plan: Plan,
    device: torch.device,
    on_meta: bool,
    source: Path | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.nn.Module:
    """A network of plan.model_cfg on `device`, in plan's memory format and `dtype`, with the
    weights of `source` (fastsp.diffusers_unet.resolve_source) or freshly initialised. `on_meta`:
    on the meta device instead, nothing read (the caller materialises it)."""
    if on_meta:
        with torch.device("meta"):
            return build_model(plan.model_cfg).to(dtype, memory_format=plan.memory_format)
    diffusers_folder = isinstance(plan.model_cfg, DiffusersConfig) and source is not None
    if diffusers_folder and find_denoiser_folder(source) == source:
        network = families.from_pretrained(plan.model_cfg, source)  # diffusers' own loading
    else:
        network = build_model(plan.model_cfg)
        if source is not None:
            diffusers_unet.load_state_into(network, source)
    return network.to(device, dtype, memory_format=plan.memory_format)


def build_perceptual_loss(
    plan: Plan,
    ema: torch.nn.Module,
    device: torch.device,
    on_meta: bool = False,
    model: torch.nn.Module | None = None,
) -> SelfPerceptualLoss | None:
    """Stage 2's loss around the frozen perceptual network (plan.perceptual_from's weights, held
    in plan.frozen_dtype), the online model's EMA, or under LoRA the online `model` itself with
    its adapters off (plan.perceptual_adapters_off: no second copy)."""
    cfg = plan.cfg
    if cfg.objective != "self_perceptual":
        return None
    context = None
    if plan.perceptual_adapters_off:
        from fastsp import lora

        perceptual = model
        context = functools.partial(lora.adapters_off, model)
    elif cfg.perceptual_source == "ema":
        perceptual = ema
    else:
        perceptual = new_network(plan, device, on_meta, plan.perceptual_from, plan.frozen_dtype)
    try:
        return SelfPerceptualLoss(
            perceptual,
            plan.schedule,
            layers=cfg.perceptual_layers,
            perceptual_t=cfg.perceptual_t,
            predicted_noise=cfg.predicted_noise,
            distance=cfg.distance,
            batched_branches=cfg.batched_branches,
            perceptual_on_t=cfg.perceptual_on_t,
            perceptual_context=context,
            feature_norm=cfg.perceptual_norm,
        )
    except ValueError as error:  # e.g. a tap name the model does not have
        raise ConfigError(f"--perceptual-layers: {error}") from None


def build_model_guidance(plan: Plan, ema: torch.nn.Module) -> ModelGuidance | None:
    """Model guidance's guided target (--objective model_guidance), guided by the online
    model's EMA as the authors' code is (fastsp.model_guidance)."""
    cfg = plan.cfg
    if cfg.objective != "model_guidance":
        return None
    return ModelGuidance(ema, plan.schedule.num_timesteps, cfg.mg_scale, cfg.mg_t_max)


def build_optimizer(cfg: TrainConfig, params, device: torch.device) -> torch.optim.Optimizer:
    if cfg.optimizer == "apex_fused_adam":
        from apex.optimizers import FusedAdam  # checked importable by the plan

        return FusedAdam(
            params,
            lr=cfg.lr,
            betas=(cfg.adam_beta1, cfg.adam_beta2),
            eps=cfg.adam_eps,
            weight_decay=cfg.weight_decay,
            adam_w_mode=True,
        )
    fused = fused_adamw(cfg)
    return torch.optim.AdamW(
        params,
        lr=cfg.lr,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        eps=cfg.adam_eps,
        weight_decay=cfg.weight_decay,
        # The fast step: torch's fused AdamW (CUDA and CPU), one kernel per step; it reads
        # `found_inf`, so a step with non-finite gradients is skipped on the device without a
        # host sync, and with capturable=True (CUDA) it can be captured in a CUDA graph. The
        # reference step: torch's default AdamW, as fastsp.reference uses.
        fused=fused,
        capturable=fused and device.type == "cuda",
    )


def describe_parallel(plan: Plan) -> str:
    """backends.json's parallel line: how the weights are spread over the processes."""
    if plan.cfg.parallel == "fsdp":
        dtype = (
            "bf16 compute, fp32 reduction" if plan.bf16 and plan.device_type == "cuda" else "fp32"
        )
        return f"FSDP2 over {plan.world_size} processes (fully_shard per block, {dtype})"
    return f"DDP over {plan.world_size} processes" if plan.world_size > 1 else "one process"


def describe_lora(plan: Plan, model: torch.nn.Module) -> str:
    """backends.json's lora line: off, or the adapters and what the perceptual pass runs."""
    cfg = plan.cfg
    if not cfg.lora_rank:
        return "off (every weight trains)"
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    line = f"peft LoRA rank {cfg.lora_rank}, {trained} adapter weights train"
    if plan.perceptual_adapters_off:
        line += "; perceptual pass: the base with its adapters off (no frozen copy)"
    return line


def describe_optimizer(optimizer: torch.optim.Optimizer, device: torch.device) -> str:
    """The optimizer implementation a run uses, for its first lines and backends.json."""
    if type(optimizer).__module__.startswith("apex"):
        return "apex FusedAdam (adam_w_mode)"
    flags = [name for name in ("fused", "foreach", "capturable") if optimizer.defaults.get(name)]
    if not flags:  # torch picks: foreach for CUDA tensors, a for-loop for CPU ones
        flags = [
            "foreach" if device.type == "cuda" else "for-loop",
            f"torch's default on {device.type.upper()}",
        ]
    return f"torch {type(optimizer).__name__} ({', '.join(flags)})"


def wrap_ddp(
    model: torch.nn.Module, device: torch.device, stream: torch.cuda.Stream | None
) -> DistributedDataParallel:
    """DDP around `model`, constructed on `stream` when given (PyTorch's CUDA-graph notes: a
    DDP backward to be captured needs DDP built on a side stream, the one the step is warmed up
    and captured on; see fastsp.step.TrainStep.capture)."""
    with torch.cuda.stream(stream):  # None: the current stream
        online = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    if stream is not None:
        torch.cuda.current_stream().wait_stream(stream)
    return online
