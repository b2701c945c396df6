"""Reading tar shards sample by sample, without ever raising on bad data.

Works on any WebDataset-layout tar: img2dataset's raw shards (``{key}.jpg`` + ``.txt`` +
``.json``) as well as our token shards. A sample is a key and its files by extension; nothing
is decoded here, and nothing is ever unpickled.

Keys follow WebDataset: the member path up to the first dot of its base name, so
``part/000.seg.png`` is key ``part/000`` with extension ``seg.png``. Consecutive members with
the same key form one sample. Extensions are lower-cased. Hidden and ``__`` entries (a path
part starting with ``.`` or ``__``), directories, links and names without an extension are
skipped; a leading ``./`` is dropped.

Bad shards are counted, never raised: one that cannot be opened counts ``unreadable_shard``;
one damaged part way (cut short, missing its end-of-archive block, a corrupt header) counts
``truncated_shard`` and yields every sample read before the damage. The sample being read when
the damage came is kept with the files that arrived whole, if they hold its caption and its image
(or a token shard's codes): the damage may have cut only an optional file (json), or nothing of
it at all (the next sample's header). Otherwise it is really incomplete: dropped, counted
``incomplete_sample``. A file repeated within one sample counts ``duplicate_member`` and is
dropped.
"""

from __future__ import annotations

import logging
import lzma
import tarfile
import zlib
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from webdataset.gopen import gopen

from .errors import Rejected
from .shards import is_remote

logger = logging.getLogger(__name__)

# Image extensions in order of preference when a sample has several. Besides img2dataset's
# jpg/png/webp, the formats Pillow decodes that a folder of user images may hold.
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")

# What tarfile, its decompressors and webdataset's gopen raise on bad or unreachable data.
_BAD_DATA = (tarfile.TarError, OSError, EOFError, ValueError, OverflowError, MemoryError, zlib.error,
             lzma.LZMAError)
MAX_MEMBER_BYTES = 1 << 30  # a larger member is no image or caption: refused before it is read
# What a sample is about, besides its caption: an image, or a token shard's code grid.
PAYLOAD_EXTENSIONS = (*IMAGE_EXTENSIONS, "codes")


@dataclass
class RawSample:
    key: str
    shard: str
    files: dict[str, bytes]  # extension ("jpg", "txt", "json", "codes", ...) -> raw bytes


class RejectCounts:
    """Skipped samples and shards: a count per reason, and the latest ``keep_records``
    (key, shard, reason) records for a rejects log."""

    def __init__(self, keep_records: int = 1000):
        self.counts: Counter[str] = Counter()
        self.records: deque[tuple[str, str, str]] = deque(maxlen=keep_records)

    def add(self, reason: str, key: str, shard: str) -> None:
        self.counts[reason] += 1
        self.records.append((key, shard, reason))

    def merge(self, other: RejectCounts | dict) -> None:
        """Adds ``other``'s counts and records; ``other`` may be the ``as_dict()`` of a
        RejectCounts from another process (DataLoader workers hand back plain dicts)."""
        data = other.as_dict() if isinstance(other, RejectCounts) else other
        self.counts.update(data["counts"])
        self.records.extend(tuple(r) for r in data["records"])

    def as_dict(self) -> dict:
        return {"counts": dict(self.counts), "records": list(self.records)}

    def clear(self) -> None:
        self.counts.clear()
        self.records.clear()


def iter_shard(path: str, rejects: RejectCounts) -> Iterator[RawSample]:
    """The samples of one shard, in tar order. Never raises on bad data: see the module doc."""
    try:
        stream = gopen(path, "rb") if is_remote(path) else open(path, "rb")
    except _BAD_DATA as exc:
        _shard_failed(rejects, "unreadable_shard", path, exc)
        return
    try:
        try:
            # Local files are read with seeks ("r:*"), which skips tarfile's stream buffering;
            # remote ones can only be streamed ("r|*").
            mode = "r|*" if is_remote(path) else "r:*"
            tar = tarfile.open(fileobj=stream, mode=mode, tarinfo=_CutAwareTarInfo)
        except _BAD_DATA as exc:
            _shard_failed(rejects, "unreadable_shard", path, exc)
            return
        yield from _samples(tar, path, rejects)
    finally:
        _close_quietly(stream)


def image_of(sample: RawSample) -> tuple[str, bytes]:
    """(image extension, image bytes) of a raw sample, the preferred format when it has several."""
    ext = next((e for e in IMAGE_EXTENSIONS if e in sample.files), None)
    if ext is None:
        raise Rejected("missing_image", f"no {'/'.join(IMAGE_EXTENSIONS)} file, found {sorted(sample.files)}")
    return ext, sample.files[ext]


def image_and_captions(sample: RawSample) -> tuple[str, bytes, list[str]]:
    """(image extension, image bytes, captions) of a raw image-text sample."""
    return *image_of(sample), captions_of(sample)


def count_samples(path: str) -> int:
    """Samples with an image in a local shard, from its headers alone (data is seeked over); a
    damaged shard counts what precedes the damage."""
    keys = set()
    try:
        with tarfile.open(path, "r:*", tarinfo=_CutAwareTarInfo) as tar:
            for info in _regular_headers(tar):
                split = _key_and_extension(info.name)
                if split is not None and split[1] in IMAGE_EXTENSIONS:
                    keys.add(split[0])
    except _BAD_DATA:
        pass
    return len(keys)


