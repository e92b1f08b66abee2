"""The PyTorch-facing layer over diloco._C: arguments in PyTorch's shapes (a torch.nn.Module, a
torch.optim optimizer, torch.distributed-style group arguments), checked with clear messages
before they reach the C++ core. It holds no algorithm and reads no environment: every step, sync,
statistic, the rendezvous (GroupOptions.read_env, Group.create) and an elastic run's membership
(ElasticOptions.read_env, Membership.join) is the C++ library's.
"""

import datetime
import hashlib
import io
import os
import tempfile

import torch

from . import _C


def _as_int(value, what, who="init_process_group"):
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError):
        raise _C.OptionError("[%s] %s must be an integer, got %r" % (who, what, value)) from None


def _as_float(value, what, who):
    try:
        return float(value)
    except (TypeError, ValueError):
        raise _C.OptionError("[%s] %s must be a number, got %r" % (who, what, value)) from None


def _seconds(value, what, who):
    """Seconds from a number or a datetime.timedelta."""
    if isinstance(value, datetime.timedelta):
        return value.total_seconds()
    try:
        return float(value)
    except (TypeError, ValueError):
        raise _C.OptionError("[%s] %s must be seconds or a datetime.timedelta, got %r"
                             % (who, what, value)) from None


def _timeout_seconds(timeout):
    return _seconds(timeout, "timeout", "init_process_group")


def init_process_group(master_addr=None, master_port=None, rank=None, world_size=None,
                       timeout=None, hostname=None):
    """Join the wide-area group and return it (a diloco.Group).

    Starts from diloco.GroupOptions.read_env(), the C++ library's reading of torchrun's
    environment, as torch.distributed.init_process_group(init_method="env://") does:
    MASTER_ADDR (default 127.0.0.1), MASTER_PORT (default 29500), RANK and WORLD_SIZE (required
    unless given as arguments), DILOCO_TIMEOUT_S (default 60 s), DILOCO_HOSTNAME,
    DILOCO_LINK_MBPS and DILOCO_LINK_LATENCY_MS (an emulated link, see diloco.LinkModel) and
    TORCHELASTIC_USE_AGENT_STORE. Every argument that is not None overrides its variable; then
    diloco.Group.create(options) runs the library's one rendezvous path. So under `torchrun` or
    `diloco-run`, `diloco.init_process_group()` needs no arguments.

    Args:
        master_addr: address of rank 0, which hosts the rendezvous store.
        master_port: its port (1..65535).
        rank: this process's rank, 0..world_size-1.
        world_size: number of processes (islands).
        timeout: seconds (or a datetime.timedelta) for the rendezvous and every collective;
            a peer silent for longer raises diloco.PeerLostError.
        hostname: the interface Gloo binds to; "" resolves the one that routes to master_addr.

    Raises:
        diloco.OptionError: a missing or malformed argument or variable, named in the message.
        diloco.Error: the port is in use, or the peers did not all arrive within the timeout.

    Under torchrun (TORCHELASTIC_USE_AGENT_STORE=1 or True), torchrun's agent already serves the
    rendezvous store on MASTER_PORT: the group then joins that store as a client instead of
    having rank 0 serve another one (unless master_addr or master_port is given: then the store
    is not the agent's, and rank 0 serves it).

    Collectives release the GIL while they wait. For every option at once (the link model, for
    instance), build a diloco.GroupOptions and call diloco.Group.create(options).
    """
    options = _C.GroupOptions.read_env()
    if master_addr is not None or master_port is not None:
        options.join_existing_store = False
    if master_addr is not None:
        options.master_addr = str(master_addr)
    if master_port is not None:
        options.master_port = _as_int(master_port, "master_port")
    for arg, var, value in (("rank", "RANK", rank), ("world_size", "WORLD_SIZE", world_size)):
        if value is not None:
            setattr(options, arg, _as_int(value, arg))
        elif getattr(options, arg) == -1:
            raise _C.OptionError(
                "[init_process_group] %s not given and %s is not set: pass %s=... or "
                "launch under torchrun or diloco-run" % (arg, var, arg))
    if timeout is not None:
        options.timeout = _timeout_seconds(timeout)
    if hostname is not None:
        options.hostname = str(hostname)
    return _C.Group.create(options)


