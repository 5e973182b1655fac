"""How every ``edgefleet`` command talks to its user: tables, ``--json``, one-line errors.

Each command builds one JSON-able value and hands it to :func:`emit` with a
function that renders the human view, so the two outputs cannot drift apart
and ``--json`` means the same thing everywhere. :func:`friendly_errors` is the
one place where our errors become ``Error: ...`` on stderr and exit status 1:
an operator sees a sentence and the error's stable code, never a traceback.

With ``--json``, errors are JSON too: one object on **stderr**
(``{"error": {"code": "home_missing", "message": "..."}}``; stdout stays
empty), with the same exit status (1 failed, 2 usage). :func:`show_error`
writes it; the root group calls it for every :class:`click.ClickException`
of a command that had ``--json``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import click

from edgefleet.protocols.errors import EdgefleetError

__all__ = [
    "DEVICE_COUNTER_KINDS",
    "JSON_META_KEY",
    "CommandError",
    "device_counts",
    "emit",
    "error_message",
    "friendly_errors",
    "json_option",
    "render_table",
    "show_error",
]

JSON_META_KEY = "edgefleet.json"
"""Set in ``click.Context.meta`` when the running command was given ``--json``."""

F = TypeVar("F", bound=Callable[..., Any])


def render_table(
    headers: Sequence[str], rows: Sequence[Sequence[object]], *, styled: bool | None = None
) -> str:
    """An aligned table; ``None`` renders as ``-``.

    On a terminal (``styled=None`` and stdout is a TTY) it is drawn by rich,
    fitted to the terminal's width with bold headers (``NO_COLOR`` is
    honoured). Piped or redirected it is plain text, one row a line, columns
    padded with spaces: scripts and ``grep`` see the same text on every
    machine, whatever the terminal.
    """
    cells = [[("-" if v is None else str(v)) for v in row] for row in rows]
    if styled is None:
        styled = _stdout_is_terminal()
    if styled:
        return _rich_table(headers, cells)
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    lines = ["  ".join(h.upper().ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    return "\n".join(lines)


def _stdout_is_terminal() -> bool:
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):  # no real stream (closed, CliRunner)
        return False


def _rich_table(headers: Sequence[str], cells: list[list[str]]) -> str:
    # rich (controller extra only) is loaded when a table is drawn, not for --help.
    import io
    import shutil

    from rich import box
    from rich.console import Console
    from rich.table import Table

    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, header_style="bold")
    for h in headers:
        table.add_column(h.upper(), overflow="fold")
    for row in cells:
        table.add_row(*row)
    buffer = io.StringIO()
    width = shutil.get_terminal_size((120, 24)).columns
    Console(file=buffer, force_terminal=True, width=width).print(table)
    return buffer.getvalue().rstrip("\n")


def emit(as_json: bool, data: object, table: Callable[[], str]) -> None:
    """Print ``data`` as JSON, or the human view ``table()`` renders of it.

    The table is a function so that commands never pay for formatting they
    do not print.
    """
    if as_json:
        click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))
    else:
        click.echo(table())


def _remember_json(ctx: click.Context, _param: click.Parameter, value: bool) -> bool:
    if value:
        ctx.meta[JSON_META_KEY] = True
    return value


def json_option(f: F) -> F:
    """The ``--json`` flag every listing has, passed to the command as ``as_json``.

    It also marks the context, so that the command's errors are JSON as well
    (see :func:`show_error`).
    """
    return click.option(
        "--json",
        "as_json",
        is_flag=True,
        is_eager=True,  # parsed first: a usage error later on the line is JSON too
        callback=_remember_json,
        help="Machine-readable JSON output (errors too: an object on stderr).",
    )(f)


class CommandError(click.ClickException):
    """A command's expected failure: a sentence and a stable ``code``, exit status 1.

    ``message`` (what ``Error: ...`` shows) is the sentence followed by the
    code, as :func:`error_message` writes it; JSON errors carry the two apart.
    """

    def __init__(
        self, sentence: str, code: str = "error", details: dict[str, Any] | None = None
    ) -> None:
        # As before JSON errors: the sentence, then the error's own code if it has one.
        plain = ("error", "os_error", EdgefleetError.code)
        super().__init__(sentence if code in plain else f"{sentence} [{code}]")
        self.sentence = sentence
        self.code = code
        # More for scripts (--json): the API's URL and HTTP status, the devices that failed.
        self.details = details or {}


def error_code(exc: click.ClickException) -> str:
    """The stable code a JSON error carries: the error's own, else ``usage`` or ``error``."""
    code = getattr(exc, "code", None)
    if isinstance(code, str) and code:
        return code
    return "usage" if isinstance(exc, click.UsageError) else "error"


