"""A test helper that records the operations which, on a GPU, make the host wait for the device.

Runs on the CPU: every aten operation of the code under test passes through a ``TorchDispatchMode``, which
notes those that need a tensor's *value* on the host (``.item()``, ``bool()``, ``float()``, ``int()`` all
end in ``_local_scalar_dense``) or whose output shape depends on values (``nonzero``, boolean masks),
i.e. a GPU→CPU synchronisation on CUDA. Host-to-device copies are not seen (on the CPU they are no-ops).
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
VALUE_READS = {
    aten._local_scalar_dense,
    aten.nonzero,
    aten.masked_select,
    aten.equal,
    aten._unique2,
    aten.unique_dim,
    aten.unique_consecutive,
}
MASK_INDEXING = {aten.index, aten.index_put, aten.index_put_}


def _has_bool_index(args: tuple) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or ())


class HostReads(TorchDispatchMode):
    """``with HostReads() as reads: ...`` then ``reads.ops`` lists the synchronising operations seen."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        packet = func.overloadpacket
        if packet in VALUE_READS or (packet in MASK_INDEXING and _has_bool_index(args)):
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))
