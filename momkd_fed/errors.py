"""Typed errors raised at the project's boundaries.

Every error names what is wrong, where (file, field, slide) and how to fix it; the CLI prints the message as one
line and exits non-zero.
"""

from __future__ import annotations


class MomkdError(Exception):
    """Base class of every error momkd-fed raises on purpose."""


class ConfigError(MomkdError):
    """A configuration value is unknown, of the wrong type, or outside its allowed values."""


class DataError(MomkdError):
    """A data file (features, manifest, genomics) breaks the data contract.

    Parameters
    ----------
    path : str
        The offending file.
    problem : str
        What is wrong, naming the field.
    fix : str, optional
        What the user should do about it.
    """

    def __init__(self, path: str, problem: str, fix: str = "") -> None:
        self.path = str(path)
        self.problem = problem
        self.fix = fix
        msg = f"{self.path}: {problem}"
        if fix:
            msg += f" (fix: {fix})"
        super().__init__(msg)


class CheckpointError(MomkdError):
    """A checkpoint cannot be read or does not match the model it is loaded into."""
