"""Who may call the server: one `--api-key`, or a keys file with one key a person.

A keys file is read again when its content changes (looked at once a second, on a request) and
on SIGHUP, so people are added and removed without a restart; their KV caches stay. A file that
cannot be read on reload leaves the keys as they were (an editor may be half-way through saving it).

Keys are kept only as sha256 digests: a request's token is hashed and looked up, so no key is
compared as text, logged, or kept in memory as written.

The file: one key a line, the whole line (spaces and `#` inside a key are part of it); a comment
starts with `#` at the start of a line or after a space, and a comment after a key says whom it is for.

    # the team
    sk-3f9c0e…          # alice
    correct horse battery staple   # bob, laptop

An empty key is never "no authentication": an empty --api-key, an empty or unset-looking
REFACT_GGUF_API_KEY(_FILE), or a file with no key in it is an error at start.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import time
from pathlib import Path
from typing import Mapping

from ..errors import InputError, RefactGGUFError

log = logging.getLogger("refact_gguf.server")
CHECK_EVERY_S = 1.0
KEY_ENV, KEY_FILE_ENV = "REFACT_GGUF_API_KEY", "REFACT_GGUF_API_KEY_FILE"
_COMMENT = re.compile(r"(?:^|\s)#")


def from_options(key: str | None, path: Path | None, environ: Mapping[str, str] = os.environ) -> ApiKeys | None:
    """The keys `serve` requires, from --api-key / --api-key-file (or their environment variables);
    None when neither is given. Empty is an error, never "open": a unit file's missing ${SECRET}
    expands to an empty variable, which the option parser would take as not given."""
    for name, value in ((KEY_ENV, key), (KEY_FILE_ENV, path)):
        if value is None and name in environ and not environ[name].strip():
            raise InputError(f"{name} is set but empty", "give it a key, or unset it to serve without keys")
    if key is not None and not key.strip():
        raise InputError("--api-key is empty", "give a key, or leave the option out to serve without keys")
    if key is not None and path is not None:
        raise InputError("--api-key and --api-key-file both given", "put the one key in the file, or use only --api-key")
    if key is None and path is None:
        return None
    return ApiKeys(key.strip() if key is not None else None, path)


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
            if not self._people:
                raise RefactGGUFError(f"the keys file {self.path} holds no key", "one key a line; see `refact-gguf serve --help`")

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
            self._seen = self._content_digest()  # tried once: read it again when it changes next
            log.warning("%s; the %d keys read before stay", e, len(self._people))
            return
        before, self._people, self._seen = len(self._people), people, seen
        log.warning("keys file %s read again: %d keys (%d before)%s", self.path, len(people), before,
                    "; nobody can call the server now" if not people else "")

    def _reload_if_changed(self) -> None:
        if self.path is None or time.monotonic() - self._checked < CHECK_EVERY_S:
            return
        self._checked = time.monotonic()
        if self._content_digest() != self._seen:
            self.reload()

    def _content_digest(self) -> bytes | None:
        """What the file holds, as a digest: an edit that keeps its size and time (`cp -p`) is a change too."""
        try:
            return hashlib.sha256(self.path.read_bytes()).digest()
        except OSError:
            return None

    def _read(self) -> tuple[dict[bytes, str], bytes | None]:
        try:
            data = self.path.read_bytes()
            text = data.decode("utf-8-sig")  # a BOM is not part of the first key
        except (OSError, UnicodeDecodeError) as e:
            raise RefactGGUFError(f"cannot read the keys file {self.path}: {getattr(e, 'strerror', None) or e}",
                             "one key a line, UTF-8; see `refact-gguf serve --help`") from None
        people: dict[bytes, str] = {}
        for number, line in enumerate(text.splitlines(), 1):
            parts = _COMMENT.split(line, 1)
            key, comment = parts[0].strip(), (parts[1].strip() if len(parts) > 1 else "")
            if key:
                people[_digest(key)] = comment or f"line {number}"
        return people, hashlib.sha256(data).digest()
