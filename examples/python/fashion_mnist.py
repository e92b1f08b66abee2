"""fashion_mnist.py: a small CNN with BatchNorm trained on Fashion-MNIST with DiLoCo, one island
per process, through the diloco bindings. The second Python example: the model has buffers
(BatchNorm's running statistics) that no optimizer touches, and DiLoCo keeps them consistent
across islands beside the parameters (--buffers), so every island ends with the same model.

Usage (from the repository root, after `bash libdiloco/scripts/build.sh`; the data is Debian's
package dataset-fashion-mnist in /usr/share/datasets/fashion-mnist, nothing is downloaded):
  export PYTHONPATH=$PWD/build/python
  build/libdiloco/diloco-run -n 2 -- /usr/bin/python3 examples/python/fashion_mnist.py
  # 4 islands, SGD inner optimizer, BatchNorm statistics left local to compare:
  build/libdiloco/diloco-run -n 4 -- /usr/bin/python3 examples/python/fashion_mnist.py \\
      --optimizer sgd --buffers local
/usr/bin/python3 is Debian's interpreter, the one that sees python3-torch (a `python3` earlier on
PATH may be another one). torchrun works too (see train_lm.py).

Each island draws its own training batches (seeded by --seed and its rank). Rank 0 prints one
line per outer step; at the end every rank prints its test accuracy and a sha256 of all its
parameters and buffers: with --buffers average or rank0 the hashes are equal on every island.
"""

import argparse
import gzip
import hashlib
import os
import struct
import sys

try:
    import numpy as np
    import torch
except ModuleNotFoundError:
    sys.exit("%s needs Debian's python3-torch and numpy, which %s does not see: run it with "
             "/usr/bin/python3" % (os.path.basename(__file__), sys.executable))
import torch.nn.functional as F

import diloco

DATA = "/usr/share/datasets/fashion-mnist"
MEAN, STD = 0.2860, 0.3530  # of the Fashion-MNIST training images, scaled to [0, 1]
DEFAULT_LR = {"adamw": 1e-3, "sgd": 0.05}


def parse_flags(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default=DATA, help="directory of the four IDX .gz files")
    p.add_argument("--steps", type=int, default=400, help="inner (optimizer) steps per island")
    p.add_argument("--inner-steps", type=int, default=50, help="H: inner steps per outer step")
    p.add_argument("--batch-size", type=int, default=64, help="images per step, per island")
    p.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw",
                   help="inner optimizer (sgd: momentum 0.9)")
    p.add_argument("--lr", type=float, default=None,
                   help="inner learning rate (default: 1e-3 for adamw, 0.05 for sgd)")
    p.add_argument("--outer-lr", type=float, default=0.7, help="DiLoCo outer SGD learning rate")
    p.add_argument("--compress", default="none", help="pseudo-gradient compression spec")
    p.add_argument("--buffers", choices=["average", "rank0", "local"], default="average",
                   help="BatchNorm statistics at every outer step: averaged over islands, "
                        "rank 0's, or left local")
    p.add_argument("--threads", type=int, default=1, help="intra-op CPU threads")
    p.add_argument("--seed", type=int, default=0,
                   help="model init (rank 0's is used) and batches (drawn from (seed, rank))")
    p.add_argument("--eval-every", type=int, default=200,
                   help="steps between test evaluations by rank 0 (of the global model, after "
                        "an outer step); 0: only at the end")
    p.add_argument("--test-limit", type=int, default=0,
                   help="evaluate on the first N test images only (0: all 10,000)")
    p.add_argument("--timeout-s", type=float, default=None,
                   help="rendezvous and collective timeout (default DILOCO_TIMEOUT_S or 60)")
    f = p.parse_args(argv)
    if f.steps < 1 or f.inner_steps < 1 or f.batch_size < 1 or f.threads < 1:
        p.error("--steps, --inner-steps, --batch-size and --threads must be >= 1")
    if f.lr is None:
        f.lr = DEFAULT_LR[f.optimizer]
    return f


def read_idx(path):
    """An IDX file (LeCun's MNIST format: magic 0x0000080D, D big-endian int32 sizes, uint8s)."""
    with gzip.open(path, "rb") as stream:
        data = stream.read()
    zero, dtype, dims = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08:
        raise SystemExit("fashion_mnist.py: %s is not an IDX file of unsigned bytes" % path)
    shape = struct.unpack(">%di" % dims, data[4:4 + 4 * dims])
    values = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims)
    if values.size != int(np.prod(shape)):
        raise SystemExit("fashion_mnist.py: %s holds %d bytes for shape %s"
                         % (path, values.size, shape))
    return torch.from_numpy(values.reshape(shape).copy())


