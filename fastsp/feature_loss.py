"""Feature-space MSE losses: torch's ``mse_loss`` contract, Triton kernels underneath.

Equivalent PyTorch code::

    feature_mse(input, target, reduction)
        == torch.nn.functional.mse_loss(input, target, reduction=reduction)
    FeatureMSELoss(reduction)(input, target)
        == torch.nn.MSELoss(reduction=reduction)(input, target)
    feature_mse_multi(inputs, targets, weights)
        == sum(w * torch.nn.functional.mse_loss(x, y) for x, y, w in zip(inputs, targets, weights))

Backends: ``"triton"`` runs the kernels of ``fastsp.kernels.feature_mse`` and
``fastsp.kernels.feature_mse_multi`` (one pass over memory, gradient fused into the forward,
deterministic, no host sync, traced by ``torch.compile(fullgraph=True)`` without graph breaks;
tested with the aot_eager backend and, for feature_mse on CPU, inductor); ``"torch"`` runs the
reference above; ``"auto"`` picks Triton for CUDA tensors, and for CPU tensors when Triton runs in
its interpreter (``TRITON_INTERPRET=1`` set before triton is imported), the reference otherwise.
Forcing ``"triton"`` where it cannot run raises ``TritonUnavailableError`` listing every reason.
``feature_mse_backend(device)`` names the backend a run gets, for its log.
As ``F.mse_loss``, differing input and target sizes warn (in eager mode only: under torch.compile
the warning would be a graph break) and incompatible ones raise the same RuntimeError.
Not supported by the Triton backend: double backward (backward with ``create_graph=True``
raises a RuntimeError naming ``backend="torch"``).

Triton not installed is the one import failure that falls back (to the reference, under
``"auto"``). Any other failure to import ``fastsp.kernels`` (a syntax error, a missing name, a
triton whose API the kernels do not match) raises ``KernelImportError`` when this module is
imported, rather than letting a run train on the slow path without saying so.
"""

import importlib
import importlib.metadata
import warnings
from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = [
    "FeatureMSELoss",
    "KernelImportError",
    "TritonUnavailableError",
    "feature_mse",
    "feature_mse_backend",
    "feature_mse_multi",
    "feature_mse_multi_ref",
    "feature_mse_ref",
    "triton_unsupported_reasons",
]

_BACKENDS = ("auto", "triton", "torch")
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Imported in this order, so that the first one named in a failure is the one that is broken.
_KERNEL_MODULES = (
    "fastsp.kernels._common",
    "fastsp.kernels.feature_mse",
    "fastsp.kernels.feature_mse_multi",
)


class KernelImportError(RuntimeError):
    """fastsp's Triton kernels fail to import for a reason other than triton not being installed.

    A RuntimeError, not an ImportError: code that guards an optional import with
    ``except ImportError`` must not turn a broken install back into a silent slow path.
    """

    def __init__(self, module: str, err: Exception):
        self.module = module
        try:
            triton_version = importlib.metadata.version("triton")
        except importlib.metadata.PackageNotFoundError:
            triton_version = "not found"
        super().__init__(
            f"importing {module} failed: {type(err).__name__}: {err}\n"
            "fastsp falls back to F.mse_loss only when triton is not installed; this is a broken "
            f"install instead (triton {triton_version}, torch {torch.__version__}).\n"
            "Fix: reinstall fastsp (`pip install -e .` in its checkout), or install a triton "
            "version that works with this torch (setup.py asks for triton>=3.2)."
        )


def _import_kernels():
    """(_common, feature_mse, feature_mse_multi, None): the kernel modules; or, when triton is not
    installed, (None, None, None, that reason). Any other failure raises KernelImportError."""
    modules = []
    for name in _KERNEL_MODULES:
        try:
            modules.append(importlib.import_module(name))
        except ModuleNotFoundError as err:
            missing = err.name or ""
            if missing != "triton" and not missing.startswith("triton."):
                raise KernelImportError(name, err) from err
            detail = "" if missing == "triton" else f" (no module {missing!r})"
            return None, None, None, f"triton is not installed{detail}"
        except Exception as err:  # a syntax error, a missing name, triton's API changed, ...
            raise KernelImportError(name, err) from err
    return (*modules, None)


_kc, _k, _km, _IMPORT_ERROR = _import_kernels()


