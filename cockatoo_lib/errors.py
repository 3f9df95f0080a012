class CockatooError(Exception):
    """Bad input or configuration. The message is one line that names what and where;
    the command line prints it without a traceback and exits with code 2."""


def first_line(exc: BaseException, detail: str = "") -> str:
    """An exception in one line for a CockatooError's message: the first line of its `detail`
    attribute where it has one (urllib3's and the kubernetes client's `reason`, MLflow's
    `message`), else of the exception itself, at most 300 characters; its type where it says
    nothing."""
    text = str((getattr(exc, detail, None) if detail else None) or exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__
