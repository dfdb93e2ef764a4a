"""A check that code never reads a tensor's value on the host (shared by the kernel tests).

On CUDA every such read is a device sync and none can be captured in a CUDA graph.
tests/test_step.py's FailOnHostSync, a dispatch mode, cannot look inside a custom op (a mode is
popped while the op's implementation runs); patching the Python-level reads can.
"""

import contextlib

import pytest
import torch

# Every Python-level way to read a tensor's value on the host.
HOST_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy")


class HostRead(AssertionError):
    pass


@contextlib.contextmanager
def no_host_reads():
    """Make every host read of a torch tensor raise HostRead inside the block.

    Triton's interpreter reads kernel arguments through storages and numpy, never through these
    methods, so on CPU anything this catches is the op's own Python (wrappers, launchers, autograd).
    """

    def refuse(name):
        def read(*args, **kwargs):
            raise HostRead(f"host read of a tensor: {name}")

        return read

    with pytest.MonkeyPatch.context() as patch:
        for name in HOST_READS:
            patch.setattr(torch.Tensor, name, refuse(f"Tensor.{name}"))
        patch.setattr(torch, "equal", refuse("torch.equal"))
        yield
