"""accelc's exception types. Each carries the process exit code the CLI turns it into.

Only the CLI converts these to exit codes; library code raises them with a one-line message
that says what went wrong and what to do about it.
"""

from __future__ import annotations


class AccelcError(Exception):
    """Base class: an expected failure with a clear message (never shown as a traceback)."""

    exit_code = 1


class UsageError(AccelcError):
    """Bad command line, bad recipe, bad input file: the user can fix it (exit 2)."""

    exit_code = 2


class RecipeError(UsageError):
    """A recipe that does not validate. The message names file, line, key path and what is allowed."""


class MissingDependency(AccelcError):
    """An optional dependency or an unsupported target (exit 3). The message says what to install."""

    exit_code = 3

    def __init__(self, what: str, install: str):
        super().__init__(f"{what} is not available: install it with `{install}`")
        self.install = install


class HostUnsupported(AccelcError):
    """This machine lacks what an artifact was built for (CPU instruction sets, a GPU architecture,
    a driver): exit 3, like a missing dependency, naming what is missing and where it was built."""

    exit_code = 3


class InternalError(AccelcError):
    """accelc broke one of its own invariants: a bug, never the input's fault (exit 1, as for any
    unexpected exception), so exit 2 keeps meaning "fix your input"."""

    exit_code = 1

    def __init__(self, what: str):
        super().__init__(f"internal error (a bug in accelc; please report it): {what}")


class PassFailed(AccelcError):
    """A pass (or target lowering) raised: the pass is named; earlier artifacts stay intact (exit 4)."""

    exit_code = 4

    def __init__(self, pass_name: str, reason: str):
        super().__init__(f"'{pass_name}' failed: {reason}")
        self.pass_name = pass_name


class ValidationFailed(AccelcError):
    """Numerical parity or a quality goal was missed (exit 5)."""

    exit_code = 5


def require(module: str, install: str):
    """Import an optional dependency or raise MissingDependency naming the pip command."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - exercised only when a dependency is absent
        raise MissingDependency(f"python module '{module}' ({exc})", install) from exc
