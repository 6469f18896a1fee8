"""Content-addressed artefact storage owned by the API (trained models: Keras files, LiteRT flatbuffers).

Used by the artefact routes (api/routes.py) and the artefact collection (api/collector.py). Training
workloads upload with `PUT /artefacts`; events and projection rows carry only the sha256 and size, never the
bytes. Files live in one directory (a volume in cluster mode) named by their sha256; an upload is streamed to
a temporary file (`.upload-*`) while hashed, checked against the client's `X-Sha256` when given, and renamed
into place, so a half-written file is never served. The rename gives the blob a fresh modification time,
also when the same bytes are uploaded again: that time is what the collection's grace period counts from.

Collecting an unreferenced blob (`collect`) renames it aside first and looks at the renamed file: an upload
that landed between the listing and the rename left a fresh file there, which is put back. Blobs are
content-addressed, so whichever copy ends at the path holds the same bytes. No lock is needed, across
processes neither.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

from aiohttp import StreamReader

from tierflow.api.errors import ApiError

log = logging.getLogger("tierflow.api.artefacts")

HEX = frozenset("0123456789abcdef")
#: prefixes of the store's own working files: uploads in progress, and blobs being collected
UPLOAD_PREFIX = ".upload-"
COLLECT_PREFIX = ".collect-"


def is_sha256(name: str) -> bool:
    return len(name) == 64 and set(name) <= HEX


@dataclass(frozen=True)
class StoredBlob:
    sha256: str
    path: Path
    size: int
    mtime: float


@dataclass
class Collection:
    """What one collection did (or why it did nothing)."""

    removed: int = 0
    freed_bytes: int = 0
    #: unreferenced blobs still inside their grace period
    waiting: int = 0
    #: temporary files of uploads that never finished (an API that stopped mid-upload), removed
    abandoned_uploads: int = 0
    #: why nothing was collected (None: it ran)
    skipped: str | None = None


def unreferenced(blobs: list[StoredBlob], referenced: set[str], cutoff: float) -> list[StoredBlob]:
    """The blobs to collect: no result names them and they were last written before `cutoff`."""
    return [b for b in blobs if b.sha256 not in referenced and b.mtime < cutoff]


class ArtefactStore:
    def __init__(self, directory: Path, max_bytes: int = 2 * 1024**3) -> None:
        self.directory = directory
        self.max_bytes = max_bytes

    def path(self, sha256: str) -> Path:
        if not is_sha256(sha256):
            raise ApiError(404, "not_found", f"{sha256!r} is not a sha256 (64 lowercase hex digits)")
        return self.directory / sha256[:2] / sha256

    async def store(self, stream: StreamReader, *, expected: str | None) -> tuple[str, int]:
        self.directory.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        size = 0
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=UPLOAD_PREFIX)
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

    # --- collection ----------------------------------------------------------------------------------------

    def blobs(self) -> list[StoredBlob]:
        """Every stored artefact (`<directory>/<first two hex digits>/<sha256>`)."""
        found: list[StoredBlob] = []
        if not self.directory.is_dir():
            return found
        for shard in self.directory.iterdir():
            if len(shard.name) != 2 or not shard.is_dir():
                continue
            for path in shard.iterdir():
                if not is_sha256(path.name) or path.name[:2] != shard.name:
                    continue
                try:
                    st = path.stat()
                except FileNotFoundError:
                    continue  # collected by another pass meanwhile
                found.append(StoredBlob(path.name, path, st.st_size, st.st_mtime))
        return found

    def collect(self, referenced: set[str], cutoff: float) -> Collection:
        """Remove the blobs no result names that were last written before `cutoff` (a time.time() value), and
        the working files left behind before it. Blocking file I/O: run it in a thread."""
        report = Collection()
        self._sweep_working_files(cutoff, report)
        blobs = self.blobs()
        doomed = unreferenced(blobs, referenced, cutoff)
        report.waiting = sum(1 for b in blobs if b.sha256 not in referenced) - len(doomed)
        for blob in doomed:
            if self.remove_if_stale(blob, cutoff):
                report.removed += 1
                report.freed_bytes += blob.size
        return report

    def remove_if_stale(self, blob: StoredBlob, cutoff: float) -> bool:
        """Remove `blob` unless it was written again at or after `cutoff` (an upload of the same bytes)."""
        aside = self.directory / f"{COLLECT_PREFIX}{blob.sha256}-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(blob.path, aside)
        except FileNotFoundError:
            return False
        try:
            if aside.stat().st_mtime >= cutoff:  # uploaded again after the listing: put the fresh copy back
                os.replace(aside, blob.path)
                return False
            aside.unlink()
        except FileNotFoundError:
            return False  # another API's sweep finished this one (several processes on one volume)
        log.info("collected artefact %s (%d bytes): no result names it", blob.sha256, blob.size)
        return True

    def _sweep_working_files(self, cutoff: float, report: Collection) -> None:
        if not self.directory.is_dir():
            return
        for path in self.directory.iterdir():
            name = path.name
            try:
                mtime = path.stat().st_mtime
            except FileNotFoundError:
                continue
            if name.startswith(UPLOAD_PREFIX) and mtime < cutoff:
                # An upload writes its temporary file continuously; one untouched for the whole grace period
                # belongs to an API that stopped mid-upload.
                path.unlink(missing_ok=True)
                report.abandoned_uploads += 1
            elif name.startswith(COLLECT_PREFIX):
                # A collection that stopped between its rename and its decision: finish it.
                sha256 = name[len(COLLECT_PREFIX):].split("-", 1)[0]
                if mtime >= cutoff and is_sha256(sha256):
                    target = self.path(sha256)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(path, target)
                else:
                    path.unlink(missing_ok=True)
