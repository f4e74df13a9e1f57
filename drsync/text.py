"""How drsync puts a name or a message on one line for a terminal or a log: control characters,
line separators, invisible and reordering characters, and undecodable bytes escaped, so that a file
name can neither split a line nor forge one (:func:`printable`, :func:`one_line`, :class:`OneLineFormatter`).
"""

from __future__ import annotations

import codecs
import logging

# Characters a terminal would not show as themselves: C0 controls and DEL as \\xNN (\\n, \\t, \\r), C1
# controls and invisible or reordering format characters (zero-width, bidirectional overrides, the
# byte-order mark, line and paragraph separators, interlinear annotations, tag characters) as \\uNNNN
# or \\UNNNNNNNN, never as an undecodable byte's \\xNN.
_CONTROLS = ({c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F)} | {0x0A: "\\n", 0x09: "\\t", 0x0D: "\\r"}
             | {c: f"\\u{c:04x}" for c in (*range(0x80, 0xA0), 0xAD, 0x061C, 0x180E, *range(0x200B, 0x2010),
                                           *range(0x2028, 0x202F), *range(0x2060, 0x2070), 0xFEFF,
                                           *range(0xFFF9, 0xFFFC))}
             | {c: f"\\U{c:08x}" for c in range(0xE0000, 0xE0080)})


def _escape_surrogates(err: UnicodeError) -> tuple[bytes, int]:
    """Encode-error handler: a lone surrogate that stands for an undecodable byte of a name (U+DC80 to
    U+DCFF, as os.fsdecode makes them) becomes that byte again (shown as ``\\xNN`` after decoding); any
    other lone surrogate (from JSON, say) becomes the text ``\\uNNNN``, where UTF-8 would refuse it."""
    if not isinstance(err, UnicodeEncodeError):
        raise err
    out = bytearray()
    for c in err.object[err.start:err.end]:
        code = ord(c)
        out += bytes([code - 0xDC00]) if 0xDC80 <= code <= 0xDCFF else f"\\u{code:04x}".encode()
    return bytes(out), err.end


codecs.register_error("drsync-surrogates", _escape_surrogates)


def printable(name: str) -> str:
    """A path for a terminal or a log line, on one line and unambiguous: undecodable bytes shown as
    ``\\xNN``, control characters (newlines, escape sequences) as ``\\n``, ``\\xNN``, and a backslash of
    the name itself doubled (so a name holding the text ``\\xff`` never prints like byte 0xff). Never
    raises: any ``str`` has a printable form."""
    return one_line(name.replace("\\", "\\\\"))


def one_line(text: str) -> str:
    """A message for a terminal or a log line on one line: control characters and undecodable bytes
    escaped as :func:`printable` escapes them, backslashes left as they are (names in it were made
    :func:`printable` already; escaping again would double their backslashes). Never raises."""
    return text.encode("utf-8", "drsync-surrogates").decode("utf-8", "backslashreplace").translate(_CONTROLS)


def without_traceback(record: logging.LogRecord) -> logging.LogRecord:
    """``record`` as a copy whose exception (``log.exception``) is said at the end of its message, as
    ``(TypeName: text; --debug shows the traceback)``, instead of as a traceback."""
    if not record.exc_info or record.exc_info[1] is None:
        return record
    e = record.exc_info[1]
    return logging.makeLogRecord({**record.__dict__, "exc_info": None, "exc_text": None, "args": (),
                                  "msg": f"{record.getMessage()} ({type(e).__name__}: {e}; --debug shows "
                                         f"the traceback)"})


class OneLineFormatter(logging.Formatter):
    """A log formatter whose record is one line (:func:`one_line`): a path, command or name with a
    newline in it, in the message or in a field such as the group, stays inside its own record. An
    exception's traceback follows only with ``tracebacks`` (``--debug``); otherwise its type and text
    end the line (:func:`without_traceback`)."""

    def __init__(self, fmt: str, *, tracebacks: bool = False) -> None:
        super().__init__(fmt)
        self.tracebacks = tracebacks

    def format(self, record: logging.LogRecord) -> str:
        return super().format(record if self.tracebacks else without_traceback(record))

    def formatMessage(self, record: logging.LogRecord) -> str:
        return one_line(super().formatMessage(record))
