"""Typed errors shared by every cadbcnn package.

Every error carries the fix in its message. Library code raises these; only
CLI code turns them into exit codes.
"""

from __future__ import annotations


class CadbcnnError(Exception):
    """Base class of every error raised on purpose by cadbcnn."""

    exit_code = 2


class ModelSpecError(CadbcnnError):
    """A model spec is missing, malformed, or does not match its model."""


class ModelLoadError(CadbcnnError):
    """A model file cannot be found, read or opened by ONNX Runtime."""


class DeviceError(CadbcnnError):
    """The requested execution device is not available."""


class ModelRunError(CadbcnnError):
    """ONNX Runtime failed while running a model that loaded (e.g. it ran out of memory)."""


class ArgumentError(CadbcnnError, ValueError):
    """A bad argument to an API call or command, refused before any work."""


class OutputError(CadbcnnError):
    """The results file cannot be written: a directory, locked by another run, or a file cadbcnn did not write."""


class ImageError(CadbcnnError):
    """An image cannot be read or decoded; the message names the file."""

    exit_code = 1

    def __init__(self, message: str, *, source: str | None = None):
        super().__init__(message)
        self.source = source


class DatasetError(CadbcnnError):
    """A training dataset folder is missing, empty or unusable."""


class CheckpointError(CadbcnnError):
    """A checkpoint is missing, corrupt or not a cadbcnn checkpoint."""


class GateError(CadbcnnError):
    """A produced artifact failed a check it must pass (parity, accuracy, OOD, a package test): exit code 3.

    ``report`` is the text of the check's report, shown above the error by the CLI.
    """

    exit_code = 3

    def __init__(self, message: str, *, report: str | None = None):
        super().__init__(message)
        self.report = report


class ExportError(GateError):
    """An exported model failed one of its gates (checker, loading, parity, accuracy); nothing failed is kept."""


class OODGateError(GateError):
    """A model's out-of-distribution flag missed the release gate on foreign images."""
