"""The PyTorch-facing layer over diloco._C: arguments in PyTorch's shapes (a torch.nn.Module, a
torch.optim optimizer, torchrun's environment), checked with clear messages before they reach the
C++ core. It holds no algorithm: every step, sync and statistic is the C++ library's.
"""

import datetime
import os
import socket

import torch

from . import _C


def _env(name):
    value = os.environ.get(name)
    return value if value not in (None, "") else None


def _as_int(value, what):
    try:
        return int(value)
    except (TypeError, ValueError):
        raise _C.OptionError(
            "[init_process_group] %s must be an integer, got %r" % (what, value)) from None


def _timeout_seconds(timeout):
    if isinstance(timeout, datetime.timedelta):
        return timeout.total_seconds()
    try:
        return float(timeout)
    except (TypeError, ValueError):
        raise _C.OptionError(
            "[init_process_group] timeout must be seconds or a datetime.timedelta, got %r"
            % (timeout,)) from None


def _address_towards(host, port):
    """This machine's address on the route to host (no packet is sent: UDP connect only)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((host, port))
            return s.getsockname()[0]
        except OSError:
            return "127.0.0.1"


def init_process_group(master_addr=None, master_port=None, rank=None, world_size=None,
                       timeout=None, hostname=""):
    """Join the wide-area group and return it (a diloco.Group).

    Every argument left as None is read from torchrun's environment, as
    torch.distributed.init_process_group(init_method="env://") does: MASTER_ADDR (default
    127.0.0.1), MASTER_PORT (default 29500), RANK and WORLD_SIZE (required), and DILOCO_TIMEOUT_S
    for `timeout` (default 60 s). So under `torchrun` or `diloco-run`,
    `diloco.init_process_group()` needs no arguments.

    Args:
        master_addr: address of rank 0, which hosts the rendezvous store.
        master_port: its port (1..65535).
        rank: this process's rank, 0..world_size-1.
        world_size: number of processes (islands).
        timeout: seconds (or a datetime.timedelta) for the rendezvous and every collective;
            a peer silent for longer raises diloco.PeerLostError.
        hostname: the interface Gloo binds to; "" resolves the one that routes to master_addr
            (DILOCO_HOSTNAME when set).

    Raises:
        diloco.OptionError: a missing or malformed argument or variable, named in the message.
        diloco.Error: the port is in use, or the peers did not all arrive within the timeout.

    Under torchrun (TORCHELASTIC_USE_AGENT_STORE=True), torchrun's agent already serves the
    rendezvous store on MASTER_PORT: the group then joins that store as a client instead of
    having rank 0 serve another one.

    Collectives release the GIL while they wait.
    """
    from_launcher = all(v is None for v in (master_addr, master_port, rank, world_size))
    master_addr = master_addr if master_addr is not None else (_env("MASTER_ADDR") or "127.0.0.1")
    if master_port is None:
        master_port = _env("MASTER_PORT") or 29500
    master_port = _as_int(master_port, "master_port (MASTER_PORT)")
    values = {}
    for arg, var, value in (("rank", "RANK", rank), ("world_size", "WORLD_SIZE", world_size)):
        if value is None:
            value = _env(var)
            if value is None:
                raise _C.OptionError(
                    "[init_process_group] %s not given and %s is not set: pass %s=... or "
                    "launch under torchrun or diloco-run" % (arg, var, arg))
        values[arg] = _as_int(value, "%s (%s)" % (arg, var))
    if timeout is None:
        timeout = _env("DILOCO_TIMEOUT_S") or 60.0
    if not hostname:
        hostname = _env("DILOCO_HOSTNAME") or ""
    if from_launcher and _env("TORCHELASTIC_USE_AGENT_STORE") == "True":
        return _C.Group._connect_to_store(
            str(master_addr), master_port, values["rank"], values["world_size"],
            _timeout_seconds(timeout), hostname or _address_towards(str(master_addr), master_port))
    return _C.Group.create(str(master_addr), master_port, values["rank"], values["world_size"],
                           _timeout_seconds(timeout), hostname)


def named_tensors(model, who="DiLoCo"):
    """The (name, tensor) pairs a synchronizer works on.

    `model` is a torch.nn.Module (its named_parameters()), a dict name -> tensor, or an iterable
    of (name, tensor) pairs. Raises TypeError naming the first entry that is not a tensor.
    """
    if isinstance(model, torch.nn.Module):
        pairs = list(model.named_parameters())
    elif isinstance(model, dict):
        pairs = list(model.items())
    else:
        try:
            pairs = list(model)
        except TypeError:
            raise TypeError(
                "[%s] model must be a torch.nn.Module, a dict of name -> tensor, or an iterable "
                "of (name, tensor) pairs; got %s" % (who, type(model).__name__)) from None
    out = []
    for i, pair in enumerate(pairs):
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
            raise TypeError("[%s] parameter %d must be a (name, tensor) pair, got %r"
                            % (who, i, pair))
        name, tensor = pair
        if not isinstance(name, str):
            raise TypeError("[%s] parameter %d: name must be a str, got %s"
                            % (who, i, type(name).__name__))
        if not isinstance(tensor, torch.Tensor):
            raise TypeError("[%s] parameter '%s' is a %s, not a torch.Tensor"
                            % (who, name, type(tensor).__name__))
        out.append((name, tensor))
    return out


def _optimizer_tensors(inner):
    groups = getattr(inner, "param_groups", None)
    if groups is None:
        raise TypeError("[DiLoCo] inner must be a torch.optim.Optimizer (or None when the caller "
                        "steps the parameters itself), got %s" % type(inner).__name__)
    tensors = []
    for group in groups:
        for p in group["params"]:
            if not isinstance(p, torch.Tensor):
                raise TypeError("[DiLoCo] the inner optimizer holds a %s, not a torch.Tensor"
                                % type(p).__name__)
            tensors.append(p)
    return tensors


def _check_group(group, who):
    if not isinstance(group, _C.Group):
        raise TypeError("[%s] group must be a diloco.Group (from diloco.init_process_group()), "
                        "got %s" % (who, type(group).__name__))


class DiLoCo(_C.DiLoCo):
    """DiLoCo (Douillard et al. 2023, arXiv 2311.08105) over a torch.nn.Module.

    Each island (process) trains `model` with its own optimizer `inner` for `inner_steps` (H)
    steps; then the islands average their pseudo-gradients (global weights minus local weights)
    over the group, and an outer SGD with Nesterov momentum makes the next global weights, from
    which every island continues. Call step() after every inner optimizer step:

        outer = diloco.DiLoCo(model, inner, pg, inner_steps=500, outer_lr=0.7)
        for x, y in data:
            loss_fn(model(x), y).backward(); inner.step(); inner.zero_grad()
            outer.step()

    Construction is a collective: every rank must construct together. It checks that all ranks
    hold the same parameters (names, shapes, dtypes; the first difference is named on every rank)
    and that each parameter is in `inner`'s param_groups, then copies rank 0's weights to every
    rank. The parameters are rebound (Tensor.set_data) into one flat buffer per dtype that the
    C++ core reads and writes directly: the Parameter objects stay the same, so `inner` and any
    reference to them keep working, with no copies. Move the model (model.to(...)) before, not
    after. Besides the model, DiLoCo holds two float32 copies of the parameters (global weights,
    outer momentum) on `outer_device`.

    Args:
        model: a torch.nn.Module, or (name, tensor) pairs, or a dict name -> tensor.
        inner: the inner optimizer (any torch.optim.Optimizer over the model's parameters), or
            None when the caller updates the tensors itself.
        group: a diloco.Group from diloco.init_process_group().
        inner_steps: H, inner steps per outer step (>= 1; DiLoCo uses 500).
        outer_lr: outer SGD learning rate (DiLoCo: 0.7). lr 1 with momentum 0 is FedAvg.
        outer_momentum: outer SGD momentum in [0, 1) (DiLoCo: 0.9).
        nesterov: Nesterov momentum (True) or heavy-ball (False). The update is exactly
            torch.optim.SGD(lr, momentum, nesterov) fed the mean pseudo-gradient.
        outer_device: where the global weights and momentum live ('cpu', 'cuda:0', a
            torch.device); None: the model's device. Compression needs the CPU.
        compression: how pseudo-gradients cross the link: "none" (float32 all-reduce), "fp16",
            "int8", "int4", "int2", "fp4", "int8_normal", "topk(k=64,values=2bit)", "dct",
            "randomk", "sign", each optionally with "+ef" error feedback. diloco.codec_help()
            lists every codec and its parameters.

    Raises:
        diloco.OptionError: an option out of range or a bad compression spec (listing them all).
        diloco.Error: the ranks hold different models, a parameter is missing from `inner`, ...
        TypeError: `model`, `inner` or `group` of the wrong type.

    Methods inherited from the C++ core: step(), sync(), stats(), parameter_names(),
    flat_parameters(), global_weights(); properties group, inner_steps, outer_lr,
    outer_momentum, nesterov, compression, outer_device.
    """

    def __init__(self, model, inner, group, *, inner_steps=500, outer_lr=0.7,
                 outer_momentum=0.9, nesterov=True, outer_device=None, compression="none"):
        parameters = named_tensors(model, "DiLoCo")
        tensors = None if inner is None else _optimizer_tensors(inner)
        _check_group(group, "DiLoCo")
        if outer_device is not None:
            outer_device = str(outer_device)
        if not isinstance(compression, str):
            raise TypeError("[DiLoCo] compression must be a spec string such as 'int8', got %s"
                            % type(compression).__name__)
        super().__init__(parameters, tensors, group, inner_steps=int(inner_steps),
                         outer_lr=float(outer_lr), outer_momentum=float(outer_momentum),
                         nesterov=bool(nesterov), outer_device=outer_device,
                         compression=compression)
        self.model = model
        self.inner = inner

    def __repr__(self):
        return ("DiLoCo(inner_steps=%d, outer_lr=%g, outer_momentum=%g, nesterov=%s, "
                "compression=%r, outer_device=%r, world_size=%d)"
                % (self.inner_steps, self.outer_lr, self.outer_momentum, self.nesterov,
                   self.compression, self.outer_device, self.group.world_size))


class DataParallel(_C.DataParallel):
    """Data-parallel training over the same group: the baseline DiLoCo is measured against.

    Call sync_gradients() after backward() and before the optimizer step; every gradient becomes
    the mean over ranks (one all-reduce of one flat buffer):

        dp = diloco.DataParallel(model, pg)
        for x, y in data:
            loss_fn(model(x), y).backward(); dp.sync_gradients(); opt.step(); opt.zero_grad()

    Construction is a collective that checks all ranks hold the same model and copies rank 0's
    weights to all. The parameters are rebound into a flat buffer (same Parameter objects, no
    copies), as with DiLoCo.

    Args:
        model: a torch.nn.Module, or (name, tensor) pairs, or a dict name -> tensor.
        group: a diloco.Group from diloco.init_process_group().
    """

    def __init__(self, model, group):
        parameters = named_tensors(model, "DataParallel")
        _check_group(group, "DataParallel")
        super().__init__(parameters, group)
        self.model = model
        self._group = group

    @property
    def group(self):
        """the Group the gradient syncs run over"""
        return self._group
