"""Byte-level text corpus: the Python standard library's own sources by default (real text,
no download), or any text file / folder the user names."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import torch

TEXT_SUFFIXES = (".py", ".txt", ".md", ".rst")


def default_corpus_dir() -> Path:
    """The directory of the running interpreter's standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def corpus_files(path: str | Path | None) -> list[Path]:
    """The files of the corpus, sorted so that it is reproducible.

    ``path`` may be a file or a folder (searched recursively for .py/.txt/.md/.rst files);
    ``None`` means the standard library's ``.py`` files, without the packages installed in it."""
    root = default_corpus_dir() if path is None else Path(path)
    if not root.exists():
        raise FileNotFoundError(f"corpus path {root} does not exist")
    if root.is_file():
        return [root]
    suffixes = (".py",) if path is None else TEXT_SUFFIXES
    files = sorted(f for f in root.rglob("*") if f.is_file() and f.suffix in suffixes)
    if path is None:  # not the installed packages; relative to the root, which may sit under such a path
        files = [f for f in files if "site-packages" not in f.relative_to(root).parts]
    if not files:
        raise ValueError(f"no {'/'.join(suffixes)} files under {root}")
    return files


def read_corpus(path: str | Path | None, max_bytes: int) -> bytes:
    """Concatenate the corpus files (see :func:`corpus_files`) up to ``max_bytes``."""
    chunks, total = [], 0
    for f in corpus_files(path):
        with f.open("rb") as file:  # no more than the cap: a corpus file may be far larger than memory
            data = file.read(max_bytes - total)
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    corpus = b"".join(chunks)
    if len(corpus) < 10_000:
        raise ValueError(f"corpus at {path or default_corpus_dir()} has only {len(corpus)} bytes; need at least 10,000")
    return corpus


class ByteBatches:
    """Random ``(batch, seq_len + 1)`` windows of a byte corpus, split 95/5 into train/val.

    Batches come from a private generator, so every optimizer sees the same data stream."""

    def __init__(self, corpus: bytes, seq_len: int, batch_size: int, seed: int = 0):
        data = torch.frombuffer(bytearray(corpus), dtype=torch.uint8).long()
        cut = int(0.95 * len(data))
        self.train, self.val = data[:cut], data[cut:]
        for split, part in (("training", self.train), ("validation (5%)", self.val)):
            if len(part) < seq_len + 2:  # a window is seq_len + 1 bytes; starts are drawn below len - seq_len - 1
                raise ValueError(
                    f"corpus of {len(data):,} bytes is too short for --seq-len {seq_len}: its {split} split has "
                    f"{len(part):,} bytes, fewer than the {seq_len + 2:,} its windows need; use a corpus of at "
                    f"least {20 * (seq_len + 2):,} bytes or a shorter --seq-len"
                )
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