class TritonUnavailableError(NotImplementedError):
    """``backend="triton"`` forced on tensors the kernels cannot take; ``.reasons`` says why."""

    def __init__(self, op: str, reasons: list[str]):
        self.reasons = reasons
        lines = "\n".join(f"  - {r}" for r in reasons)
        super().__init__(f"{op}: the triton backend cannot run because:\n{lines}")


def triton_unsupported_reasons(*tensors: Tensor) -> list[str]:
    """Every reason the Triton kernels cannot take ``tensors`` (empty when they can).

    Triton not being installed is listed with the others: the device and dtype reasons would
    still stop these tensors once it is.
    """
    return _unsupported_reasons({t.device for t in tensors}, {t.dtype for t in tensors})


def _unsupported_reasons(devices: set[torch.device], dtypes: set[torch.dtype]) -> list[str]:
    # The one copy of the rules: for tensors, and for a bare device (feature_mse_backend).
    reasons = [] if _IMPORT_ERROR is None else [_IMPORT_ERROR]
    interpreted = _IMPORT_ERROR is None and _kc.INTERPRETED
    if len(devices) > 1:
        reasons.append(f"tensors are on different devices: {sorted(map(str, devices))}")
    for device in sorted(devices, key=str):
        if device.type == "cpu" and not interpreted:
            reasons.append(
                "the Triton kernels run on CUDA, or on CPU only under TRITON_INTERPRET=1 set "
                "before triton is imported"
            )
        elif device.type not in ("cpu", "cuda"):
            reasons.append(f"device {device} is neither CUDA nor CPU")
    for dtype in sorted({d for d in dtypes if d not in _DTYPES}, key=str):
        reasons.append(f"dtype {dtype} is not float32, bfloat16 or float16")
    return reasons


def _torch_reasons(
    op: str, backend: str, devices: set[torch.device], dtypes: set[torch.dtype]
) -> list[str]:
    """Why ``op`` runs the reference on these devices and dtypes; empty when it runs the kernels.
    A forced ``"triton"`` that cannot run raises instead."""
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if backend == "torch":
        return ["backend='torch'"]
    reasons = _unsupported_reasons(devices, dtypes)
    if reasons and backend == "triton":
        raise TritonUnavailableError(op, reasons)
    return reasons


def _use_triton(op: str, backend: str, tensors: Sequence[Tensor]) -> bool:
    return not _torch_reasons(op, backend, {t.device for t in tensors}, {t.dtype for t in tensors})


def feature_mse_backend(device: torch.device | str, backend: str = "auto") -> str:
    """The backend ``feature_mse`` and ``feature_mse_multi`` run on ``device``, as one line for a
    run's log: ``"triton (fused kernels)"``, ``"triton (interpreter)"`` (Triton's interpreter,
    ``TRITON_INTERPRET=1``), or ``"torch F.mse_loss (<reasons>)"`` with the reasons of
    ``triton_unsupported_reasons`` (``"triton is not installed"``, the CPU rule, ...) or
    ``backend='torch'``. For float32/bfloat16/float16 features. Reads no tensor and touches no
    device (no allocation, no sync). A forced ``backend="triton"`` that cannot run on ``device``
    raises ``TritonUnavailableError``, as the losses would at their first call.
    """
    reasons = _torch_reasons("feature_mse", backend, {torch.device(device)}, set())
    if reasons:
        return f"torch F.mse_loss ({'; '.join(reasons)})"
    return "triton (interpreter)" if _kc.INTERPRETED else "triton (fused kernels)"


def _broadcast_pair(input: Tensor, target: Tensor, stacklevel: int) -> tuple[Tensor, Tensor]:
    # Same warning, same broadcasting and same error for incompatible shapes as F.mse_loss. The
    # warning is eager-only: warnings.warn would be a graph break under torch.compile.
    if target.size() != input.size() and not torch.compiler.is_compiling():
        warnings.warn(
            f"Using a target size ({target.size()}) that is different to the input size "
            f"({input.size()}). This will likely lead to incorrect results due to broadcasting. "
            "Please ensure they have the same size.",
            stacklevel=stacklevel + 1,
        )
    return torch.broadcast_tensors(input, target)


