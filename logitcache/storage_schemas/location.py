"""CacheLocation: the few filesystem operations a cache needs, on a local path or any fsspec URL.

Durability rules live here so the writer can state them once:

- on a local disk, a file is fsynced before it is renamed, and its directory after, so a
  power cut cannot leave a listed shard with missing bytes;
- ``write_atomic`` writes a temporary file and renames it over the target, so readers see
  the old or the new content, never a mix;
- on object storage, renames are copies and there are no directories to sync; a single
  object write is atomic, which is what the manifest commit relies on.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import uuid
from collections.abc import Iterator

import fsspec
from fsspec.implementations.local import LocalFileSystem

_READ_CHUNK = 1 << 22
_TEMPORARY_MARK = ".tmp-"  # write_atomic's temporary files: <target>.tmp-<8 hex digits>


class CacheLocation:
    """A cache root on some filesystem; every path argument is relative to the root."""

    def __init__(self, url: str | os.PathLike) -> None:
        self.url = os.fspath(url)
        self.fs, self.root = fsspec.core.url_to_fs(self.url)
        self.is_local = isinstance(self.fs, LocalFileSystem)
        if self.is_local:
            self.root = os.path.abspath(self.root)

    def __repr__(self) -> str:
        return f"CacheLocation({self.url!r})"

    def full(self, rel: str = "") -> str:
        return posixpath.join(self.root, rel) if rel else self.root

    def exists(self, rel: str) -> bool:
        return self.fs.exists(self.full(rel))

    def isdir(self, rel: str) -> bool:
        return self.fs.isdir(self.full(rel))

    def makedirs(self, rel: str) -> None:
        self.fs.makedirs(self.full(rel), exist_ok=True)

    def read_bytes(self, rel: str) -> bytes:
        return self.fs.cat_file(self.full(rel))

    def open(self, rel: str, mode: str = "rb"):
        return self.fs.open(self.full(rel), mode)

    def listdir(self, rel: str) -> list[str]:
        """Names (not paths) directly under ``rel``; empty when it does not exist."""
        if not self.exists(rel):
            return []
        return sorted(posixpath.basename(p.rstrip("/")) for p in self.fs.ls(self.full(rel), detail=False))

    def remove(self, rel: str) -> None:
        if self.exists(rel):
            self.fs.rm(self.full(rel), recursive=True)

    def write_atomic(self, rel: str, data: bytes) -> None:
        """Replace ``rel`` with ``data`` so that readers see either old or new content."""
        target = self.full(rel)
        if not self.is_local:
            self.fs.pipe_file(target, data)
            return
        tmp = f"{target}{_TEMPORARY_MARK}{uuid.uuid4().hex[:8]}"
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        _fsync_dir(os.path.dirname(target))

    def leftover_temporaries(self, rel: str) -> list[str]:
        """Temporary files of :meth:`write_atomic` for ``rel`` that a killed process left behind
        (paths relative to the root). Only meaningful while no one else writes ``rel``."""
        directory, name = posixpath.split(rel)
        return [posixpath.join(directory, found) for found in self.listdir(directory)
                if found.startswith(f"{name}{_TEMPORARY_MARK}")]

    def sync_tree(self, rel: str) -> None:
        """fsync a file, or every file and directory under ``rel`` (local disks only)."""
        if not self.is_local:
            return
        path = self.full(rel)
        if os.path.isfile(path):
            _fsync_file(path)
            return
        for dirpath, _dirnames, filenames in os.walk(path):
            for name in filenames:
                _fsync_file(os.path.join(dirpath, name))
            _fsync_dir(dirpath)

    def rename(self, src: str, dst: str) -> None:
        """Move ``src`` to ``dst`` (replacing it), durably on a local disk."""
        source, target = self.full(src), self.full(dst)
        if self.is_local:
            if os.path.isdir(target):
                self.fs.rm(target, recursive=True)
            os.replace(source, target)
            _fsync_dir(os.path.dirname(target))
            return
        if self.fs.exists(target):
            self.fs.rm(target, recursive=True)
        self.fs.mv(source, target, recursive=True)

    def files_under(self, rel: str) -> Iterator[tuple[str, int]]:
        """(path relative to ``rel``, size) of every file at or under ``rel``, sorted."""
        path = self.full(rel)
        if self.fs.isfile(path):
            yield "", int(self.fs.size(path))
            return
        found = self.fs.find(path, detail=True)
        for full_path in sorted(found):
            info = found[full_path]
            if info.get("type") == "file":
                yield posixpath.relpath(full_path, path), int(info["size"])

    def digest(self, rel: str) -> tuple[int, str]:
        """(total bytes, sha256 hex) of a file, or of a directory tree.

        A directory's digest is the sha256 of its sorted ``relpath<TAB>size<TAB>sha256``
        lines, so it changes when any file's bytes, name or presence changes.
        """
        if self.fs.isfile(self.full(rel)):
            return int(self.fs.size(self.full(rel))), self._file_sha256(rel)
        lines, total = [], 0
        for sub, size in self.files_under(rel):
            lines.append(f"{sub}\t{size}\t{self._file_sha256(posixpath.join(rel, sub))}\n")
            total += size
        return total, hashlib.sha256("".join(lines).encode()).hexdigest()

    def _file_sha256(self, rel: str) -> str:
        h = hashlib.sha256()
        with self.open(rel, "rb") as fh:
            while chunk := fh.read(_READ_CHUNK):
                h.update(chunk)
        return h.hexdigest()


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems do not support fsync on directories
    finally:
        os.close(fd)