def join_elastic(store_addr=None, store_port=None, slot=None, world_size=None, min_islands=None,
                 heartbeat_timeout=None, timeout=None, rendezvous_timeout=None, hostname=None,
                 link_mbps=None, link_latency_ms=None, heartbeat_interval=None, run_key=None,
                 run_key_file=None):
    """Join an elastic run and return its diloco.Membership, for diloco.DiLoCo(model, inner,
    membership, ...).

    An elastic run survives islands that die, are stopped or restart: a coordinator process
    (diloco-coordinator) serves the run's store, and the islands agree through it on who is in
    (membership epochs). `diloco-run --elastic` (or `--max-restarts N`) starts the coordinator
    and sets the environment, so under it `diloco.join_elastic()` needs no arguments.

    Starts from diloco.ElasticOptions.read_env(), the C++ library's reading of the launcher's
    environment (ElasticOptions::from_env's variables, each optional here): MASTER_ADDR and
    MASTER_PORT (the coordinator's store; default 127.0.0.1:29500), RANK (the island's slot) and
    WORLD_SIZE (islands the run starts with; both required unless given as arguments),
    DILOCO_MIN_ISLANDS (default 1), DILOCO_HEARTBEAT_TIMEOUT_S (10), DILOCO_TIMEOUT_S (60),
    DILOCO_RENDEZVOUS_TIMEOUT_S (600), DILOCO_HOSTNAME, DILOCO_LINK_MBPS,
    DILOCO_LINK_LATENCY_MS, DILOCO_RUN_KEY and DILOCO_RUN_KEY_FILE. Every argument that is not None overrides its variable; then
    diloco.Membership.join(options) validates them and joins, with the GIL released.

    Slots 0..world_size-1 started for the first time form the run's first epoch: join waits (up
    to rendezvous_timeout) until all of them arrived. Any other island (a restarted slot, a slot
    >= world_size, or one arriving after the run started) returns at once as a joiner
    (membership.joining): DiLoCo's constructor then waits until the run admits it at an
    outer-step boundary and hands it the run's outer state (its stats().inner_steps is the
    run's step: derive the learning-rate schedule and the data position from it).

    Args:
        store_addr, store_port: where the coordinator serves the store.
        slot: this island's slot (RANK); names it "<slot>.<incarnation>".
        world_size: islands the run starts with.
        min_islands: the run stops (diloco.TooFewIslandsError) when fewer remain; in
            [1, world_size].
        heartbeat_timeout: seconds of silence after which an island is declared lost (a stopped
            island costs this long; a killed one is noticed at once). The heartbeat interval is
            a fifth of it, at most 1 s, unless heartbeat_interval is given.
        timeout: seconds for one collective; above heartbeat_timeout. When given (and
            rendezvous_timeout is not), rendezvous_timeout is raised to it if below.
        rendezvous_timeout: seconds the first islands wait for each other, and a joiner to be
            admitted; >= timeout.
        hostname: the interface Gloo binds to; "" resolves the one that routes to store_addr.
        link_mbps, link_latency_ms: an emulated wide-area link (see diloco.LinkModel).
        heartbeat_interval: seconds between heartbeats (default: see heartbeat_timeout).
        run_key, run_key_file: the run key (>= 16 bytes), or a file holding it: with one, only
            islands holding the same key join (a process with another key or none fails on its
            own with a diloco.Error saying why), and every value written to the store and
            every payload between islands is MACed (see diloco.GroupOptions.run_key).

    Raises:
        diloco.OptionError: a missing or malformed argument or variable, or an option out of
            its range, named in the message (e.g. "[elastic] min_islands must be in [1,
            world_size = 2], got 3").
        diloco.Error: no coordinator answered at store_addr:store_port within `timeout`, or the
            first islands did not all arrive within rendezvous_timeout.

    At the end of training, call membership.leave() after the last collective, so that the
    others do not take this island's exit for a loss.
    """
    options = _C.ElasticOptions.read_env()
    if store_addr is not None:
        options.store_addr = str(store_addr)
    if store_port is not None:
        options.store_port = _as_int(store_port, "store_port", "join_elastic")
    for arg, var, value in (("slot", "RANK", slot), ("world_size", "WORLD_SIZE", world_size)):
        if value is not None:
            setattr(options, arg, _as_int(value, arg, "join_elastic"))
        elif getattr(options, arg) == -1:
            raise _C.OptionError(
                "[join_elastic] %s not given and %s is not set: pass %s=... or launch under "
                "diloco-run --elastic (which also starts the coordinator)" % (arg, var, arg))
    if min_islands is not None:
        options.min_islands = _as_int(min_islands, "min_islands", "join_elastic")
    if heartbeat_timeout is not None:
        options.heartbeat_timeout = _seconds(heartbeat_timeout, "heartbeat_timeout",
                                             "join_elastic")
        if heartbeat_interval is None:
            options.heartbeat_interval = min(1.0, options.heartbeat_timeout / 5)
    if heartbeat_interval is not None:
        options.heartbeat_interval = _seconds(heartbeat_interval, "heartbeat_interval",
                                              "join_elastic")
    if timeout is not None:
        options.timeout = _seconds(timeout, "timeout", "join_elastic")
        if rendezvous_timeout is None:
            options.rendezvous_timeout = max(options.rendezvous_timeout, options.timeout)
    if rendezvous_timeout is not None:
        options.rendezvous_timeout = _seconds(rendezvous_timeout, "rendezvous_timeout",
                                              "join_elastic")
    if hostname is not None:
        options.hostname = str(hostname)
    if link_mbps is not None or link_latency_ms is not None:
        link = options.link
        if link_mbps is not None:
            link.mbit_per_s = _as_float(link_mbps, "link_mbps", "join_elastic")
        if link_latency_ms is not None:
            link.latency_ms = _as_float(link_latency_ms, "link_latency_ms", "join_elastic")
        options.link = link
    if run_key is not None:
        options.run_key = run_key
    if run_key_file is not None:
        options.run_key_file = str(run_key_file)
    return _C.Membership.join(options)


