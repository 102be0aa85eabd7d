"""The ground floor every module may import: the error a user can fix, and how a library's error is
shortened for a one-line message. Nothing here imports from the project."""


class ArgumentError(ValueError):
    """Bad input (flags, files, checkpoints): reported to the user in one line, exit 2, no traceback."""


def first_line(exc: BaseException) -> str:
    """An exception's first line, for one-line messages (a library's error may run to pages)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
