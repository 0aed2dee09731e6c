"""Who may call the server: one `--api-key`, or a keys file with one key a person.

A keys file is read again when it changes (looked at once a second, on a request) and on SIGHUP,
so people are added and removed without a restart; their KV caches stay. A file that cannot be
read on reload leaves the keys as they were (an editor may be half-way through saving it).

Keys are kept only as sha256 digests: a request's token is hashed and looked up, so no key is
compared as text, logged, or kept in memory as written.

The file: one key a line, optionally followed by whom it belongs to; `#` starts a comment.

    sk-3f9c0e…   alice
    sk-77ab21…   bob      # laptop
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from pathlib import Path

from ..errors import RefactGGUFError

log = logging.getLogger("refact_gguf.server")
CHECK_EVERY_S = 1.0


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


class ApiKeys:
    """The keys a request may carry as `Authorization: Bearer KEY`."""

    def __init__(self, key: str | None = None, path: Path | None = None):
        self.path = Path(path) if path is not None else None
        self._people: dict[bytes, str] = {_digest(key): "the --api-key"} if key is not None else {}
        self._seen: tuple | None = None
        self._checked = 0.0
        if self.path is not None:
            self._people, self._seen = self._read()  # at start, a bad file is an error

    def person(self, authorization: str) -> str | None:
        """Whose key the header carries, or None if it carries none of them."""
        self._reload_if_changed()
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        return self._people.get(_digest(token.strip()))

    def reload(self) -> None:
        """Read the file again (SIGHUP); on failure the keys stay as they were."""
        if self.path is None:
            return
        try:
            people, seen = self._read()
        except RefactGGUFError as e:
            self._seen = self._stat()  # tried once: read it again when it changes next
            log.warning("%s; the %d keys read before stay", e, len(self._people))
            return
        before, self._people, self._seen = len(self._people), people, seen
        log.warning("keys file %s read again: %d keys (%d before)", self.path, len(people), before)

    def _reload_if_changed(self) -> None:
        if self.path is None or time.monotonic() - self._checked < CHECK_EVERY_S:
            return
        self._checked = time.monotonic()
        if self._stat() != self._seen:
            self.reload()

    def _stat(self) -> tuple | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_ino, st.st_mtime_ns, st.st_size

    def _read(self) -> tuple[dict[bytes, str], tuple | None]:
        seen = self._stat()
        try:
            text = self.path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise RefactGGUFError(f"cannot read the keys file {self.path}: {getattr(e, 'strerror', None) or e}",
                             "one key a line, UTF-8; see `refact-gguf serve --help`") from None
        people: dict[bytes, str] = {}
        for number, line in enumerate(text.splitlines(), 1):
            fields = line.split("#", 1)[0].split()
            if fields:
                people[_digest(fields[0])] = " ".join(fields[1:]) or f"line {number}"
        return people, seen
