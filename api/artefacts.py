"""Content-addressed artefact storage owned by the API (trained models: Keras files, LiteRT flatbuffers).

Used by the artefact routes (api/routes.py). Training workloads upload with `PUT /artefacts`; events and
projection rows carry only the sha256 and size, never the bytes. Files live in one directory (a volume in
cluster mode) named by their sha256; an upload is streamed to a temporary file while hashed, checked
against the client's `X-Sha256` when given, and renamed into place, so a half-written file is never served.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from aiohttp import StreamReader

from tierflow.api.errors import ApiError

HEX = frozenset("0123456789abcdef")


class ArtefactStore:
    def __init__(self, directory: Path, max_bytes: int = 2 * 1024**3) -> None:
        self.directory = directory
        self.max_bytes = max_bytes

    def path(self, sha256: str) -> Path:
        if len(sha256) != 64 or not set(sha256) <= HEX:
            raise ApiError(404, "not_found", f"{sha256!r} is not a sha256 (64 lowercase hex digits)")
        return self.directory / sha256[:2] / sha256

    async def store(self, stream: StreamReader, *, expected: str | None) -> tuple[str, int]:
        self.directory.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        size = 0
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".upload-")
        try:
            with os.fdopen(fd, "wb") as out:
                async for chunk in stream.iter_chunked(1 << 20):
                    size += len(chunk)
                    if size > self.max_bytes:
                        raise ApiError(413, "too_large", f"artefact larger than {self.max_bytes} bytes")
                    digest.update(chunk)
                    out.write(chunk)
            if size == 0:
                raise ApiError(400, "bad_request", "the artefact body is empty")
            sha256 = digest.hexdigest()
            if expected is not None and expected != sha256:
                raise ApiError(422, "invalid", f"the body's sha256 is {sha256}, not the X-Sha256 {expected} sent "
                                               "with it (corrupted upload?)", "X-Sha256")
            final = self.path(sha256)
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, final)
            return sha256, size
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