def show_error(exc: click.ClickException) -> None:
    """Write ``exc`` as one JSON object on stderr: ``{"error": {"code", "message"}}``."""
    message = getattr(exc, "sentence", exc.message)
    error = {"code": error_code(exc), "message": message, "exit_status": exc.exit_code}
    error.update(getattr(exc, "details", None) or {})
    body = {"error": error}
    click.echo(json.dumps(body, sort_keys=True), err=True)


def error_message(exc: EdgefleetError) -> str:
    """The error's sentence followed by its stable code, which scripts and docs can match on.

    The base class's generic code says nothing the word "Error" does not, so it
    is left out.
    """
    code = getattr(exc, "code", None)
    return f"{exc} [{code}]" if code and code != EdgefleetError.code else str(exc)


@contextmanager
def friendly_errors() -> Iterator[None]:
    """Turn our errors, and the file system's, into ``Error: ...`` and exit 1.

    Only :class:`EdgefleetError` (whatever edgefleet refused on purpose) and
    :class:`OSError` (a file or socket the operator named is missing, unreadable
    or unreachable) are expected here. Anything else is a bug and keeps its
    traceback, so that it gets reported rather than hidden behind a sentence.
    """
    try:
        yield
    except EdgefleetError as exc:
        # An API refusal keeps the controller's code (not_found, forbidden, ...).
        code = getattr(exc, "api_code", None) or getattr(exc, "code", None) or EdgefleetError.code
        details: dict[str, Any] = {}
        for name, key in (("status", "http_status"), ("url", "url")):
            if getattr(exc, name, None) is not None:
                details[key] = getattr(exc, name)
        raise CommandError(str(exc), code, details) from exc
    except BrokenPipeError:
        raise  # the reader went away (`| head`); the root group exits quietly
    except OSError as exc:
        raise CommandError(_os_error_message(exc), "os_error") from exc


def _os_error_message(exc: OSError) -> str:
    # str(OSError) is "[Errno 2] No such file or directory: 'x'"; lead with the
    # reason and the file, which is what the operator has to act on.
    if exc.strerror is None:
        return str(exc) or type(exc).__name__
    where = f": {exc.filename}" if exc.filename is not None else ""
    if exc.filename2 is not None:
        where += f" -> {exc.filename2}"
    return f"{exc.strerror}{where}"


DEVICE_COUNTER_KINDS = {
    "agent_rejected.": "refused_by_agent",  # messages the agent refused, by reason
    "transfer_refused.": "transfer_refused",  # file requests the controller refused (overload)
    "device_rejected.": "rejected_by_controller",  # the device's messages the controller dropped
}
"""Per-device counter families (``<prefix><device>.<reason>``) and how the CLI names them."""


def device_counts(
    counters: dict[str, int], device_id: str | None = None
) -> dict[str, dict[str, dict[str, int]]]:
    """Per-device overloads and refusals: ``{device: {kind: {reason: count}}}``.

    Device ids may contain dots and reasons never do, so the reason is what
    follows the last dot. ``device_id`` keeps only that device.
    """
    out: dict[str, dict[str, dict[str, int]]] = {}
    for name, value in counters.items():
        for prefix, kind in DEVICE_COUNTER_KINDS.items():
            if not name.startswith(prefix):
                continue
            device, dot, reason = name[len(prefix) :].rpartition(".")
            if dot and device and value and (device_id is None or device == device_id):
                by_kind = out.setdefault(device, {}).setdefault(kind, {})
                by_kind[reason] = by_kind.get(reason, 0) + value
            break
    return out
