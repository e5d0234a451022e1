"""Landing drops for tests, built from generated ones."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import polars as pl

ENTITIES = ("tutors", "sessions", "reschedules")


def one_file_per_entity(files: Iterable[Path], landing: Path) -> None:
    """``files`` (generated drops) as one ``<entity>_all.csv`` per entity in ``landing``, rows
    in drop order: the same current state as dropping each file in turn (a later row
    supersedes an earlier one by updated_at, then by position), in a fraction of the time."""
    landing.mkdir(parents=True, exist_ok=True)
    files = list(files)
    for entity in ENTITIES:
        frames = [pl.read_csv(f, infer_schema=False) for f in files if f.name.startswith(entity)]
        pl.concat(frames, how="diagonal").write_csv(landing / f"{entity}_all.csv")