def feature_mse_ref(input: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
    """Plain-torch reference (tests, benchmarks and the fallback share it)."""
    return torch.nn.functional.mse_loss(input, target, reduction=reduction)


def feature_mse(
    input: Tensor, target: Tensor, reduction: str = "mean", *, backend: str = "auto"
) -> Tensor:
    """Mean squared error between ``input`` [*] and ``target`` [*] (broadcastable).

    Returns a 0-d tensor for ``mean``/``sum`` and the broadcast shape for ``none``, in
    ``torch.promote_types(input.dtype, target.dtype)``; accumulates in fp32. Gradients flow to
    ``input`` and ``target``. Equivalent to
    ``torch.nn.functional.mse_loss(input, target, reduction=reduction)``.
    """
    if reduction not in ("none", "mean", "sum"):
        raise ValueError(f"{reduction} is not a valid value for reduction")
    x, y = _broadcast_pair(input, target, stacklevel=2)
    if not _use_triton("feature_mse", backend, (x, y)):
        return feature_mse_ref(x, y, reduction)
    return _k.feature_mse(x, y, reduction)


class FeatureMSELoss(nn.Module):
    """``nn.MSELoss`` on the fused kernels: ``FeatureMSELoss(reduction)(input, target)``."""

    def __init__(self, reduction: str = "mean", *, backend: str = "auto"):
        super().__init__()
        if reduction not in ("none", "mean", "sum"):
            raise ValueError(f"{reduction} is not a valid value for reduction")
        self.reduction = reduction
        self.backend = backend

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return feature_mse(input, target, self.reduction, backend=self.backend)

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}"


def _stack_weights(weights: Sequence[float | Tensor] | Tensor) -> Sequence[float] | Tensor:
    """Numbers as they are, else one 1-D tensor built on the device: weight tensors in a list are
    stacked (differentiably), never read with float() (a host sync and a graph break); numbers
    mixed in become fills of the first tensor's dtype and device."""
    if isinstance(weights, Tensor) or not any(isinstance(w, Tensor) for w in weights):
        return weights
    like = next(w for w in weights if isinstance(w, Tensor))
    return torch.stack(
        [
            w.reshape(())
            if isinstance(w, Tensor)
            else torch.full((), w, dtype=like.dtype, device=like.device)
            for w in weights
        ]
    )


def feature_mse_multi_ref(
    inputs: Sequence[Tensor], targets: Sequence[Tensor], weights: Sequence[float] | Tensor
) -> Tensor:
    """Plain-torch reference: ``sum_i weights[i] * mse_loss(inputs[i], targets[i])``."""
    losses = [feature_mse_ref(x, y) for x, y in zip(inputs, targets, strict=True)]
    return sum(w * loss for w, loss in zip(weights, losses, strict=True))


def feature_mse_multi(
    inputs: Sequence[Tensor],
    targets: Sequence[Tensor],
    weights: Sequence[float | Tensor] | Tensor,
    *,
    backend: str = "auto",
) -> Tensor:
    """Weighted sum of per-pair mean squared errors, all pairs in one kernel launch.

    ``inputs[i]`` and ``targets[i]`` are broadcastable to each other; shapes and dtypes differ from
    pair to pair. ``weights`` is a sequence of numbers, a 1-D tensor of ``len(inputs)``, or a
    sequence of one-value tensors, which is stacked into one on the device (any of the tensors may
    require grad; none is read on the host). Returns a 0-d tensor in the promoted dtype of all
    inputs and targets, accumulated in fp32. Equivalent to
    ``sum(w * torch.nn.functional.mse_loss(x, y) for x, y, w in zip(inputs, targets, weights))``.
    """
    inputs, targets, weights = list(inputs), list(targets), _stack_weights(weights)
    if len(inputs) != len(targets) or len(inputs) != len(weights):
        raise ValueError(
            f"need as many targets and weights as inputs: {len(inputs)} inputs, "
            f"{len(targets)} targets, {len(weights)} weights"
        )
    if not inputs:
        raise ValueError("feature_mse_multi needs at least one input")
    pairs = [_broadcast_pair(x, y, stacklevel=2) for x, y in zip(inputs, targets, strict=True)]
    xs, ys = [p[0] for p in pairs], [p[1] for p in pairs]
    tensors = xs + ys + ([weights] if isinstance(weights, Tensor) else [])
    if not _use_triton("feature_mse_multi", backend, tensors):
        return feature_mse_multi_ref(xs, ys, weights)
    return _km.feature_mse_multi(xs, ys, weights)
