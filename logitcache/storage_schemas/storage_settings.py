"""How a cache's shard files are laid out on disk: the settings the shard backends write with.

These belong to the on-disk contract, so they live here and not in the job config: a
manifest records them (``manifest.storage``), a writer that extends a cache takes them from
there, and the job config's ``storage`` section (:class:`logitcache.config.StorageConfig`,
which validates what a user writes) hands them over through its ``settings()``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["StorageSettings"]


@dataclass(frozen=True, kw_only=True)
class StorageSettings:
    """Shard file format, compression and block sizes; the defaults are the job config's."""

    backend: Literal["parquet", "zarr"] = "parquet"
    compression: Literal["zstd", "lz4", "none"] = "zstd"
    compression_level: int = 3  # zstd only
    row_group_tokens: int = 262144  # Parquet row groups (and Zarr blocks) cut at about this many tokens
    chunk_tokens: int = 16384  # Zarr inner chunk length in tokens

    @classmethod
    def from_manifest(cls, storage: dict[str, Any]) -> StorageSettings:
        """The settings a manifest's ``storage`` mapping records (fields it lacks: defaults)."""
        return cls(**storage)