def _safe_state(optimizer):
    """An optimizer's per-parameter state for torch.load(weights_only=True) on any torch: tensors,
    ints and strings (a float becomes ("float", repr), which reads back exactly)."""
    out = {}
    for index, entry in optimizer.state_dict()["state"].items():
        out[int(index)] = {name: ("float", repr(v)) if isinstance(v, float) else v
                           for name, v in entry.items()}
    return out


def _from_safe_state(state):
    """The inverse of _safe_state."""
    if not isinstance(state, dict):
        raise ValueError("an optimizer state must be a dict, got %s" % type(state).__name__)
    return {int(i): {name: float(v[1]) if isinstance(v, tuple) and len(v) == 2 and v[0] == "float"
                     else v for name, v in entry.items()}
            for i, entry in state.items()}


def optimizer_state_digest(optimizers):
    """SHA-256 (32 bytes) of torch optimizers' states by content: each optimizer's
    state_dict()['state'], by parameter index and entry name, tensors by their bytes. Equal for
    equal states wherever the parameters live (what audit commitments hold)."""
    h = hashlib.sha256()
    for k, optimizer in enumerate(optimizers):
        state = optimizer.state_dict()["state"]
        for index in sorted(state):
            for name in sorted(state[index]):
                value = state[index][name]
                h.update(("%d/%s/%s:" % (k, index, name)).encode())
                if isinstance(value, torch.Tensor):
                    t = value.detach().cpu().contiguous()
                    h.update(str(t.dtype).encode() + str(tuple(t.shape)).encode())
                    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
                else:
                    h.update(repr(value).encode())
    return h.digest()


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


