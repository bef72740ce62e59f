"""How tilefuse writes and opens zarr arrays: checksummed, complete, consolidated.

Contract (DESIGN.md, "Data safety": reads verify):

- **Writes.** Every array tilefuse writes ends its codec chain with zarr v3's
  ``crc32c`` codec (:func:`compressors`), inside shards too (the shard index
  carries its own crc32c by zarr's default), and every chunk is written even
  when it holds only the fill value (:data:`WRITE_EMPTY_CHUNKS`). A store written so
  records ``tilefuse_storage = 1`` (:data:`FORMAT_ATTR`) in its root attrs:
  from then on an absent chunk means a damaged store, never "fill value".
  Prediction stores write their ``labels``/``probs`` block by block: there a
  chunk is promised only once its block is marked done (the caller passes the
  written keys, ``written=``).
- **Reads.** :func:`open_group` and :func:`open_dataset` read through
  :class:`VerifiedStore`, a wrapper of zarr's LocalStore that checks every
  chunk (or shard, or chunk inside a shard) *before* zarr decodes it: an absent
  key that the store promises, a crc32c mismatch, a truncated shard or chunk
  raise :class:`~tilefuse.errors.InputError` naming the store, the array, the
  chunk index and its pixel region, e.g. ``scene.zarr: shard (0, 1, 1) of
  'optical' (rows 2048:4096, cols 2048:4096) is missing: the store is corrupt,
  re-ingest it``. So no codec ever sees damaged bytes, and the error keeps its
  type through dask (threads, distributed workers) and DataLoader workers.
  :func:`verify_store` and :func:`key_problem` run the same checks over the
  stored bytes directly (``tilefuse info``, ``predict --resume``'s repair).
  Stores written before this format (no marker) still open; their chunks are
  checked wherever their arrays carry crc32c, and absent chunks read as fill.
- **Unreadable is not damaged.** A chunk or metadata file (root or array
  ``zarr.json``, :data:`DIGESTS`, a shard index) that the filesystem refuses
  to read (no permission on it or on a folder on its way, an I/O error) is one
  InputError saying it cannot be read, with the OS's reason and the fix
  (:func:`cannot_read`: the permissions of the file, or of the folder that
  cannot be searched), never "damaged" nor a PermissionError escaping (the
  CLI took that for a failed write).
- **Where each chunk belongs.** A chunk's crc32c proves it intact, not where
  it belongs: a chunk (or shard) copied over another place of its array,
  swapped with another, or copied in from another store of the same shape
  passes its checksum. So a store, once complete, records the crc32c each of
  its chunks ends with, by place (:data:`DIGESTS`, :func:`record_digests`: a
  scene before it is renamed into place, a prediction when its last block is
  marked done), and reads compare every chunk with the record. A partial
  prediction is not yet recorded whole, but each block's write records its own
  chunks (:data:`tilefuse.prediction.BLOCK_DIGESTS`), which a resume checks;
  stores of earlier releases have no record.
- **Consolidated metadata.** :func:`consolidate` writes zarr v3 consolidated
  metadata, so ``xarray.open_zarr(path, decode_coords="all")`` opens a store
  quietly with one metadata read; writers call it whenever metadata changes.
"""

from __future__ import annotations

import asyncio
import errno
import os
import stat
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Collection, Iterator, Mapping, Union

import numpy as np
import zarr
from zarr.abc.store import RangeByteRequest, SuffixByteRequest
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, ShardingCodec
from zarr.storage import LocalStore, WrapperStore

from tilefuse.errors import InputError

FORMAT_ATTR = "tilefuse_storage"
"""Root attr of stores whose every chunk is checksummed and written (value: :data:`FORMAT`)."""
FORMAT = 1
WRITE_EMPTY_CHUNKS = True
"""Every tilefuse write stores chunks equal to the fill value too (``to_zarr(write_empty_chunks=...)``, :func:`writing`)."""
DIGESTS = "chunk_digests.npz"
"""A complete store's record of where each chunk belongs, at its top: for every array it wrote, the crc32c each
(inner) chunk of each key ends with, ``(*key grid, chunks per key)`` uint32 (0: an empty place in a shard), one
member per array in a NumPy ``.npz`` (a zip: each member carries its own CRC-32)."""
DIGESTS_ATTR = "tilefuse_digests"
"""Root attr of a store that holds :data:`DIGESTS` (its value: the file name)."""
_CRC = 4
_INDEX_ENTRY = 16
_EMPTY = 2**64 - 1


def writing():
    """Context in which zarr arrays opened for writing write fill-valued chunks too (block writes)."""
    return zarr.config.set({"array.write_empty_chunks": WRITE_EMPTY_CHUNKS})


def compressors(level: int = 5) -> list:
    """Blosc zstd at ``level`` with byte shuffle, then crc32c over the compressed bytes: every array's bytes-to-bytes codecs."""
    return [BloscCodec(cname="zstd", clevel=level, shuffle="shuffle"), Crc32cCodec()]


# ------------------------------------------------------------------ array layout


