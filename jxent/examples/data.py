"""Data for the example tasks: real data that ships with a package, nothing downloaded.

Both tasks keep their whole data set in host memory as NumPy arrays and draw the
batch of step ``t`` as a pure function of ``(seed, t)`` (an epoch-wise permutation
seeded by ``(seed, epoch)``). A resumed run therefore sees exactly the batches an
uninterrupted run would have seen, with no iterator state to checkpoint.
"""

from __future__ import annotations

import functools
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# The label of padding positions in the byte corpus (passed as ``ignore_index``).
PAD = -1
# The vocabulary of the byte-level language model: one token per byte value.
NUM_BYTES = 256


@dataclass(frozen=True)
class Dataset:
    """Aligned arrays, one row per example."""

    inputs: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.inputs)

    def take(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.inputs[indices], self.labels[indices]


@dataclass(frozen=True)
class BatchSchedule:
    """Which examples make up the batch of each step.

    Step ``t`` is batch ``t % steps_per_epoch`` of epoch ``t // steps_per_epoch``;
    each epoch is a fresh permutation seeded by ``(seed, epoch)``, and the last
    ``num_examples % batch_size`` examples of each permutation are dropped so that
    every batch has the same shape (one compilation).
    """

    num_examples: int
    batch_size: int
    seed: int

    def __post_init__(self):
        if not 0 < self.batch_size <= self.num_examples:
            raise ValueError(
                f"batch size must be in [1, {self.num_examples}] (the number of training "
                f"examples), got {self.batch_size}"
            )

    @property
    def steps_per_epoch(self) -> int:
        return self.num_examples // self.batch_size

    def locate(self, step: int) -> tuple[int, int]:
        """Returns ``(epoch, batch index within the epoch)`` of ``step``."""
        return divmod(step, self.steps_per_epoch)

    def indices(self, step: int) -> np.ndarray:
        """The example indices of the batch of ``step`` (a pure function of seed and step)."""
        epoch, batch = self.locate(step)
        start = batch * self.batch_size
        return _permutation(self.num_examples, self.seed, epoch)[start : start + self.batch_size]

    def describe(self, step: int) -> str:
        """Names the batch of ``step`` for messages, e.g. in a non-finite loss report."""
        epoch, batch = self.locate(step)
        idx = self.indices(step)
        shown = ", ".join(str(i) for i in idx[:8]) + (", ..." if len(idx) > 8 else "")
        return (
            f"batch {batch + 1} of {self.steps_per_epoch} in epoch {epoch + 1} "
            f"(training examples [{shown}])"
        )


@functools.lru_cache(maxsize=4)
def _permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng((seed, epoch)).permutation(n)


# --------------------------------------------------------------------------- digits


@dataclass(frozen=True)
class Digits:
    """scikit-learn's bundled handwritten digits, split into train and held-out sets."""

    train: Dataset
    test: Dataset
    num_classes: int = 10


def load_digits(test_fraction: float = 0.2, split_seed: int = 0) -> Digits:
    """Loads the 1797 8x8 digit images as float32 vectors in [-0.5, 0.5] and int32 labels.

    The split is stratified and fixed by ``split_seed`` (independent of the training
    seed, so held-out numbers of different runs are comparable).
    """
    from sklearn.datasets import load_digits as sk_load_digits  # 1.7 s; only digits needs it

    bunch = sk_load_digits()
    images = (bunch.data.astype(np.float32) / np.float32(16.0)) - np.float32(0.5)
    labels = bunch.target.astype(np.int32)
    rng = np.random.default_rng(split_seed)
    test_idx = []
    for c in np.unique(labels):  # stratified: the same fraction of every class
        members = np.flatnonzero(labels == c)
        test_idx.append(rng.choice(members, round(test_fraction * len(members)), replace=False))
    test_mask = np.zeros(len(labels), bool)
    test_mask[np.concatenate(test_idx)] = True
    return Digits(
        train=Dataset(images[~test_mask], labels[~test_mask]),
        test=Dataset(images[test_mask], labels[test_mask]),
    )


# ------------------------------------------------------------------- byte corpus


@dataclass(frozen=True)
class ByteCorpus:
    """Byte-level language-model data from Python's standard library sources.

    Each row of ``train``/``val`` is ``seq_len`` input bytes and the ``seq_len``
    next bytes as labels; a file's last chunk is padded, with label :data:`PAD`.
    """

    train: Dataset
    val: Dataset
    files: tuple[str, ...]
    num_bytes: int


def stdlib_sources(max_bytes: int) -> list[tuple[str, bytes]]:
    """The standard library's top-level ``*.py`` files in sorted order, up to ``max_bytes``.

    Deterministic for a given Python version: files are taken by name until the
    budget is reached (the last one truncated). Machine-generated files
    (``_sysconfigdata*``) are skipped.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    sources, total = [], 0
    for path in sorted(root.glob("*.py")):
        if path.name.startswith("_sysconfigdata") or total >= max_bytes:
            continue
        data = path.read_bytes()[: max_bytes - total]
        sources.append((path.name, data))
        total += len(data)
    if not sources:
        raise FileNotFoundError(f"no Python source files found in {root}")
    return sources


def chunk_bytes(data: bytes, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Cuts ``data`` into rows of ``seq_len`` inputs and their next-byte labels.

    Rows overlap by one byte so that every byte but the first is a label once;
    the last row is padded (inputs 0, labels :data:`PAD`).
    """
    tokens = np.frombuffer(data, np.uint8).astype(np.int32)
    num_rows = max(1, -(-(len(tokens) - 1) // seq_len))
    padded = np.full(num_rows * seq_len + 1, PAD, np.int32)
    padded[: len(tokens)] = tokens
    starts = np.arange(num_rows)[:, None] * seq_len + np.arange(seq_len)[None, :]
    inputs, labels = padded[starts], padded[starts + 1]
    return np.where(inputs == PAD, 0, inputs), labels


def load_byte_corpus(seq_len: int, max_bytes: int, val_every: int = 10) -> ByteCorpus:
    """Builds the byte corpus; every ``val_every``-th file is held out for validation."""
    sources = stdlib_sources(max_bytes)
    parts: dict[bool, list[tuple[np.ndarray, np.ndarray]]] = {True: [], False: []}
    for i, (_, data) in enumerate(sources):
        if len(data) > 1:
            parts[i % val_every == val_every - 1].append(chunk_bytes(data, seq_len))
    if not parts[True]:  # a tiny corpus: hold out the last file
        parts[True].append(parts[False].pop())
    if not parts[False]:
        raise ValueError(f"the corpus of {max_bytes} bytes is too small to split")

    def stack(pieces):
        return Dataset(
            np.concatenate([p[0] for p in pieces]), np.concatenate([p[1] for p in pieces])
        )

    return ByteCorpus(
        train=stack(parts[False]),
        val=stack(parts[True]),
        files=tuple(name for name, _ in sources),
        num_bytes=sum(len(data) for _, data in sources),
    )