def _named_buffers(model):
    """A Module's buffers (BatchNorm statistics, ...); none for a dict or pairs of tensors."""
    if isinstance(model, torch.nn.Module):
        return list(model.named_buffers())
    return []


def _agree_on(fields, who):
    if fields is None:
        return []
    pairs = fields.items() if isinstance(fields, dict) else fields
    try:
        return [(str(k), str(v)) for k, v in pairs]
    except (TypeError, ValueError):
        raise TypeError("[%s] agree_on must be a dict of field -> value (or pairs), got %r"
                        % (who, fields)) from None


def _check_buffers(buffers, who):
    if not isinstance(buffers, str):
        raise TypeError("[%s] buffers must be 'average', 'rank0' or 'local', got %s"
                        % (who, type(buffers).__name__))


def _optimizer_tensors(inner):
    """The tensors `inner` steps: one torch.optim.Optimizer, or a list or tuple of them (Muon for
    the matrices and AdamW for the rest, say)."""
    optimizers = list(inner) if isinstance(inner, (list, tuple)) else [inner]
    tensors = []
    for optimizer in optimizers:
        groups = getattr(optimizer, "param_groups", None)
        if groups is None:
            raise TypeError("[DiLoCo] inner must be a torch.optim.Optimizer, a list of them, or "
                            "None when the caller steps the parameters itself; got %s"
                            % type(optimizer).__name__)
        for group in groups:
            for p in group["params"]:
                if not isinstance(p, torch.Tensor):
                    raise TypeError("[DiLoCo] the inner optimizer holds a %s, not a torch.Tensor"
                                    % type(p).__name__)
                tensors.append(p)
    return tensors


def _check_group(group, who, membership_too=False):
    if isinstance(group, _C.Group) or (membership_too and isinstance(group, _C.Membership)):
        return
    if membership_too:
        raise TypeError("[%s] group must be a diloco.Group (from diloco.init_process_group()) "
                        "or a diloco.Membership (from diloco.join_elastic()), got %s"
                        % (who, type(group).__name__))
    raise TypeError("[%s] group must be a diloco.Group (from diloco.init_process_group()), "
                    "got %s" % (who, type(group).__name__))