@dataclass(frozen=True)
class ArrayCheck:
    """What a reader may expect of one array's stored keys (one key = one shard, or one chunk if unsharded)."""

    name: str
    shape: tuple[int, ...]
    unit: tuple[int, ...]
    """Shape of the region one key holds (the shard, or the chunk)."""
    checksum: bool
    """Its (inner) chunks end with crc32c."""
    inner: int = 0
    """Chunks per shard (0: unsharded)."""
    index_at_end: bool = True
    index_checksum: bool = False
    required: bool | frozenset = False
    """True: every key must exist; a frozenset: the keys whose last two indices are in it; False: none."""
    nbytes: int = 0
    """Bytes one (inner) chunk decodes to by the array's metadata, when its codecs are bytes, Blosc and crc32c
    (Blosc's header records the size it was written with); 0: not checked."""

    def region(self, index: tuple[int, ...]) -> str:
        spans = [f"{i * u}:{min((i + 1) * u, n)}" for i, u, n in zip(index, self.unit, self.shape)]
        names = ["rows", "cols"] if len(spans) >= 2 else []
        return ", ".join(f"{label} {span}" for label, span in zip(names, spans[-2:]))

    def is_required(self, index: tuple[int, ...]) -> bool:
        if isinstance(self.required, frozenset):
            return tuple(index[-2:]) in self.required
        return bool(self.required)

    def keys(self) -> Iterator[tuple[int, ...]]:
        return np.ndindex(*(-(-n // u) for n, u in zip(self.shape, self.unit)))


def _decoded_size(chain, chunk_shape, dtype) -> int:
    """Bytes a chunk of ``chunk_shape`` decodes to through ``chain`` when that is bytes, Blosc, crc32c (else 0)."""
    if [type(c) for c in chain] != [BytesCodec, BloscCodec, Crc32cCodec] or not isinstance(dtype, np.dtype) or dtype.hasobject:
        return 0
    return int(np.prod(chunk_shape, dtype=np.int64)) * dtype.itemsize


def _check_of(name: str, array: zarr.Array, required: bool | frozenset) -> ArrayCheck:
    codecs = array.metadata.codecs
    shape = tuple(int(n) for n in array.shape)
    if codecs and isinstance(codecs[0], ShardingCodec):
        sharding = codecs[0]
        unit = tuple(int(n) for n in array.shards)
        inner = int(np.prod([u // c for u, c in zip(unit, sharding.chunk_shape)]))
        return ArrayCheck(
            name,
            shape,
            unit,
            checksum=isinstance(sharding.codecs[-1], Crc32cCodec),
            inner=inner,
            index_at_end=sharding.index_location.value == "end",
            index_checksum=any(isinstance(c, Crc32cCodec) for c in sharding.index_codecs),
            required=required,
            nbytes=_decoded_size(sharding.codecs, sharding.chunk_shape, array.dtype),
        )
    chunks = tuple(int(n) for n in array.chunks)
    checksum = bool(codecs) and isinstance(codecs[-1], Crc32cCodec)
    return ArrayCheck(name, shape, chunks, checksum=checksum, required=required, nbytes=_decoded_size(codecs, chunks, array.dtype))


def crc32c(data: np.ndarray) -> int:
    """CRC-32C of ``data`` (uint8), as zarr's crc32c codec computes it."""
    try:  # what zarr's crc32c codec uses (zarr >= 3.1); older zarr used the crc32c package
        from google_crc32c import value
    except ImportError:
        from crc32c import crc32c as value
    return value(data)


def _crc_ok(data: np.ndarray) -> bool:
    return len(data) >= _CRC and crc32c(data[:-_CRC]) == int.from_bytes(data[-_CRC:].tobytes(), "little")


def _chunk_problem(data: np.ndarray, check: ArrayCheck) -> str | None:
    """Why one stored chunk (its Blosc frame and crc32c) is damaged, or None: a checksum mismatch, or a frame
    whose recorded size is not what the array's metadata decodes a chunk to (metadata edited: dtype, chunk shape)."""
    if check.checksum and not _crc_ok(data):
        return "checksum mismatch"
    if check.nbytes and len(data) >= 16 + _CRC:
        size = int.from_bytes(data[4:8].tobytes(), "little")
        if size != check.nbytes:
            return f"it holds {size} bytes decoded, its array's metadata (dtype, chunk shape) says {check.nbytes}"
    return None


def verify_bytes(data, check: ArrayCheck, byte_range=None) -> str | None:
    """Why the bytes read from one key of ``check``'s array are damaged, or None if they pass.

    ``byte_range`` is what was asked of the key: nothing (the whole key), a
    shard index (suffix or prefix) or one chunk inside a shard (a range).
    """
    data = np.asarray(data, dtype=np.uint8).reshape(-1)
    if not check.inner:
        return _chunk_problem(data, check)
    index_size = check.inner * _INDEX_ENTRY + (_CRC if check.index_checksum else 0)
    if isinstance(byte_range, RangeByteRequest):
        if len(data) != byte_range.end - byte_range.start:
            return f"truncated ({len(data)} of {byte_range.end - byte_range.start} bytes)"
        if byte_range.start == 0 and byte_range.end == index_size and not check.index_at_end:
            return "shard index checksum mismatch" if check.index_checksum and not _crc_ok(data) else _index_problem(data, check)
        return _chunk_problem(data, check)
    if isinstance(byte_range, SuffixByteRequest):
        if len(data) != byte_range.suffix:
            return "truncated"
        if check.index_checksum and not _crc_ok(data):
            return "shard index checksum mismatch: truncated or overwritten"
        return _index_problem(data, check)
    if byte_range is not None:
        return None  # offset requests: zarr does not make them for tilefuse's layouts
    if len(data) < index_size:
        return "truncated"
    index = data[-index_size:] if check.index_at_end else data[:index_size]
    if check.index_checksum and not _crc_ok(index):
        return "shard index checksum mismatch: truncated or overwritten"
    problem = _index_problem(index, check)
    if problem:
        return problem
    entries = np.frombuffer(index[: check.inner * _INDEX_ENTRY], dtype="<u8").reshape(-1, 2)
    for offset, length in entries:
        if offset == _EMPTY:
            continue
        if offset + length > len(data):
            return "truncated"
        problem = _chunk_problem(data[int(offset) : int(offset + length)], check)
        if problem:
            return problem
    return None


def _index_problem(index: np.ndarray, check: ArrayCheck) -> str | None:
    """Why a shard's index (its checksum intact) cannot be the one zarr wrote: two places pointing at one chunk
    (zarr writes each chunk once), the edit that made one place read another's chunk."""
    offsets = np.frombuffer(np.asarray(index, np.uint8)[: check.inner * _INDEX_ENTRY].tobytes(), dtype="<u8")[::2]
    held = offsets[offsets != _EMPTY]
    return None if np.unique(held).size == held.size else "its shard index points two places at one chunk"


def _tail(data) -> int:
    return int.from_bytes(bytes(data[-_CRC:]), "little")


def key_digests(read: Callable[[int, int], bytes], size: int, check: ArrayCheck) -> np.ndarray:
    """The crc32c each (inner) chunk of one key ends with, in index order (0 where a shard holds none):
    :data:`DIGESTS`'s entry for the key. ``read(offset, count)`` reads the key's ``size`` stored bytes, so a
    shard costs its index and four bytes a chunk, not a read of the whole shard."""
    out = np.zeros(max(check.inner, 1), np.uint32)
    if not check.inner:
        out[0] = _tail(read(size - _CRC, _CRC))
        return out
    index_size = check.inner * _INDEX_ENTRY + (_CRC if check.index_checksum else 0)
    index = read(size - index_size if check.index_at_end else 0, check.inner * _INDEX_ENTRY)
    for i, (offset, length) in enumerate(np.frombuffer(index, dtype="<u8").reshape(-1, 2)):
        if offset != _EMPTY:
            out[i] = _tail(read(int(offset + length) - _CRC, _CRC))
    return out


def _index_request(check: ArrayCheck):
    """The byte request of a shard's index."""
    size = check.inner * _INDEX_ENTRY + (_CRC if check.index_checksum else 0)
    return SuffixByteRequest(size) if check.index_at_end else RangeByteRequest(0, size)


def _is_index(check: ArrayCheck, byte_range) -> bool:
    return bool(check.inner) and byte_range is not None and byte_range == _index_request(check)


def _index_by_range(data: np.ndarray, check: ArrayCheck, byte_range) -> bool:
    """A shard's index read as a plain byte range (zarr asks for it by suffix; another version may not): a range
    of the index's size, its checksum intact, starting where the chunks it lists end (zarr writes it there)."""
    size = check.inner * _INDEX_ENTRY + (_CRC if check.index_checksum else 0)
    if not (check.inner and check.index_at_end and isinstance(byte_range, RangeByteRequest) and len(data) == size):
        return False
    if not (check.index_checksum and _crc_ok(data)):
        return False
    entries = np.frombuffer(data[: check.inner * _INDEX_ENTRY].tobytes(), dtype="<u8").reshape(-1, 2)
    held = entries[entries[:, 0] != _EMPTY]
    return byte_range.start == (int((held[:, 0] + held[:, 1]).max()) if held.size else 0)  # zarr writes it after the chunks


def chunk_places(index: np.ndarray, check: ArrayCheck) -> dict[int, int]:
    """Offset -> place (in index order) of every chunk a shard's ``index`` bytes point at."""
    entries = np.frombuffer(np.asarray(index, np.uint8)[: check.inner * _INDEX_ENTRY].tobytes(), dtype="<u8").reshape(-1, 2)
    return {int(offset): place for place, (offset, _) in enumerate(entries) if offset != _EMPTY}


def misplaced(data, check: ArrayCheck, recorded: np.ndarray, byte_range=None) -> str | None:
    """Why intact bytes (by :func:`verify_bytes`) read from a key are not those :data:`DIGESTS` records there, or
    None. ``recorded``: the key's entry, or, for one chunk read from inside a shard, the entry of its place."""
    data = np.asarray(data, dtype=np.uint8).reshape(-1)
    if byte_range is None:
        found = key_digests(lambda offset, count: data[offset : offset + count], len(data), check)
    else:
        found = np.array([_tail(data)], np.uint32)
    return None if np.array_equal(found, recorded) else MISPLACED


MISPLACED = "not the one the store recorded there (copied from another place or store, its own checksum intact)"


def chunk_key(name: str, index: tuple[int, ...]) -> str:
    """The store key of chunk (or shard) ``index`` of array ``name`` (zarr v3 default key encoding)."""
    return "/".join([name, "c", *(str(i) for i in index)])


def _parse_key(key: str) -> tuple[str, tuple[int, ...]] | None:
    parts = key.split("/")
    for k in range(len(parts) - 1, 0, -1):
        if parts[k] == "c" and all(p.isdigit() for p in parts[k + 1 :]):
            return "/".join(parts[:k]), tuple(int(p) for p in parts[k + 1 :])
    return None


# ------------------------------------------------------------------------ reading

_ABSENT = frozenset({errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.ELOOP})
"""Errnos that say a store's file is not there as a file (gone, a file where a folder was, a folder in place of
the file, a symlink loop): the store's own layout, not the filesystem refusing a read."""
UNREADABLE_DISK = "check the disk or filesystem it is on, then run the command again"
"""The fix for a store's metadata file that a read fails on with another error than a permission (EIO)."""


def _refused(error: OSError) -> bool:
    """Whether ``error`` is the filesystem refusing to read a file that is there (no permission, on the file or on
    a folder on its way; an I/O error), not the file being absent or of the wrong kind."""
    return error.errno is not None and error.errno not in _ABSENT


def _present(file: Path) -> bool:
    """Whether a key's file is there, as a file. An error that says nothing of absence (a folder on its way that
    cannot be searched, an I/O error) is raised, to be reported as unreadable, never as a missing chunk
    (``Path.is_file`` raises it up to Python 3.12 and reads it as False from 3.13 on)."""
    try:
        return stat.S_ISREG(os.stat(file).st_mode)
    except OSError as error:
        if _refused(error):
            raise
        return False


def _refused_at(file: Path) -> Path:
    """Where a permission refusal to read ``file`` comes from: the first folder on its way that cannot be searched
    (a stat of its entry is refused), else ``file`` itself (it cannot be read)."""
    file = Path(os.path.abspath(file))
    for entry in [*reversed(file.parents), file][1:]:
        try:
            os.stat(entry)
        except PermissionError:
            return entry.parent
        except OSError:
            break
    return file


def cannot_read(where: str, what: str, root: str | os.PathLike, relative: str, error: OSError, other: str = UNREADABLE_DISK) -> InputError:
    """The one line for a file of the store at ``root`` (named ``where``) that the filesystem refuses to read:
    ``what`` (naming the file, ``relative`` to the store's folder) cannot be read, the OS's reason, and the fix. A
    permission refusal names the file or the folder on its way that refuses it: the store is intact, so never
    "damaged" (rewriting it would destroy a good store); ``other`` is the fix for another error (EIO)."""
    reason = error.strerror or str(error) or type(error).__name__
    if error.errno not in (errno.EACCES, errno.EPERM):
        return InputError(f"{where}: {what} cannot be read: {reason}; {other}")
    top = Path(os.path.abspath(root))
    file = top / relative
    culprit = _refused_at(file)
    if culprit == file:
        fix = "fix its permissions (chmod, or ask its owner)"
    else:
        try:
            shown = Path(where) / culprit.relative_to(top)
        except ValueError:  # a folder above the store
            shown = culprit
        fix = f"fix the permissions of the folder {shown}, which cannot be searched (chmod, or ask its owner)"
    return InputError(f"{where}: {what} cannot be read: {reason}; {fix}")


def _metadata_what(key: str) -> str:
    """How messages name the store's metadata file ``key``."""
    if key == "zarr.json":
        return "its metadata file zarr.json"
    if key == DIGESTS:
        return f"its record of where each chunk belongs ({DIGESTS})"
    if key.endswith("/zarr.json"):
        return f"the metadata of array {key[: -len('/zarr.json')]!r} ({key})"
    return key


def _unreadable_metadata(path: Path, error: OSError) -> InputError:
    """:func:`cannot_read` for a metadata file of the store at ``path`` that zarr failed to read (its path in
    ``error.filename``)."""
    key = "zarr.json"
    if error.filename is not None:
        for top in (Path(path), Path(os.path.abspath(path))):
            try:
                key = Path(os.fsdecode(error.filename)).relative_to(top).as_posix()
                break
            except ValueError:
                continue
    return cannot_read(str(path), _metadata_what(key), path, key, error)


def _orphans_quiet(loop) -> None:
    """On zarr's event loop, drop the reports of orphaned sibling reads.

    When one chunk read raises (our InputError), zarr's ``asyncio.gather`` of
    the sibling reads is abandoned and asyncio reports each orphaned task when
    it is collected ("Task was destroyed but it is pending"), or when it fails
    later because the interpreter is shutting zarr's thread pool down ("Task
    exception was never retrieved", and "_GatheringFuture exception was never
    retrieved" for the gather itself; reads never started warn "coroutine ... was
    never awaited"): noise after the one-line error. Anything
    else goes to the default handler.
    """
    if getattr(loop, "_tilefuse_quiet", False):
        return

    def handler(loop, context):
        message = str(context.get("message", ""))
        if message.startswith("Task was destroyed but it is pending"):
            return
        # a Task's, or the _GatheringFuture's of the abandoned gather itself
        if message.endswith("exception was never retrieved") and _orphan_error(context.get("exception")):
            return
        loop.default_exception_handler(context)

    loop.set_exception_handler(handler)
    loop._tilefuse_quiet = True
    # sibling reads zarr had created but never started are collected unawaited (at exit, say)
    warnings.filterwarnings("ignore", message=r"coroutine 'concurrent_map\.<locals>\.run' was never awaited", category=RuntimeWarning)
    # ... or, suspended, are closed once zarr's loop is: "Exception ignored in: <coroutine ...>" and a traceback
    if not getattr(sys.unraisablehook, "_tilefuse_quiet", False):
        default = sys.unraisablehook

        def hook(unraisable) -> None:
            if not _orphan_read(unraisable):
                default(unraisable)

        hook._tilefuse_quiet = True
        sys.unraisablehook = hook


def _orphan_read(unraisable) -> bool:
    """An abandoned sibling read of zarr (``concurrent_map``) failing as it is collected after its loop closed."""
    name = getattr(unraisable.object, "__qualname__", "")
    error = unraisable.exc_value
    if not name.endswith("concurrent_map.<locals>.run"):
        return False
    return _orphan_error(error) or (isinstance(error, RuntimeError) and "Event loop is closed" in str(error))


def _orphan_error(error: BaseException | None) -> bool:
    """An abandoned sibling read's own failure: another damaged chunk, or zarr's pool already shut at exit."""
    if isinstance(error, InputError):
        return True
    return isinstance(error, RuntimeError) and "after shutdown" in str(error)


Fix = Union[str, Callable[[str], str]]
"""What to do about a damaged store: a text, or a function of the damaged array's name."""


class VerifiedStore(WrapperStore):
    """A zarr store that hands out only intact chunks: missing or damaged ones raise InputError.

    ``checks`` maps array names to :class:`ArrayCheck`; ``where`` names the store
    in messages and ``fix`` says what to do about a damaged one (a text, or a function of the array's name:
    a resume rewrites a prediction's blocks, not its coordinates).
    """

    def __init__(
        self, store, checks: Mapping[str, ArrayCheck] | None = None, where: str = "", fix: Fix = "", root: Path | None = None
    ) -> None:
        super().__init__(store)
        self.checks = dict(checks or {})
        self.where = where
        self.fix = fix
        self.root = root
        self.identity = store_identity(root) if root is not None else None
        self.consolidated = False
        """Whether the store records its arrays' metadata in its root (zarr's ``use_consolidated``)."""
        self.recorded = False
        """Whether reads compare every chunk with the store's record of its place (:data:`DIGESTS`)."""
        self._digests: dict[str, np.ndarray] | None = None
        self._places: dict[str, dict[int, int]] = {}
        """Offset -> place of the chunks of the shards whose index was read last (:func:`chunk_places`)."""

    def __getstate__(self):
        # what a task or DataLoader worker unpickles: the record is read again where it is needed, once
        return {**self.__dict__, "_digests": None, "_places": {}}

    def digests(self, name: str) -> np.ndarray | None:
        """The record of where array ``name``'s chunks belong, or None where the store has none for it."""
        if not self.recorded:
            return None
        if self._digests is None:
            self._digests = read_digests(self.root if self.root is not None else self.where, self.checks, self.fix_for(DIGESTS), self.where)
        return self._digests.get(name)

    def __dask_tokenize__(self):
        """The store as resolved, not as named: a Dataset reopened by its absolute path (a notebook passing it
        on after a chdir, :func:`tilefuse.prediction.store_path`) has the same dask names as one opened by a
        relative path. What it promises is part of it: a partial prediction opened before and after a resume
        wrote more blocks must not share names (dask would read one for both)."""
        promised = sorted((name, sorted(c.required) if isinstance(c.required, frozenset) else c.required) for name, c in self.checks.items())
        return (type(self).__name__, str(self.root if self.root is not None else self.where), self.identity, promised)

    def _with_store(self, store):
        clone = type(self)(store, self.checks, self.where, self.fix)
        clone.root, clone.identity, clone.consolidated = self.root, self.identity, self.consolidated
        clone.recorded, clone._digests, clone._places = self.recorded, self._digests, self._places
        return clone

    def check_identity(self) -> None:
        """Refuse to go on reading a store that another run replaced (renamed a new one into place) since it was
        opened: its later chunks would come from the new store, checksums intact, mixed with the old one's."""
        if self.identity is not None and store_identity(self.root) != self.identity:
            raise InputError(
                f"{self.where} was replaced while it was read (another run rewrote it, e.g. with --overwrite): "
                "run the command again once that run has finished"
            )

    def damaged(self, check: ArrayCheck, index: tuple[int, ...], what: str) -> InputError:
        self.check_identity()  # a key missing or unlike its checksum because the store was replaced meanwhile
        unit = "shard" if check.inner else "chunk"
        region = check.region(index)
        edit = (
            f" (a change you made to it yourself: record it with tilefuse.storage.record_digests({str(self.where)!r}))"
            if what == MISPLACED else ""
        )
        return InputError(
            f"{self.where}: {unit} {index} of {check.name!r}{f' ({region})' if region else ''} is {what}: "
            f"the store is corrupt, {self.fix_for(check.name)}{edit}"
        )

    async def get(self, key, prototype, byte_range=None):
        parsed = _parse_key(key)
        try:
            value = await self._store.get(key, prototype, byte_range)
        except OSError as error:  # not a failed write: the guarded writer's "cannot write ... choose another output" misled
            raise self.unreadable(key, parsed, error) from None
        check = self.checks.get(parsed[0]) if parsed else None
        if check is None:
            return value
        index = parsed[1]
        _orphans_quiet(asyncio.get_running_loop())
        self.check_identity()  # after the read: a chunk of a store renamed into place meanwhile is never taken
        if value is None:
            if check.is_required(index):
                raise self.damaged(check, index, "missing")
            return None
        data = value.as_numpy_array()
        problem = verify_bytes(data, check, byte_range)
        if problem:
            raise self.damaged(check, index, f"damaged ({problem})")
        recorded = self.digests(check.name)
        if recorded is None:
            return value
        recorded = recorded[index]
        if _is_index(check, byte_range) or _index_by_range(data, check, byte_range):  # its chunks are checked as read
            places = chunk_places(data, check)
            if any(recorded[place] and place not in places.values() for place in range(check.inner)):
                raise self.damaged(check, index, "missing a chunk (its shard index marks empty a place the store recorded)")
            self._remember(key, places)
            return value
        if byte_range is not None and not (check.inner and isinstance(byte_range, RangeByteRequest)):
            return value  # zarr makes no other partial reads of tilefuse's layouts
        if byte_range is not None:  # one chunk of a shard: the record of its place
            place = (await self._places_of(key, check, prototype)).get(byte_range.start)
            recorded = recorded[place : place + 1] if place is not None else np.zeros(0, np.uint32)
        problem = misplaced(data, check, recorded, byte_range)
        if problem:
            raise self.damaged(check, index, problem)
        return value

    def _remember(self, key: str, places: dict[int, int]) -> None:
        if len(self._places) >= 4096:  # a few shards are read at a time: bounded memory at any scale
            self._places.clear()
        self._places[key] = places

    async def _places_of(self, key: str, check: ArrayCheck, prototype) -> dict[int, int]:
        """Offset -> place of the chunks shard ``key`` holds (its index, as read last, or read now)."""
        if key not in self._places:
            request = _index_request(check)
            try:
                value = await self._store.get(key, prototype, request)
            except OSError as error:
                raise self.unreadable(key, _parse_key(key), error) from None
            data = value.as_numpy_array() if value is not None else np.zeros(0, np.uint8)
            self._remember(key, {} if verify_bytes(data, check, request) else chunk_places(data, check))
        return self._places[key]

    def problem(self, data, check: ArrayCheck, index: tuple[int, ...]) -> str | None:
        """Why the whole bytes of key ``index`` of ``check``'s array are not to be used (damaged, or not the
        chunks recorded there), or None."""
        problem = verify_bytes(data, check)
        if problem:
            return f"damaged ({problem})"
        recorded = self.digests(check.name)
        return None if recorded is None else misplaced(data, check, recorded[index])

    def unreadable(self, key: str, parsed, error: OSError) -> InputError:
        """The one line for a key the filesystem refuses to read (no permission, an I/O error)."""
        check = self.checks.get(parsed[0]) if parsed else None
        what = f"{'shard' if check.inner else 'chunk'} {parsed[1]} of {check.name!r} ({key})" if check else _metadata_what(key)
        # a chunk the disk fails to read is lost with it; a metadata file (a permission aside) is no chunk to rewrite
        other = f"the disk or store is damaged, {self.fix_for(parsed[0])}" if parsed else UNREADABLE_DISK
        return cannot_read(self.where, what, self.root if self.root is not None else self.where, key, error, other)

    def fix_for(self, name: str) -> str:
        """What to do about a damaged key of array ``name``."""
        return self.fix(name) if callable(self.fix) else self.fix

    async def get_partial_values(self, prototype, key_ranges):
        return [await self.get(key, prototype, byte_range) for key, byte_range in key_ranges]


def _consolidated(path: Path) -> dict | None:
    """The store's record of its arrays' metadata (array name -> its ``zarr.json``, from the consolidated
    metadata in the root ``zarr.json``), or None for a store without one (or without a root ``zarr.json``, or one
    that is not JSON: zarr says what it is). A root ``zarr.json`` the filesystem refuses to read is one
    InputError saying so (it escaped as a PermissionError that the CLI took for a failed write)."""
    import json

    try:
        text = (Path(path) / "zarr.json").read_bytes()
    except OSError as error:
        if _refused(error):
            raise cannot_read(str(path), _metadata_what("zarr.json"), path, "zarr.json", error) from None
        return None
    try:
        listed = json.loads(text).get("consolidated_metadata")
    except (ValueError, AttributeError):
        return None
    if listed is None:
        return None
    return (listed.get("metadata") or {}) if isinstance(listed, dict) else {}


def checks_for(group: zarr.Group, written: Mapping[str, Collection] | None = None) -> dict[str, ArrayCheck]:
    """The :class:`ArrayCheck` of every array of ``group``.

    In a store of this format every key is required, except in arrays named in
    ``written``, where only keys whose last two indices are listed are.
    """
    promised = group.attrs.get(FORMAT_ATTR) == FORMAT
    written = written or {}
    ours = own_arrays(dict(group.attrs))
    checks = {}
    for name, array in group.arrays():
        own = promised and (ours is None or name in ours)  # an array a user added to a store is not promised
        required = (frozenset(map(tuple, written[name])) if name in written else True) if own else False
        checks[name] = _check_of(name, array, required)
        if own and not checks[name].checksum:  # its chunks would be read unchecked
            raise InputError(
                f"{_where(group)}: the metadata of array {name!r} ({name}/zarr.json) is damaged: its codecs lack the crc32c "
                "checksum every array of this store is written with; the store is corrupt, write it again with --overwrite"
            )
    return checks


def own_arrays(attrs: Mapping) -> set[str] | None:
    """The arrays a tilefuse store with root ``attrs`` is written with: a scene store's listed modalities and
    their band coordinates, ``valid``, ``x``, ``y``, ``spatial_ref``, and ``label`` unless ``labelled`` says it
    was written without (stores of earlier releases lack that attr); a prediction store's ``labels``, ``probs``,
    its block manifest and coordinates. Anything else in the store is a layer a user added (e.g. with zarr or
    ``to_zarr(mode="a")``): never promised, never deleted. None for another kind of store, or a scene whose list
    of modalities is missing or damaged (then every array counts as its own)."""
    kind = attrs.get("tilefuse_store")
    if kind == "prediction":
        from tilefuse.prediction import MANIFEST, OUTPUTS

        return {*OUTPUTS, MANIFEST, "x", "y", "spatial_ref"}
    listed = attrs.get("modalities") if kind == "scene" else None
    if not isinstance(listed, list) or not all(isinstance(n, str) for n in listed):
        return None
    label = ["label"] if attrs.get("labelled", True) is not False else []
    return {"valid", *label, "x", "y", "spatial_ref", *listed, *(f"{n}_band" for n in listed)}


def _where(group: zarr.Group) -> str:
    root = getattr(group.store, "root", None)
    return str(root) if root is not None else "the store"


def _check_array_metadata(path: Path, group: zarr.Group, listed: Mapping) -> None:
    """Refuse a store whose consolidated metadata lists an array whose own ``zarr.json`` is gone, not JSON, or
    (for an array tilefuse wrote) not the one recorded.

    Reads go by the consolidated copy, so such a store opened, but writing a
    block into it (a ``--resume``) was a KeyError traceback; and an array folder
    copied in from another store (its chunks intact, each with its checksum) was
    read, trained on and scored without a word.
    """
    import json

    ours = own_arrays(dict(group.attrs))
    for name, _ in group.arrays():
        meta = path / name / "zarr.json"
        try:
            own = json.loads(meta.read_bytes())
        except (OSError, ValueError) as error:
            if isinstance(error, OSError) and _refused(error):  # no permission (on it, or a folder), an I/O error
                raise cannot_read(str(path), _metadata_what(f"{name}/zarr.json"), path, f"{name}/zarr.json", error) from None
            state = "missing" if isinstance(error, FileNotFoundError) else "damaged"
            raise InputError(
                f"{path}: the metadata of array {name!r} ({name}/zarr.json) is {state}: the store is corrupt and cannot be "
                "repaired in place, write it again with --overwrite"
            ) from None
        if (ours is None or name in ours) and name in listed and own != listed[name]:
            raise InputError(
                f"{path}: array {name!r} is not the one the store was written with: its metadata ({name}/zarr.json) differs "
                "from the store's record of it (a folder copied in from another store, or edited): restore it, or write "
                "the store again with --overwrite (an edit you meant: record it with zarr.consolidate_metadata)"
            )


def store_identity(path: str | os.PathLike) -> tuple[int, int, int | None] | None:
    """(device, inode) of the store folder at ``path`` and the time its ``x`` coordinate was written (None when
    gone): another store renamed into place differs. The inode alone did not tell: a store replaced twice could get
    its first folder's freed inode back, and a Dataset opened before read the new store's chunks (same shapes,
    checksums intact) under the old one's coordinates. The coordinate's metadata is written once, at creation."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    try:
        written = os.stat(os.path.join(path, "x", "zarr.json")).st_mtime_ns
    except OSError:
        written = None
    return info.st_dev, info.st_ino, written


def verified_store(path: str | os.PathLike, *, written=None, fix: Fix = "re-ingest it", read_only: bool = True) -> VerifiedStore:
    """A :class:`VerifiedStore` over the zarr store at ``path`` (see :func:`checks_for` for ``written``).

    The store is read, and its identity checked (os.stat) on every read, by ``path`` resolved once here
    (:func:`tilefuse.outputs.real_path`): a relative path kept as given named another folder once the process
    changed folder (``os.chdir`` in a notebook holding a lazy Dataset), and every later read was a false "was
    replaced". Messages keep ``path`` as given.
    """
    from tilefuse.outputs import real_path

    path = Path(path)
    real = real_path(path)
    root = store_identity(real)
    listed = _consolidated(path)  # the root zarr.json, read once for the whole open
    try:
        group = zarr.open_group(LocalStore(path, read_only=True), mode="r", zarr_format=3, use_consolidated=listed is not None)
        if listed is not None:
            _check_array_metadata(path, group, listed)
        checks = checks_for(group, written)
    except OSError as error:  # zarr reading a metadata file (a store without consolidated metadata lists its arrays)
        if not _refused(error):
            raise
        raise _unreadable_metadata(path, error) from None
    store = VerifiedStore(LocalStore(real, read_only=read_only), checks, str(path), fix, root=real)
    store.identity = root  # the store whose metadata was just read
    store.consolidated = listed is not None  # how zarr is to open it (open_group, open_dataset)
    attrs = group.attrs
    if written is None and attrs.get(DIGESTS_ATTR) == DIGESTS and attrs.get("complete", True) is not False:
        store._digests = read_digests(path, checks, store.fix_for(DIGESTS))  # checked at the open: one line here
        store.recorded = True
    return store


def _recorded(checks: Mapping[str, ArrayCheck]) -> dict[str, ArrayCheck]:
    """The arrays a store's :data:`DIGESTS` covers: every one it promises whole (its own, complete)."""
    return {name: check for name, check in checks.items() if check.required is True}


def read_digests(
    path: str | os.PathLike, checks: Mapping[str, ArrayCheck], fix: str = "re-ingest it", where: str | None = None
) -> dict[str, np.ndarray]:
    """The :data:`DIGESTS` record of the store at ``path`` (named ``where`` in messages), checked against its
    arrays' ``checks``: one :class:`~tilefuse.errors.InputError` when it is missing, damaged or not of the
    store's arrays."""
    import io
    import zipfile

    file = Path(path, DIGESTS)
    record: dict[str, np.ndarray] = {}
    try:
        data = file.read_bytes()  # read apart from the parse: a read the filesystem refuses is no damage
    except OSError as error:
        if _refused(error):  # no permission (on it, or on the store's folder), an I/O error: the store may be intact
            raise cannot_read(str(where or path), _metadata_what(DIGESTS), path, DIGESTS, error) from None
        data, state = None, "missing" if isinstance(error, FileNotFoundError) else "damaged"
    if data is not None:
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as members:
                record = {name: members[name] for name in members.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile):
            state = "damaged"
        else:
            state = None
            for name, check in _recorded(checks).items():
                grid = tuple(-(-n // u) for n, u in zip(check.shape, check.unit))
                found = record.get(name)
                if found is None or found.dtype != np.uint32 or found.shape != (*grid, max(check.inner, 1)):
                    state = f"damaged (its entry for {name!r} {'is missing' if found is None else 'does not fit the array'})"
                    break
    if state:
        raise InputError(f"{where or path}: its record of where each chunk belongs ({DIGESTS}) is {state}: the store is corrupt, {fix}")
    return record


def stored_digests(path: str | os.PathLike, check: ArrayCheck, index: tuple[int, ...]) -> np.ndarray:
    """:func:`key_digests` of key ``index`` of ``check``'s array as stored in the store at ``path`` (OSError
    where it cannot be read)."""
    with open(Path(path, chunk_key(check.name, index)), "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        return key_digests(lambda offset, count: os.pread(handle.fileno(), count, offset), size, check)


def record_digests(path: str | os.PathLike, fix: Fix = "re-ingest it") -> None:
    """Write :data:`DIGESTS` for the store at ``path`` (every key of every array it promises whole, read four
    bytes a chunk) and set :data:`DIGESTS_ATTR`: the last step of writing a store, before its metadata is
    consolidated. The caller holds the store's lock and has written every chunk; a key missing or unreadable
    is the InputError a read gives (``fix``: as for :func:`verified_store`).

    Also what records a change a user made to a store's own arrays in place (with zarr): from then on the
    changed chunks are the store's, and the old ones are refused in their place."""
    import io
    import zipfile

    from tilefuse.outputs import write_file

    path = Path(path)
    store = verified_store(path, fix=fix, read_only=False)
    record = {}
    for name, check in _recorded(store.checks).items():
        grid = tuple(-(-n // u) for n, u in zip(check.shape, check.unit))
        digests = np.zeros((*grid, max(check.inner, 1)), np.uint32)
        for index in check.keys():
            try:
                digests[index] = stored_digests(path, check, index)
            except FileNotFoundError:
                raise store.damaged(check, index, "missing") from None
            except OSError as error:
                raise store.unreadable(chunk_key(name, index), (name, index), error) from None
        record[name] = digests
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:  # np.savez's layout, whatever the arrays are named
        for name, digests in record.items():
            with archive.open(f"{name}.npy", "w") as member:
                np.lib.format.write_array(member, digests)
    write_file(path / DIGESTS, buffer.getvalue())
    zarr.open_group(store, mode="r+", zarr_format=3, use_consolidated=store.consolidated).attrs[DIGESTS_ATTR] = DIGESTS


def open_group(path: str | os.PathLike, *, written=None, fix: Fix = "re-ingest it") -> zarr.Group:
    """Open the zarr group at ``path`` for reading through a :class:`VerifiedStore`."""
    store = verified_store(path, written=written, fix=fix)
    return zarr.open_group(store, mode="r", zarr_format=3, use_consolidated=store.consolidated)


def open_dataset(path: str | os.PathLike, *, written=None, fix: Fix = "re-ingest it"):
    """Open the store at ``path`` lazily as an xarray Dataset (CRS decoded) through a :class:`VerifiedStore`."""
    import xarray as xr

    store = verified_store(path, written=written, fix=fix)
    return xr.open_zarr(store, decode_coords="all", consolidated=store.consolidated, zarr_format=3)


def verify_store(path: str | os.PathLike, *, written=None, fix: Fix = "re-ingest it", names: Collection[str] | None = None) -> int:
    """Check every key the store promises (all of them, or those of ``names``) without decoding; returns how many.

    Reads each key's bytes once and checks presence, size and crc32c; the first
    problem raises the same InputError a read would.
    """
    store = verified_store(path, written=written, fix=fix)
    count = 0
    for name, check in store.checks.items():
        if names is not None and name not in names:
            continue
        for index in check.keys():
            file = Path(path, chunk_key(name, index))
            try:
                present = _present(file)  # a chunk folder that cannot be searched is unreadable, not missing
                data = np.frombuffer(file.read_bytes(), dtype=np.uint8) if present else None
            except OSError as error:
                raise store.unreadable(chunk_key(name, index), (name, index), error) from None
            if data is None:
                if check.is_required(index):
                    raise store.damaged(check, index, "missing")
                continue
            problem = store.problem(data, check, index)
            store.check_identity()
            if problem:
                raise store.damaged(check, index, problem)
            count += 1
    store.check_identity()
    return count


def key_problem(path: str | os.PathLike, check: ArrayCheck, index: tuple[int, ...], recorded: np.ndarray | None = None) -> str | None:
    """"missing", "damaged (...)" or (given the key's :data:`DIGESTS` entry ``recorded``) "not the one the store
    recorded there" for one key of an array of the store at ``path``; None if intact."""
    file = Path(path, chunk_key(check.name, index))
    try:
        if not _present(file):
            return "missing"
        data = np.frombuffer(file.read_bytes(), dtype=np.uint8)
    except OSError as error:
        return f"unreadable ({error.strerror or type(error).__name__})"
    problem = verify_bytes(data, check)
    if problem:
        return f"damaged ({problem})"
    return None if recorded is None else misplaced(data, check, recorded)


# ------------------------------------------------------------------------ writing


def with_checksums(ds, encoding: Mapping[str, dict]) -> dict:
    """``encoding`` for ``ds.to_zarr``, completed so every variable and coordinate carries crc32c."""
    out = {name: dict(enc) for name, enc in encoding.items()}
    for name in [*ds.data_vars, *ds.coords]:
        enc = out.setdefault(str(name), {})
        chain = list(enc.get("compressors") or compressors())
        if not chain or not isinstance(chain[-1], Crc32cCodec):
            chain.append(Crc32cCodec())
        enc["compressors"] = chain
    return out


def consolidate(path: str | os.PathLike) -> None:
    """Write zarr v3 consolidated metadata for the store at ``path`` (after any metadata or attrs change)."""
    with warnings.catch_warnings():
        # zarr notes that v3 consolidated metadata is not in the spec yet; xarray and zarr read it
        warnings.filterwarnings("ignore", message=".*[Cc]onsolidated metadata.*")
        # the store's DIGESTS file at its top, which zarr lists while it looks for arrays
        warnings.filterwarnings("ignore", message=f"Object at {DIGESTS} is not recognized")
        zarr.consolidate_metadata(LocalStore(Path(path)), zarr_format=3)
