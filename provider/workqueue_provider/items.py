"""Work items: where they come from, how they become message bodies, and a spool that streams them.

Items are encoded into a temporary spool file *before* anything is published, so an item that can't
be encoded (or is too big) fails the fill with nothing sent, while memory stays flat however many
items there are (a generator is consumed once, item by item).
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal

from workqueue_provider.exceptions import ConfigurationError, ItemSourceError

Encoding = Literal["text", "json", "bytes"]
ENCODINGS: tuple[str, ...] = ("text", "json", "bytes")
CONTENT_TYPES = {"text": "text/plain", "json": "application/json", "bytes": "application/octet-stream"}
DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024  # RabbitMQ 4.x's default max_message_size
_LENGTH = struct.Struct(">I")


@dataclass(frozen=True)
class ItemEncoder:
    """Turns one item into a message body, or raises :class:`ItemSourceError` naming the item."""

    encoding: Encoding = "text"
    charset: str = "utf-8"
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES

    def __post_init__(self) -> None:
        if self.encoding not in ENCODINGS:
            raise ConfigurationError(f"Unknown encoding {self.encoding!r}: use one of {', '.join(ENCODINGS)}.")
        try:
            "".encode(self.charset)
        except LookupError:
            raise ConfigurationError(f"Unknown charset {self.charset!r}: use a Python codec name such as 'utf-8'.") from None
        if isinstance(self.max_message_bytes, bool) or not isinstance(self.max_message_bytes, int) or self.max_message_bytes <= 0:
            raise ConfigurationError(f"max_message_bytes={self.max_message_bytes!r} must be a positive integer.")

    @property
    def content_type(self) -> str:
        return CONTENT_TYPES[self.encoding]

    def encode(self, item: Any, index: int) -> bytes:
        body = self._encode(item, index)
        if len(body) > self.max_message_bytes:
            raise ItemSourceError(
                f"Item #{index} is {len(body)} bytes, over the {self.max_message_bytes}-byte message limit: "
                "put large data in shared storage and queue a reference to it, or raise max_message_bytes "
                "(and the broker's max_message_size)."
            )
        return body

    def _encode(self, item: Any, index: int) -> bytes:
        if self.encoding == "bytes":
            if isinstance(item, (bytes, bytearray, memoryview)):
                return bytes(item)
            raise ItemSourceError(f"Item #{index} is {type(item).__name__}, not bytes: use encoding='text' or 'json'.")
        if self.encoding == "json":
            try:
                return json.dumps(item, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode(self.charset)
            except (TypeError, ValueError) as e:
                raise ItemSourceError(f"Item #{index} ({_preview(item)}) can't be encoded as JSON: {e}.") from None
            except UnicodeEncodeError as e:
                raise ItemSourceError(f"Item #{index} can't be encoded in {self.charset}: {e.reason}.") from None
        if isinstance(item, bool) or not isinstance(item, (str, int, float)):
            raise ItemSourceError(
                f"Item #{index} ({_preview(item)}) is {type(item).__name__}; encoding='text' takes strings "
                "and numbers: use encoding='json' for structured items or 'bytes' for raw bytes."
            )
        try:
            return str(item).encode(self.charset)
        except UnicodeEncodeError as e:
            raise ItemSourceError(
                f"Item #{index} ({_preview(item)}) can't be encoded in {self.charset}: {e.reason}. "
                "Use charset='utf-8'."
            ) from None


def _preview(item: Any) -> str:
    text = repr(item)
    return text if len(text) <= 60 else text[:57] + "..."


ItemSource = Iterable[Any] | Callable[[], Iterable[Any]]


def iter_items(items: ItemSource | None = None, items_file: str | os.PathLike[str] | None = None) -> Iterator[Any]:
    """Iterate items from exactly one source: an iterable, a callable returning one, or a file."""
    if (items is None) == (items_file is None):
        raise ConfigurationError("Give exactly one item source: items (list, XComArg, callable) or items_file.")
    if items_file is not None:
        return _iter_file(Path(items_file))
    if callable(items):
        produced = items()
        if isinstance(produced, (str, bytes)) or not isinstance(produced, Iterable):
            raise ItemSourceError(f"The items callable returned {type(produced).__name__}, not an iterable of items.")
        return iter(produced)
    if isinstance(items, (str, bytes, dict)) or not isinstance(items, Iterable):
        raise ItemSourceError(
            f"items is a {type(items).__name__}; give a list of items, a callable returning an iterable, "
            "or items_file for a file with one item per line."
        )
    return iter(items)


def _iter_file(path: Path) -> Iterator[str]:
    try:
        handle = path.open("r", encoding="utf-8", newline=None)
    except OSError as e:
        raise ItemSourceError(f"Item file {str(path)!r} can't be read: {e.strerror}. Check the path and permissions.") from None
    with handle:
        try:
            for line in handle:
                line = line.rstrip("\n")
                if line:
                    yield line
        except UnicodeDecodeError as e:
            raise ItemSourceError(f"Item file {str(path)!r} is not UTF-8 text ({e.reason}).") from None


class Spool:
    """Encoded message bodies in a temporary file: written once, then streamed for publishing."""

    def __init__(self, directory: str | None = None):
        self._file: IO[bytes] = tempfile.TemporaryFile(prefix="workqueue-spool-", dir=directory)
        self.count = 0
        self.total_bytes = 0

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, *exc: object) -> None:
        self._file.close()

    def append(self, body: bytes) -> None:
        self._file.write(_LENGTH.pack(len(body)))
        self._file.write(body)
        self.count += 1
        self.total_bytes += len(body)

    def bodies(self) -> Iterator[bytes]:
        self._file.flush()
        self._file.seek(0)
        read = self._file.read
        for _ in range(self.count):
            (size,) = _LENGTH.unpack(read(_LENGTH.size))
            yield read(size)


def spool_items(source: Iterator[Any], encoder: ItemEncoder, *, directory: str | None = None) -> Spool:
    """Encode every item into a new :class:`Spool`; raises before anything is sent if one can't be."""
    spool = Spool(directory)
    try:
        for index, item in enumerate(source):
            spool.append(encoder.encode(item, index))
    except ItemSourceError:
        spool.__exit__()
        raise
    except Exception as e:
        spool.__exit__()
        raise ItemSourceError(f"Reading items failed after {spool.count} items: {type(e).__name__}: {e}") from e
    return spool