_STATE_FORMAT = 1  # of DiLoCo.state_dict()'s dict


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
    are configured alike (every option below that changes the exchange, the library and wire
    versions, `agree_on`: a difference is an OptionError on every rank naming the field and each
    rank's value) and hold the same parameters (names, shapes, dtypes; the first difference is
    named on every rank), and that each parameter is in `inner`'s param_groups, then copies rank
    0's weights and buffers to every rank. The parameters are rebound (Tensor.set_data) into one
    flat buffer per dtype that the C++ core reads and writes directly: the Parameter objects stay
    the same, so `inner` and any reference to them keep working, with no copies. Move the model
    (model.to(...)) before, not after. Besides the model, DiLoCo holds two float32 copies of the parameters (global weights,
    outer momentum) on `outer_device`.

    Args:
        model: a torch.nn.Module, or (name, tensor) pairs, or a dict name -> tensor.
        inner: the inner optimizer (any torch.optim.Optimizer over the model's parameters, or a
            list of them that together cover every parameter, e.g. [Muon, AdamW]), or
            None when the caller updates the tensors itself.
        group: a diloco.Group from diloco.init_process_group(), or a diloco.Membership from
            diloco.join_elastic() for an elastic run (see below).
        inner_steps: H, inner steps per outer step (>= 1; DiLoCo uses 500).
        outer_lr: outer SGD learning rate (DiLoCo: 0.7). lr 1 with momentum 0 is FedAvg.
        outer_momentum: outer SGD momentum in [0, 1) (DiLoCo: 0.9).
        nesterov: Nesterov momentum (True) or heavy-ball (False). The update is exactly
            torch.optim.SGD(lr, momentum, nesterov) fed the mean pseudo-gradient.
        outer_device: where the global weights and momentum live ('cpu', 'cuda:0', a
            torch.device); None: the model's device, or the CPU when compressing (compressed
            exchanges run on the CPU; the library decides, callers need not).
        compression: how pseudo-gradients cross the link: "none" (float32 all-reduce), "fp16",
            "int8", "int4", "int3", "int2", "fp4", "int8_normal", "topk(k=64,values=2bit)", "dct",
            "randomk", "sign", each optionally with "+ef" error feedback. diloco.codec_help()
            lists every codec and its parameters.
        buffers: the module's buffers (BatchNorm running statistics; model.named_buffers(), none
            when `model` is a dict or pairs) at every outer step: "average" (floating-point
            buffers become the mean over islands, integer ones such as num_batches_tracked take
            rank 0's), "rank0" (all take rank 0's) or "local" (left as each island computed
            them). Every mode starts from rank 0's buffers.
        agree_on: extra fields every island must agree on, a dict such as {"steps": 2000}
            (values compared as strings), checked with the library's own at construction.
        fragments: Streaming DiLoCo's P (Douillard et al. 2025): the parameters are split into P
            fragments, each synchronized every inner_steps steps, their exchanges staggered by
            inner_steps / P, so each exchange carries about 1/P of the model. 1 <= P <=
            inner_steps.
        overlap_steps: tau: a fragment's exchange starts after a step and is applied tau steps
            later, the island training on meanwhile (the link is hidden); 0 <= tau <
            inner_steps / P.
        mixing: alpha in [0, 1]: the island's fragment becomes alpha * its own + (1 - alpha) *
            the new global one (0 replaces it; the paper uses 0.5).
        fragment_of: each parameter's fragment (model order), or None for the default (strided
            over the blocks, or size-balanced for models with fewer blocks than fragments).
        aggregator: how the islands' pseudo-gradients are combined: "mean" (default),
            "trimmed_mean(trim=K)" (per coordinate, the K largest and smallest dropped; needs
            more than 2K islands), "median" (per coordinate) or "norm_clip(k=C)" (each clipped
            to C x the median norm, then averaged). The robust ones gather every island's
            payload: (N-1) x its bytes per rank instead of about 2(N-1)/N x; not with powersgd.
        screen_factor: with 3 or more islands, a pseudo-gradient whose norm is above this many
            times the median is refused, its island named on every rank and the others
            averaged (refused_contributions, last_screening); 0 = off, else in [1, 1e12].
            Exchanges that decode each island's payload (gathered codecs, robust aggregators)
            also refuse one that does not decode or decodes to a NaN or an infinity.
        compare_states: after every outer step the islands compare a 128-bit hash of the global
            state, compared before the next exchange sends anything (with screening it rides
            on the screening's all-gather; else 32 bytes each in an all-gather of its own that
            completes while the islands train on); call check_state() after the last outer
            step to compare that one too. A difference raises diloco.Error naming the ranks
            that disagree with the majority.
        audit_rate: replay audits of claimed work, in [0, 1] (0 = off): at every outer step
            each island is audited with this probability by another island, which replays
            its round from the committed start state through enable_audits()'s step function
            and compares; a failed audit is reported on every rank with the evidence and the
            island is left out of every later outer step (audits()). Plain DiLoCo only, a
            static group, not with powersgd; the exchange gathers every contribution.
        audit_tolerance: 0: replays must match bit for bit (CPU, the same threads everywhere);
            in (0, 1]: the largest relative difference of the replayed pseudo-gradient
            accepted (GPUs).

    Raises:
        diloco.OptionError: an option out of range or a bad compression spec (listing them all).
        diloco.OptionError: the islands are configured differently (on every rank, naming the
            field), or `buffers` is not one of the three modes.
        diloco.Error: the ranks hold different models, a parameter is missing from `inner`, ...
        TypeError: `model`, `inner` or `group` of the wrong type.

    Elastic runs (`group` a diloco.Membership): the run survives islands that die, are stopped
    or restart. A failed exchange, or a peer silent for the heartbeat timeout, makes the
    survivors drop the exchange in flight, form a new membership epoch and redo the interrupted
    outer step with their own pseudo-gradients (no inner step is lost; the average is over the
    survivors). An island that joins (a restarted one, or a new slot) waits in this constructor,
    with the GIL released, until the run admits it at an outer-step boundary, and receives the
    run's outer state (global weights, outer momentum, exchange state, counters): then
    stats().inner_steps is the run's step, from which to derive the learning-rate schedule and
    the data position. Its configuration must equal the run's: a difference is an OptionError
    on the joiner naming the field. Plain DiLoCo only (fragments=1, overlap_steps=0,
    mixing=0.0); module buffers are not sent to joiners. step() then raises
    diloco.RemovedError when this island was left out of the run (stopped past the heartbeat
    timeout: start it again to rejoin) and diloco.TooFewIslandsError when fewer than
    min_islands remain. `group` (the property) is the membership's group: its rank and
    world_size follow the epoch. Call membership.leave() once training is done.

        membership = diloco.join_elastic()      # under diloco-run --elastic
        outer = diloco.DiLoCo(model, inner, membership, inner_steps=500)
        for step in range(outer.stats().inner_steps, total_steps):   # a joiner starts mid-run
            ...; inner.step(); outer.step()
        membership.leave()

    Checkpoints: state_dict() returns the outer state (global weights, outer momentum,
    error-feedback residuals and the other exchange state, the step counters) as a dict, and
    load_state_dict(state) restores it bit-exactly and sets the model to the global weights, as
    torch.optim's pair does; both only between exchanges (after step() returned True, or after
    sync()). The island's own weights and the inner optimizers' state are not in it: save
    model.state_dict() and each optimizer's state_dict() beside it, and load them after
    load_state_dict (examples/python/train_lm.py --checkpoint-dir does all of it).
    state_sha256() (from the C++ core) is the hex SHA-256 of the global weights, outer momentum
    and step counters: the same on every island of a run, and the same after a bit-exact resume.

    Methods inherited from the C++ core: step(), sync(), stats(), parameter_names(),
    buffer_names(), flat_parameters(), global_weights(), save_state(path), load_state(path)
    (the outer state as a LibTorch file, which state_dict() wraps); properties group, inner_steps,
    outer_lr, outer_momentum, nesterov, compression, buffers, outer_device, fragments,
    overlap_steps, mixing, aggregator, screen_factor, compare_states, refused_contributions,
    last_screening, elastic (built over a Membership); attribute membership (the
    Membership, or None).
    """

    def __init__(self, model, inner, group, *, inner_steps=500, outer_lr=0.7,
                 outer_momentum=0.9, nesterov=True, outer_device=None, compression="none",
                 buffers="average", agree_on=None, fragments=1, overlap_steps=0, mixing=0.0,
                 fragment_of=None, aggregator="mean", screen_factor=100.0, compare_states=True,
                 audit_rate=0.0, audit_tolerance=0.0):
        parameters = named_tensors(model, "DiLoCo")
        optimized = None if inner is None else _optimizer_tensors(inner)
        _check_group(group, "DiLoCo", membership_too=True)
        if outer_device is not None:
            outer_device = str(outer_device)
        if not isinstance(compression, str):
            raise TypeError("[DiLoCo] compression must be a spec string such as 'int8', got %s"
                            % type(compression).__name__)
        _check_buffers(buffers, "DiLoCo")
        super().__init__(parameters, _named_buffers(model), optimized, group,
                         inner_steps=int(inner_steps), outer_lr=float(outer_lr),
                         outer_momentum=float(outer_momentum), nesterov=bool(nesterov),
                         outer_device=outer_device, compression=compression,
                         buffer_sync=buffers, agree_on=_agree_on(agree_on, "DiLoCo"),
                         fragments=int(fragments), overlap_steps=int(overlap_steps),
                         mixing=float(mixing),
                         fragment_of=[int(f) for f in (fragment_of or [])],
                         aggregator=str(aggregator), screen_factor=float(screen_factor),
                         compare_states=bool(compare_states), audit_rate=float(audit_rate),
                         audit_tolerance=float(audit_tolerance))
        self.model = model
        self.inner = inner
        # Elastic runs: keeps the membership (and so the one Python object of its group) alive.
        self.membership = group if isinstance(group, _C.Membership) else None

    def enable_audits(self, replica, replica_inner, step, data_seed=0, stream_of=None):
        """Audits (audit_rate > 0): give the means to replay other islands' rounds.

        replica: a second model of the same architecture (a torch.nn.Module or (name, tensor)
            pairs; not the model itself), on the model's device; replica_inner: optimizers over
            it configured like `inner` (one, or a list in `inner`'s order); step(island, t):
            runs inner step t (0-based, as the training loop counts) of `island` on the
            replica: its batch for that island and step, the learning rate of step t, backward,
            clipping, replica_inner's step(). data_seed: the seed every island's data derives
            from (the same on every island). stream_of(name) -> int: elastic runs (required
            there): the data stream of the island named `name` ("<slot>.<incarnation>"), which
            step() then receives as `island` (ranks change with the epochs; in a static group
            the stream is the rank). Call before the first outer step, after this constructor.

        This island's inner-optimizer state is committed at every outer step by content (a
        SHA-256 of each optimizer's state_dict()['state'], by parameter index) and sent to its
        auditor with torch.save when audited."""
        if self.inner is None:
            raise _C.OptionError("[DiLoCo.enable_audits] audits commit the inner optimizer's "
                                 "state: build DiLoCo with `inner`")
        inners = list(self.inner) if isinstance(self.inner, (list, tuple)) else [self.inner]
        replicas = (list(replica_inner) if isinstance(replica_inner, (list, tuple))
                    else [replica_inner])
        if len(replicas) != len(inners):
            raise TypeError("[DiLoCo.enable_audits] replica_inner must hold as many optimizers "
                            "as inner (%d), got %d" % (len(inners), len(replicas)))
        if not callable(step):
            raise TypeError("[DiLoCo.enable_audits] step must be callable(island, t)")

        def state():
            buffer = io.BytesIO()
            torch.save([_safe_state(o) for o in inners], buffer)
            return buffer.getvalue()

        def replay(stream, first_step, steps, seed, state_bytes):
            # Bytes from another island: loaded with weights_only (tensors, numbers, strings;
            # never code), which is why floats travel as their repr (_safe_state).
            saved = torch.load(io.BytesIO(state_bytes), map_location="cpu", weights_only=True)
            if not isinstance(saved, list) or len(saved) != len(replicas):
                raise ValueError("the state sent holds %s, not %d optimizer states"
                                 % (type(saved).__name__, len(replicas)))
            for o, s in zip(replicas, saved):
                o.load_state_dict({"state": _from_safe_state(s),
                                   "param_groups": o.state_dict()["param_groups"]})
            start = optimizer_state_digest(replicas)
            for t in range(first_step, first_step + steps):
                step(stream, t)
            return start, optimizer_state_digest(replicas)

        super().enable_audits(state, lambda: optimizer_state_digest(inners),
                              named_tensors(replica, "DiLoCo.enable_audits"), replay,
                              int(data_seed), stream_of)

    def state_dict(self):
        """The outer state, as a dict to torch.save beside the model's and inner optimizers':
        "outer_state" (bytes: what save_state writes, a LibTorch archive of the global weights,
        outer momentum, exchange state and counters), "inner_steps" and "outer_steps" (the
        counters, for the caller to read; load_state_dict restores them from the archive) and
        "format". Only between exchanges: diloco.Error while one is in flight."""
        with tempfile.TemporaryDirectory(prefix="diloco-state-") as folder:
            path = os.path.join(folder, "outer_state.pt")
            self.save_state(path)
            with open(path, "rb") as f:
                data = f.read()
        stats = self.stats()
        return {"format": _STATE_FORMAT, "outer_state": data,
                "inner_steps": int(stats.inner_steps), "outer_steps": int(stats.outer_steps)}

    def load_state_dict(self, state):
        """Restore the outer state from a dict made by state_dict() (on this run's
        configuration, by this or another process), then set the model to its global weights.
        Load the island's own weights and the inner optimizers' state after it. Raises
        diloco.OptionError naming the field when the state does not fit this run (shapes,
        compression, outer momentum), TypeError/ValueError for a dict that is not one."""
        if not isinstance(state, dict) or "outer_state" not in state:
            raise TypeError("[DiLoCo.load_state_dict] expected a dict from DiLoCo.state_dict() "
                            "(with an 'outer_state' entry), got %s" % type(state).__name__)
        if state.get("format", _STATE_FORMAT) != _STATE_FORMAT:
            raise ValueError("[DiLoCo.load_state_dict] state format %r is not this library's (%d)"
                             % (state.get("format"), _STATE_FORMAT))
        data = state["outer_state"]
        if isinstance(data, torch.Tensor):
            data = data.detach().cpu().contiguous().numpy().tobytes()
        if not isinstance(data, (bytes, bytearray)):
            raise TypeError("[DiLoCo.load_state_dict] 'outer_state' must be bytes (or a uint8 "
                            "tensor), got %s" % type(data).__name__)
        with tempfile.TemporaryDirectory(prefix="diloco-state-") as folder:
            path = os.path.join(folder, "outer_state.pt")
            with open(path, "wb") as f:
                f.write(data)
            self.load_state(path)

    def __repr__(self):
        return ("DiLoCo(inner_steps=%d, outer_lr=%g, outer_momentum=%g, nesterov=%s, "
                "compression=%r, buffers=%r, outer_device=%r, world_size=%d)"
                % (self.inner_steps, self.outer_lr, self.outer_momentum, self.nesterov,
                   self.compression, self.buffers, self.outer_device, self.group.world_size))


class DataParallel(_C.DataParallel):
    """Data-parallel training over the same group: the baseline DiLoCo is measured against.

    Call sync_gradients() after backward() and before the optimizer step; every gradient becomes
    the mean over ranks (one all-reduce of one flat buffer):

        dp = diloco.DataParallel(model, pg)
        for x, y in data:
            loss_fn(model(x), y).backward(); dp.sync_gradients(); opt.step(); opt.zero_grad()

    Construction is a collective that checks all ranks are configured alike and hold the same
    model, and copies rank 0's weights and buffers to all. The parameters are rebound into a
    flat buffer (same Parameter objects, no copies), as with DiLoCo.

    Args:
        model: a torch.nn.Module, or (name, tensor) pairs, or a dict name -> tensor.
        group: a diloco.Group from diloco.init_process_group().
        buffers: the module's buffers at every gradient sync: "average", "rank0" or "local"
            (see DiLoCo).
        agree_on: extra fields every island must agree on (see DiLoCo).

    Properties from the C++ core: group, buffers.
    """

    def __init__(self, model, group, *, buffers="average", agree_on=None):
        parameters = named_tensors(model, "DataParallel")
        _check_group(group, "DataParallel")
        _check_buffers(buffers, "DataParallel")
        super().__init__(parameters, _named_buffers(model), group, buffer_sync=buffers,
                         agree_on=_agree_on(agree_on, "DataParallel"))
        self.model = model
