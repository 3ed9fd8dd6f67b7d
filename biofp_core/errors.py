"""Errors a user can cause, each with a one-line message the CLI prints without a traceback."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pydantic import ValidationError


class BioFPError(Exception):
    """Base class of every error caused by user input or environment, not by a bug."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))  # always one line


class ConfigError(BioFPError):
    """A config file or option is invalid."""


class DataError(BioFPError):
    """A data directory, manifest or labels file is unusable."""


class RecordError(BioFPError):
    """One WFDB record cannot be used; other records go on.

    Parameters
    ----------
    path
        The record (header path or record name) at fault.
    problem
        What is wrong, in a few words.
    """

    def __init__(self, path: Path | str, problem: str) -> None:
        self.path = str(path)
        self.problem = " ".join(str(problem).split())
        super().__init__(f"{self.path}: {self.problem}")


class ArtifactError(BioFPError):
    """A model artifact or checkpoint is missing, corrupt or does not match the code."""


class PrivacyBudgetError(BioFPError):
    """An action would exceed the site's privacy budget, or the site refuses it under a limit it
    pinned itself; the site answers with a refusal.

    ``exhausted`` is True only when what the site has spent is what refuses the action (a fresh
    budget could pay for it): the budget is spent for this kind of action.
    """

    def __init__(self, message: str, *, exhausted: bool = False) -> None:
        super().__init__(message)
        self.exhausted = exhausted


class SiteLimitError(PrivacyBudgetError):
    """The server asks for something beyond a limit the site pinned in its ``[privacy]``."""


def one_line(text: object, limit: int | None = 300) -> str:
    """`text` on one line (whitespace runs collapsed), cut to `limit` characters with '...'."""
    line = " ".join(str(text).split())
    if limit is None or len(line) <= limit:
        return line
    return line[: limit - 3] + "..."


def first_error(
    exc: ValidationError, default: str | None = "config", key: Callable[[str], str] = str
) -> str:
    """'where: message' of the first pydantic error in `exc`, the one line a user reads.

    `where` is the dotted location (each part passed through `key`), or `default` when the error
    is about the whole document (None: the message alone). pydantic's 'Value error, ' prefix is
    dropped and an unexpected key is called an 'unknown key'.
    """
    err = exc.errors()[0]
    where = ".".join(key(str(p)) for p in err["loc"]) or default
    message = str(err["msg"]).removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        message = "unknown key"
    return f"{where}: {message}" if where else message