def captions_of(sample: RawSample) -> list[str]:
    """A sample's captions: the stripped non-empty lines of its txt, one caption per line (a
    COCO-style txt holds several); Rejected when missing, not UTF-8 or without any."""
    if "txt" not in sample.files:
        raise Rejected("missing_caption", "no txt file")
    try:
        # utf-8-sig: captions saved by Windows editors start with a byte order mark
        text = sample.files["txt"].decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise Rejected("caption_not_utf8", str(exc)) from None
    captions = [line.strip() for line in text.split("\n") if line.strip()]  # strip() takes a CRLF's \r
    if not captions:
        raise Rejected("empty_caption")
    return captions


def iter_captions(shards: Iterable[str], rejects: RejectCounts | None = None) -> Iterator[str]:
    """Every good caption of the shards, all of each sample's, in order (for tokenizer training)."""
    rejects = RejectCounts() if rejects is None else rejects
    for shard in shards:
        for sample in iter_shard(shard, rejects):
            try:
                yield from captions_of(sample)
            except Rejected as rejected:
                rejects.add(rejected.reason, sample.key, shard)


def _samples(tar: tarfile.TarFile, path: str, rejects: RejectCounts) -> Iterator[RawSample]:
    headers = _regular_headers(tar)
    key, files = None, {}
    while True:
        try:
            info = next(headers, None)
        except _BAD_DATA as exc:
            yield from _damaged(rejects, path, exc, key, files)
            return
        if info is None:
            break
        split = _key_and_extension(info.name)
        if split is None:
            continue
        if split[0] != key:  # the previous sample is whole: yield it before reading on
            if files:
                yield RawSample(key, path, files)
            key, files = split[0], {}
        if split[1] in files:
            rejects.add("duplicate_member", key, path)
            continue
        if info.size > MAX_MEMBER_BYTES:
            rejects.add("member_too_large", key, path)
            continue
        try:
            # a member cut short raises (tarfile checks the length read), so files hold only whole ones
            files[split[1]] = tar.extractfile(info).read()
        except _BAD_DATA as exc:
            yield from _damaged(rejects, path, exc, key, files)
            return
    if files:
        yield RawSample(key, path, files)


def _regular_headers(tar: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    """The headers of regular files, in tar order; raises on damaged data."""
    for info in tar:
        tar.members = []  # a streaming TarFile keeps every header it has read: memory would grow
        if info.isreg():
            yield info


def _damaged(rejects: RejectCounts, path: str, exc: Exception, key: str | None,
             files: dict[str, bytes]) -> Iterator[RawSample]:
    """The end of a damaged shard: the sample being read, ``key``'s whole ``files``, if they
    hold what a sample needs (see the module doc)."""
    _shard_failed(rejects, "truncated_shard", path, exc)
    if "txt" in files and any(ext in files for ext in PAYLOAD_EXTENSIONS):
        yield RawSample(key, path, files)
    elif key is not None:
        rejects.add("incomplete_sample", key, path)


def _key_and_extension(name: str) -> tuple[str, str] | None:
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if not parts or any(p.startswith((".", "__")) for p in parts):
        return None
    base, dot, ext = parts[-1].partition(".")
    if not dot or not ext:
        return None
    return "/".join(parts[:-1] + [base]), ext.lower()


class _CutAwareTarInfo(tarfile.TarInfo):
    """A streaming TarFile ends silently when a header after the first is missing, cut or
    corrupt: a shard cut on a member boundary, or never closed, would pass for a whole one.
    Raising ReadError instead makes it count as truncated. (A zero block, the proper end of an
    archive, still ends it quietly.)"""

    @classmethod
    def frombuf(cls, buf, encoding, errors):
        """Fast path for the headers that make up almost every shard: plain regular files with
        a valid checksum. Parses only what reading needs (tarfile's parser decodes all 17 fields
        and sums the block twice, which made it the stream's bottleneck); any other header goes
        to tarfile's own parser."""
        if len(buf) != tarfile.BLOCKSIZE or buf[156:157] not in (tarfile.REGTYPE, tarfile.AREGTYPE):
            return super().frombuf(buf, encoding, errors)
        try:
            chksum = int(buf[148:156].rstrip(b"\0 ") or b"-1", 8)
        except ValueError:
            return super().frombuf(buf, encoding, errors)
        if chksum != sum(buf) - sum(buf[148:156]) + 256:  # the checksum field counts as 8 spaces
            return super().frombuf(buf, encoding, errors)  # it raises the proper header error
        info = cls(tarfile.nts(buf[0:100], encoding, errors))
        info.size, info.type, info.chksum = tarfile.nti(buf[124:136]), tarfile.REGTYPE, chksum
        if buf[257:263] == tarfile.POSIX_MAGIC and buf[345] != 0:  # ustar: name = prefix/name
            info.name = tarfile.nts(buf[345:500], encoding, errors) + "/" + info.name
        if info.name.endswith("/"):
            return super().frombuf(buf, encoding, errors)  # old-style directory: tarfile knows
        return info

    @classmethod
    def fromtarfile(cls, tar):
        try:
            return super().fromtarfile(tar)
        except (tarfile.EmptyHeaderError, tarfile.TruncatedHeaderError, tarfile.InvalidHeaderError) as exc:
            if tar.offset == 0:
                raise  # tarfile reports a bad first header itself
            raise tarfile.ReadError(f"{exc} at byte {tar.offset}") from None


def _shard_failed(rejects: RejectCounts, reason: str, path: str, exc: Exception, key: str = "") -> None:
    logger.warning("%s: %s (%s: %s)", reason, path, type(exc).__name__, exc)
    rejects.add(reason, key, path)


def _close_quietly(stream) -> None:
    # A pipe that failed raises on close; reading has already counted what it cost.
    try:
        stream.close()
    except _BAD_DATA:
        pass
