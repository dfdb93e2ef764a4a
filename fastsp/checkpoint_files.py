"""Reading one file of a checkpoint without executing code, or naming what is wrong with it.

Each reader checks the file before it trusts it and raises a `CheckpointError` that names the
file and the fix: missing, empty, unreadable for this user (nothing advises deleting it then),
truncated or garbled ("damaged: delete the folder to resume from the previous checkpoint"), or a
pickle that asks to import code or build objects that are not tensors (refused, never retried
unsafely: `torch.load(weights_only=True)` only). fastsp.checkpoint reads every file through here.
"""

from __future__ import annotations

import json
import os
import pickle
import pickletools
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from fastsp.errors import CheckpointError


def damaged(file: Path, problem: str) -> CheckpointError:
    return CheckpointError(
        f"{file} {problem}: the checkpoint {file.parent} is damaged. Delete that folder to resume "
        "from the previous checkpoint of the run, or pass another checkpoint"
    )


def first_line(error: BaseException) -> str:
    """The first sentence of an error message (torch's run on with advice)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error)).strip()  # torch colours some messages
    if not text:
        return type(error).__name__
    line = text.splitlines()[0]
    return line.split(". ")[0][:200] if len(line) > 120 else line


def unreadable(file: Path) -> CheckpointError:
    """A file this user may not read: nothing says it is damaged, so nothing advises deleting."""
    return CheckpointError(
        f"{file} cannot be read: permission denied. The checkpoint may well be intact: give this "
        "user read access to its folder and files, or pass another checkpoint"
    )


def require_file(file: Path) -> None:
    try:
        exists = file.is_file()
    except PermissionError:  # the folder above it cannot be searched
        raise unreadable(file) from None
    if not exists:
        raise damaged(file, "is missing")
    if not os.access(file, os.R_OK):
        raise unreadable(file)
    if file.stat().st_size == 0:
        raise damaged(file, "is empty (0 bytes)")


def read_json(file: Path) -> Any:
    require_file(file)
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:  # JSONDecodeError, UnicodeDecodeError are ValueErrors
        raise damaged(file, f"cannot be read ({first_line(error)})") from None


def _imports(file: Path) -> list[str]:
    """What a plain pickle file (not a torch zip) asks to import, read without executing it."""
    names: list[str] = []
    strings: list[str] = []
    try:
        with open(file, "rb") as f:
            for opcode, arg, _ in pickletools.genops(f):
                if opcode.name in ("GLOBAL", "INST"):
                    names.append(str(arg).replace(" ", "."))
                elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                    names.append(f"{strings[-2]}.{strings[-1]}")
                elif isinstance(arg, str):
                    strings.append(arg)
    except Exception:  # a zip or garbled bytes: stop at the first opcode that does not parse
        pass
    return [n for n in names if not n.startswith(("torch.", "collections.OrderedDict"))]


def _refusal(file: Path, message: str) -> str | None:
    """What torch's weights-only unpickler refused to do, or None if the file is just unreadable."""
    found = re.search(r"GLOBAL (\S+)", message)
    if found:
        return f"it asks to import {found[1]}"
    if re.search(r"unrecognized function|Can only (build|create)|is blocked", message):
        return "it asks to build objects that are not tensors"
    # Pickle protocols >= 4 stop torch's reader at an unsupported opcode before any import
    imports = _imports(file)
    return f"it asks to import {', '.join(imports[:3])}" if imports else None


def load_tensors(file: Path) -> Any:
    """torch.load(weights_only=True): tensors and plain containers only, never code."""
    require_file(file)
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        refused = _refusal(file, str(error))
        if refused is None:  # keep torch's reason, not its advice to load with weights_only=False
            reason = [line for line in str(error).splitlines() if re.match(r"\s*Unsupported", line)]
            detail = reason[0].strip() if reason else first_line(error)
            raise damaged(file, f"cannot be read ({detail})") from None
        raise CheckpointError(
            f"{file} was refused: it contains code or objects that are not plain tensors "
            f"({refused}), and fastsp never runs code from a checkpoint. fastsp did not write "
            "this file; do not load it by other means unless you trust where it came from. Delete "
            f"the folder {file.parent} to resume from the previous checkpoint of the run, or pass "
            "another checkpoint"
        ) from None
    except Exception as error:  # a garbled zip or pickle fails in many ways (EOFError, ...)
        raise damaged(file, f"cannot be read ({first_line(error)})") from None


def check_optimizer_state(file: Path, value: Any) -> dict[str, Any]:
    if not (
        isinstance(value, dict)
        and isinstance(value.get("state"), dict)
        and isinstance(value.get("param_groups"), list)
    ):
        raise damaged(file, "does not hold an optimizer state (state and param_groups)")
    return value


def check_rng(file: Path, value: Any) -> dict[str, Any]:
    def is_rng_state(x: Any) -> bool:
        return isinstance(x, torch.Tensor) and x.dtype == torch.uint8 and x.dim() == 1

    cuda = value.get("cuda", []) if isinstance(value, dict) else None
    if not (
        isinstance(value, dict)
        and is_rng_state(value.get("cpu"))
        and isinstance(cuda, list)
        and all(is_rng_state(x) for x in cuda)
    ):
        raise damaged(file, "does not hold torch RNG states (a uint8 'cpu' tensor)")
    return value


def read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    require_file(file)
    try:
        return load_file(str(file))
    except Exception as error:  # safetensors raises its own error types for damaged files
        raise damaged(file, f"cannot be read ({first_line(error)})") from None
