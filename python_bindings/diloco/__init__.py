"""libdiloco for PyTorch: DiLoCo and data-parallel training across islands over Gloo.

    import torch, diloco
    pg = diloco.init_process_group()          # torchrun's MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE
    model = MyModel()
    inner = torch.optim.AdamW(model.parameters(), lr=3e-4)
    outer = diloco.DiLoCo(model, inner, pg, inner_steps=500, compression="topk(k=64)+ef",
                          buffers="average")      # BatchNorm statistics: averaged at outer steps
    for x, y in data:
        loss_fn(model(x), y).backward(); inner.step(); inner.zero_grad()
        outer.step()                           # every inner_steps-th call: one outer step
    print(outer.stats())

Elastic runs (islands may die, be stopped or restart; launched with diloco-run --elastic):

    membership = diloco.join_elastic()        # the coordinator's store, RANK, WORLD_SIZE, ...
    outer = diloco.DiLoCo(model, inner, membership, inner_steps=500)
    start = outer.stats().inner_steps         # a joining island starts where the run is
    ...
    membership.leave()

The model's parameters are shared with the C++ core without copies; the optimizer stays the
user's own torch.optim object. Errors: diloco.Error (a RuntimeError), diloco.OptionError (also a
ValueError), diloco.PeerLostError, and for elastic runs diloco.RemovedError (this island was left
out of the run), diloco.TooFewIslandsError (fewer islands than min_islands remain) and
diloco.RunFinishedError (a joiner found the run over) carry the C++ library's messages.
"""

# LibTorch's Python bindings must be loaded before the extension, which links against them.
import torch  # noqa: F401

from . import _C
from ._C import (
    AuditStats,
    CommStats,
    ElasticOptions,
    Error,
    ExchangeTiming,
    Group,
    GroupOptions,
    LinkModel,
    Membership,
    OpStats,
    OptionError,
    PeerLostError,
    RemovedError,
    RunFinishedError,
    SpeedBalancer,
    SyncStats,
    TooFewIslandsError,
    aggregation,
    codec_help,
    codec_names,
    collective_bytes,
    compressor_spec,
    payload_bytes,
)
from ._api import (
    DataParallel,
    DiLoCo,
    init_process_group,
    join_elastic,
    named_tensors,
    optimizer_state_digest,
)
from ._optim import Muon

__version__ = _C.__version__

__all__ = [
    "AuditStats",
    "CommStats",
    "DataParallel",
    "DiLoCo",
    "ElasticOptions",
    "Error",
    "ExchangeTiming",
    "Group",
    "GroupOptions",
    "LinkModel",
    "Membership",
    "Muon",
    "OpStats",
    "OptionError",
    "PeerLostError",
    "RemovedError",
    "RunFinishedError",
    "SpeedBalancer",
    "SyncStats",
    "TooFewIslandsError",
    "aggregation",
    "codec_help",
    "codec_names",
    "collective_bytes",
    "compressor_spec",
    "init_process_group",
    "join_elastic",
    "named_tensors",
    "optimizer_state_digest",
    "payload_bytes",
]
