"""A dataset at one input size, as every stage consumes it: splits of raw pixels, the preprocessing that feeds the
model, its identity (``name`` + ``fingerprint``) and the DataLoader that batches it.  :mod:`calibration.datasets`
opens datasets by name."""
from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from calibration.preprocess import Preprocess
from compress.errors import UserError

__all__ = ["DataSource", "SPLITS", "file_fingerprint"]

SPLITS = ("train", "test")


@dataclass
class DataSource:
    """A named dataset at one input size: splits of raw pixels plus the one preprocessing that feeds the model."""

    name: str  # the spec that reopens it (see the module docstring)
    kind: str  # "fashion-mnist" | "imagefolder" | "synthetic"
    preprocess: Preprocess
    num_classes: int | None
    class_names: Sequence[str] | None
    _splits: dict
    _fingerprint: Callable[[], str] = lambda: "none"
    workers: int = 0  # DataLoader worker processes decoding and preprocessing (0: in this process)

    @property
    def fingerprint(self) -> str:
        """A digest of the dataset's files (cheap: sizes, mtimes, headers), computed once."""
        cached = self.__dict__.get("_fingerprint_value")
        if cached is None:
            cached = self.__dict__["_fingerprint_value"] = self._fingerprint()
        return cached

    @property
    def identity(self) -> dict[str, str]:
        """What the dataset is: ``{"name", "fingerprint"}`` (what caches and reports are keyed by)."""
        return {"name": self.name, "fingerprint": self.fingerprint}

    @property
    def has_labels(self) -> bool:
        return self.kind != "synthetic"

    def split(self, which: str, limit: int | None = None) -> Dataset:
        if which not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}")
        ds = self._splits[which]()
        if limit is not None and limit < len(ds):
            ds = torch.utils.data.Subset(ds, range(limit))
        return ds

    def loader(self, which: str, batch_size: int = 256, shuffle: bool = False, limit: int | None = None,
               seed: int = 0, drop_last: bool = False, sampler=None) -> DataLoader:
        """Batches of ``(input float32 [N,3,H,W], labels int64 [N])``; labels are -1 on synthetic data."""
        ds = self.split(which, limit)
        gen = torch.Generator().manual_seed(seed)
        return _Loader(ds, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
                       generator=gen, drop_last=drop_last, collate_fn=self.collate, num_workers=self.workers)

    def collate(self, items):
        """Raw ``(pixels, label)`` items -> one preprocessed batch ``(input [N,3,H,W], labels [N])``."""
        pixels = [it[0] for it in items]
        labels = torch.tensor([int(it[1]) for it in items], dtype=torch.int64)
        if all(p.shape == pixels[0].shape for p in pixels):
            x = self.preprocess(torch.stack(pixels))
        else:  # imagefolder: every image has its own size
            x = torch.cat([self.preprocess(p.unsqueeze(0)) for p in pixels])
        return x, labels

    def resplit(self, train: Sequence[int], test: Sequence[int], of: str = "train") -> "DataSource":
        """This dataset with its "train" and "test" splits replaced by the given images of split ``of``
        (NetAdapt fine-tunes on one part of the train split and scores on another)."""
        base = self._splits[of]
        train, test = [int(i) for i in train], [int(i) for i in test]
        return dataclasses.replace(self, _splits={"train": lambda: torch.utils.data.Subset(base(), train),
                                                  "test": lambda: torch.utils.data.Subset(base(), test)})

    def with_workers(self, workers: int | None) -> "DataSource":
        """The same dataset decoded by ``workers`` DataLoader processes (None: unchanged)."""
        if workers is None:
            return self
        if workers < 0:
            raise UserError(f"--workers must be >= 0, got {workers}")
        return dataclasses.replace(self, workers=int(workers))

    def numpy_batches(self, which: str, batch_size: int = 64, limit: int | None = None
                      ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for x, y in self.loader(which, batch_size=batch_size, limit=limit):
            yield x.numpy(), y.numpy()


class _Loader(DataLoader):
    """A DataLoader whose worker processes' one-line errors (an undecodable image, named) reach the user as the
    same one-line error: torch re-raises them wrapped in "Caught UserError in DataLoader worker process N" plus
    the worker's traceback."""

    def __iter__(self):
        it = super().__iter__()
        while True:
            try:
                batch = next(it)
            except StopIteration:
                return
            except UserError as e:
                text = str(e)
                if text.startswith("Caught UserError") and "UserError: " in text:
                    raise UserError(text.rsplit("UserError: ", 1)[1].strip().splitlines()[0]) from None
                raise
            yield batch


def file_fingerprint(paths: Sequence[Path], head_bytes: int = 0) -> str:
    """sha1 (12 hex digits) over each file's name, size and mtime (and its first ``head_bytes`` bytes)."""
    h = hashlib.sha1()
    for p in paths:
        st = p.stat()
        h.update(f"{p.name}|{st.st_size}|{st.st_mtime_ns}|".encode())
        if head_bytes:
            with open(p, "rb") as f:
                h.update(f.read(head_bytes))
    return h.hexdigest()[:12]
