"""Exceptions that logitcache raises on purpose.

Every error a user can cause (bad config, bad input, a cache that does not match) is a
subclass of :class:`LogitcacheError`, carries a message that says what is wrong and what
to do, and is mapped by the CLI to an exit code: 2 for bad usage or bad config, 1 for a
job that failed. Anything else escaping the library is a bug.
"""

from __future__ import annotations


class LogitcacheError(Exception):
    """Base class of all deliberate logitcache errors."""

    exit_code = 1

    def details(self) -> dict:
        """What a machine-readable report of this error adds to its type and message."""
        return {}


class ConfigError(LogitcacheError, ValueError):
    """A configuration (YAML file, --set override or constructor argument) is invalid."""

    exit_code = 2


class CacheFormatError(LogitcacheError):
    """A cache or manifest cannot be read: unknown format, newer version, wrong kind."""

    exit_code = 2


class IncompatibleCacheError(LogitcacheError):
    """An existing cache was built with a different configuration, tokenizer or teacher."""

    exit_code = 2


class CorruptShardError(LogitcacheError):
    """A committed shard does not match what the manifest says about it."""


class CacheWriteError(LogitcacheError):
    """Writing to the cache failed (a full disk, no permission); committed shards stay intact."""


class VocabularyTooLargeError(ConfigError):
    """A vocabulary does not fit the widest token-id type the format has."""


class CorpusError(LogitcacheError):
    """The corpus cannot be read as configured: missing file or column, bad document."""

    exit_code = 2


class TeacherError(LogitcacheError):
    """The teacher model or its tokenizer cannot be loaded or does not fit the job."""

    exit_code = 2


class StudentError(LogitcacheError):
    """A student model or tokenizer cannot be built, loaded or trained from this cache."""

    exit_code = 2
