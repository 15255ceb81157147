"""Byte-level text corpus: the Python standard library's own sources by default (real text,
no download), or any text file / folder the user names."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import torch

TEXT_SUFFIXES = {".py", ".txt", ".md", ".rst"}


def default_corpus_dir() -> Path:
    """The directory of the running interpreter's standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def read_corpus(path: str | Path | None, max_bytes: int) -> bytes:
    """Concatenate text files (sorted, so the corpus is reproducible) up to ``max_bytes``.

    ``path`` may be a file or a folder (searched recursively for .py/.txt/.md/.rst files);
    ``None`` means the standard library (``.py`` files only)."""
    root = default_corpus_dir() if path is None else Path(path)
    if not root.exists():
        raise FileNotFoundError(f"corpus path {root} does not exist")
    if root.is_file():
        files = [root]
    else:
        suffixes = {".py"} if path is None else TEXT_SUFFIXES
        files = sorted(f for f in root.rglob("*") if f.is_file() and f.suffix in suffixes and "site-packages" not in f.parts)
    chunks, total = [], 0
    for f in files:
        data = f.read_bytes()
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    corpus = b"".join(chunks)[:max_bytes]
    if len(corpus) < 10_000:
        raise ValueError(f"corpus at {root} has only {len(corpus)} bytes; need at least 10,000")
    return corpus


class ByteBatches:
    """Random ``(batch, seq_len + 1)`` windows of a byte corpus, split 95/5 into train/val.

    Batches come from a private generator, so every optimizer sees the same data stream."""

    def __init__(self, corpus: bytes, seq_len: int, batch_size: int, seed: int = 0):
        data = torch.frombuffer(bytearray(corpus), dtype=torch.uint8).long()
        cut = int(0.95 * len(data))
        self.train, self.val = data[:cut], data[cut:]
        self.seq_len, self.batch_size = seq_len, batch_size
        self.gen = torch.Generator().manual_seed(seed)

    def _windows(self, data: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
        offsets = torch.arange(self.seq_len + 1)
        return data[starts.unsqueeze(1) + offsets]

    def train_batch(self) -> torch.Tensor:
        starts = torch.randint(0, len(self.train) - self.seq_len - 1, (self.batch_size,), generator=self.gen)
        return self._windows(self.train, starts)

    def val_batches(self, n_batches: int) -> list[torch.Tensor]:
        """Fixed, evenly spaced validation windows (the same for every run)."""
        n = n_batches * self.batch_size
        starts = torch.linspace(0, len(self.val) - self.seq_len - 2, n).long()
        return list(self._windows(self.val, starts).split(self.batch_size))
