"""Error types weft reports to users.

Every failure a user can act on is a WeftError, so the CLI maps exactly these to exit code 1 and
prints their message; anything else is a bug and keeps its traceback.
"""
from __future__ import annotations


class WeftError(Exception):
    """Base of every error weft reports to users (exit code 1)."""


class SourceError(WeftError):
    """The desired state could not be read (API server unreachable, auth failure, bad kubeconfig,
    unreadable dir)."""


class ValidationError(WeftError):
    """One bad field of one object.

    `where` is a file path or "api"; `obj` is "Kind namespace/name" (or "Kind name" for
    cluster-scoped objects); `field` is a dotted path such as "spec.ingress[0].ports[1].port".
    """

    def __init__(self, where: str, obj: str, field: str, message: str):
        self.where = where
        self.obj = obj
        self.field = field
        self.message = message
        super().__init__(f"{where}: {obj}: {field}: {message}" if field else f"{where}: {obj}: {message}")


class InvalidDesiredState(WeftError):
    """Every validation error found in one load; nothing is applied."""

    def __init__(self, errors: list[ValidationError]):
        self.errors = list(errors)
        super().__init__("\n".join(str(e) for e in self.errors))