def load(data, split):
    paths = [os.path.join(data, "%s-%s-ubyte.gz" % (split, kind))
             for kind in ("images-idx3", "labels-idx1")]
    for path in paths:
        if not os.path.exists(path):
            raise SystemExit("fashion_mnist.py: %s not found (apt install dataset-fashion-mnist, "
                             "or pass --data)" % path)
    images, labels = (read_idx(path) for path in paths)
    return images, labels.long()


def normalize(images):
    return ((images.float() / 255.0 - MEAN) / STD).unsqueeze(1)


class CNN(torch.nn.Module):
    """conv-bn-relu-pool twice, then a linear classifier: 28x28 -> 14x14 -> 7x7 -> 10."""

    def __init__(self, width=16):
        super().__init__()
        nn = torch.nn
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1, bias=False), nn.BatchNorm2d(2 * width),
            nn.ReLU(), nn.MaxPool2d(2))
        self.classifier = nn.Linear(2 * width * 7 * 7, 10)

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))


def accuracy(model, images, labels, chunk=250):
    model.eval()
    with torch.no_grad():
        correct = sum((model(normalize(images[i:i + chunk])).argmax(1) == labels[i:i + chunk])
                      .sum().item() for i in range(0, len(images), chunk))
    model.train()
    return correct / len(images)


def model_hash(model):
    """sha256 over every parameter's and buffer's name and bytes (equal models, equal hashes)."""
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def format_bytes(n):
    return "%.2f MB" % (n / 1e6) if n >= 1e6 else "%.1f kB" % (n / 1e3)


def train(f):
    torch.set_num_threads(f.threads)
    train_images, train_labels = load(f.data, "train")
    test_images, test_labels = load(f.data, "t10k")
    if f.test_limit > 0:
        test_images, test_labels = test_images[:f.test_limit], test_labels[:f.test_limit]
    group = diloco.init_process_group(timeout=f.timeout_s)
    rank, world_size = group.rank, group.world_size

    torch.manual_seed(f.seed)
    model = CNN()
    if f.optimizer == "adamw":
        inner = torch.optim.AdamW(model.parameters(), lr=f.lr)
    else:
        inner = torch.optim.SGD(model.parameters(), lr=f.lr, momentum=0.9)
    # A collective: every island must agree on the options (and on --steps, so that none stops
    # early); then all start from rank 0's parameters and buffers.
    outer = diloco.DiLoCo(model, inner, group, inner_steps=f.inner_steps, outer_lr=f.outer_lr,
                          compression=f.compress, buffers=f.buffers,
                          agree_on={"steps": f.steps, "batch_size": f.batch_size})
    if rank == 0:
        print("fashion_mnist.py: %d islands, %s inner lr %g, H = %d, %d steps of %d images, "
              "{:,} parameters".format(sum(p.numel() for p in model.parameters()))
              % (world_size, f.optimizer, f.lr, f.inner_steps, f.steps, f.batch_size))
        print("buffers (%s at every outer step): %s"
              % (outer.buffers, ", ".join(outer.buffer_names())), flush=True)

    generator = torch.Generator().manual_seed(f.seed * 1000003 + rank)  # batches differ by rank
    loss_sum, loss_count = 0.0, 0
    for step in range(1, f.steps + 1):
        index = torch.randint(0, len(train_images), (f.batch_size,), generator=generator)
        loss = F.cross_entropy(model(normalize(train_images[index])), train_labels[index])
        inner.zero_grad()
        loss.backward()
        inner.step()
        loss_sum, loss_count = loss_sum + loss.item(), loss_count + 1
        synced = outer.step()
        if step == f.steps and not synced:
            outer.sync()  # fold the last inner steps in: every island ends on the global model
            synced = True
        if synced and rank == 0:
            line = "step %d/%d | outer %d | loss %.4f | sent %s" % (
                step, f.steps, outer.stats().outer_steps, loss_sum / loss_count,
                format_bytes(group.stats().bytes_sent))
            if f.eval_every and step % f.eval_every < f.inner_steps and step < f.steps:
                line += " | test accuracy %.4f" % accuracy(model, test_images, test_labels)
            print(line, flush=True)
        if synced:
            loss_sum, loss_count = 0.0, 0

    print("rank %d/%d: test accuracy %.4f | sha256 %s | sent %s"
          % (rank, world_size, accuracy(model, test_images, test_labels), model_hash(model),
             format_bytes(group.stats().bytes_sent)), flush=True)


def main(argv=None):
    f = parse_flags(sys.argv[1:] if argv is None else argv)
    try:
        train(f)
    except diloco.PeerLostError as e:
        print("fashion_mnist.py: lost a peer, giving up: %s" % e, file=sys.stderr)
        return 1
    except diloco.Error as e:
        print("fashion_mnist.py: error: %s" % e, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
