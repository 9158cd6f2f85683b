"""What every input kind (manifest, tarred, Lhotse) is built from, and the one function it provides.

A source module has `build(cfg: DatasetConfig, ctx: SourceContext) -> DataLoaderWrapper`: it reads its own files,
plans this rank's share and its batches, and returns the loader (data/wrapper.py). data/loader.py only picks the
module from the config; nothing flows back from a source into the picker.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class SourceContext:
    where: str  # "model.train_ds" / "model.validation_ds": the config key errors name
    rank: int
    world_size: int
    seed: int
    is_train: bool
    augmentor: Any = None  # the batch augmentor instance (None: plain audio + noise)
