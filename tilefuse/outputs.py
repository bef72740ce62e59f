"""The guarded writer: the one way every command of tilefuse creates an output.

Contract (DESIGN.md, "Data safety"):

- **Inputs are never touched.** :func:`claim` refuses an output path that is,
  contains or lies inside any input path of the same command, comparing real
  paths (symlinks, ``..``, relative paths and trailing slashes resolved).
- **Overwrite replaces only our own output of the same kind.** Every output
  carries a marker naming its kind (:data:`KINDS`): zarr stores their
  ``tilefuse_store`` attr in ``zarr.json``, folders a ``.tilefuse-output``
  file, PNGs a ``tilefuse`` tEXt chunk, GeoTIFFs a ``TILEFUSE`` metadata tag,
  JSON files a top-level ``tilefuse_output`` key. An existing path without the
  marker of the kind being written (a scene store when writing a prediction,
  any other file or folder) is refused, ``overwrite=True`` or not. An existing
  *empty* folder counts as absent for folder kinds. A folder output that holds
  anything tilefuse does not write there (:func:`foreign_entries`: a user's
  file, a store written inside a run or GeoTIFF folder) is not replaced either.
- **Whole or not at all.** :func:`create` yields a hidden temporary sibling
  (``.NAME.tmp-<host>-<pid>-<start>-<random>``) to write into, stamps the
  marker, and renames it into place (:func:`replace_path`); a NAME longer than
  :data:`STEM_MAX` bytes is cut and hashed in these sibling names, so any name
  the filesystem allows works, and a longer one is one line. Temporaries and
  moved-aside old outputs left by a killed process (dead owner, same host) are
  removed on the next run of that output; an old output whose replacement
  never arrived is put back.
- **One writer per output.** :func:`output_lock` holds ``.NAME.lock`` (pid,
  hostname and process start time; written under a temporary name and
  hard-linked into place, so it never exists empty) for the whole run; a
  second writer is refused naming the holder, a lock whose process is gone is
  taken over. Locks are re-entrant within one thread.
- **Free space and filesystem errors.** :func:`claim` refuses an output when the
  filesystem has less free space than the caller's estimate (a lower bound);
  an ``OSError`` of the filesystem (read-only, permission, full, quota, not a
  folder, ...) while writing becomes one :class:`InputError` line with the
  temporary removed and the old output untouched.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import inspect
import json
import os
import re
import shutil
import socket
import stat
import struct
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import psutil

from tilefuse.errors import InputError, clipped

MARKER_FILE = ".tilefuse-output"
"""Marker of folder outputs (run folders, GeoTIFF folders, demo folders): JSON ``{"kind": ...}``."""
JSON_KEY = "tilefuse_output"
PNG_KEY = "tilefuse"
TIFF_TAG = "TILEFUSE"

KINDS: dict[str, str] = {
    "scene": "zarr",
    "prediction": "zarr",
    "run": "folder",
    "checkpoint": "folder",
    "geotiff-folder": "folder",
    "demo": "folder",
    "geotiff": "tiff",
    "raster": "tiff",
    "png": "png",
    "json": "json",
}
"""Output kind -> how its marker is stored. ``geotiff``: an exported COG; ``raster``: a scene's input raster that
synth writes (``--geotiff``), never replaced by an export even once copied out of its GeoTIFF folder."""
TIFF_KINDS = tuple(kind for kind, how in KINDS.items() if how == "tiff")

WRITE_ERRNOS = frozenset(
    getattr(errno, name)
    for name in ("EROFS", "EACCES", "EPERM", "ENOSPC", "EDQUOT", "ENOTDIR", "EEXIST", "EISDIR", "EFBIG", "ENAMETOOLONG")
    if hasattr(errno, name)
)
"""errnos that mean "this output cannot be written here" (the user's choice of place, not a bug)."""

_TEMP = re.compile(r"\.(?P<tag>tmp|old)-(?P<host>[0-9a-f]{6})-(?P<pid>\d+)-(?P<start>[0-9a-z]+)-[0-9a-f]{6}$")


# ------------------------------------------------------------------ processes


def _host() -> str:
    return socket.gethostname()


def _host_tag(host: str) -> str:
    return hashlib.sha1(host.encode()).hexdigest()[:6]


_LINUX = sys.platform.startswith("linux")
_TICKS = os.sysconf("SC_CLK_TCK") if _LINUX else 100
_WALL_CLOCK = 1e9
"""A recorded start time above this is wall-clock seconds since 1970 (written by tilefuse before it recorded
seconds since boot on Linux); a start since boot reaches it only after 31 years of uptime."""


def _start_time(pid: int, *, wall_clock: bool = False) -> float | None:
    """When process ``pid`` started, None when no such process runs (gone, or a zombie).

    On Linux: seconds since boot, read from ``/proc/PID/stat``, which never
    changes for a process. psutil's ``create_time`` adds the boot time *of the
    moment* (``btime``, the wall clock minus the uptime), which moves whenever
    the wall clock is set (NTP, a virtual machine restored from a snapshot):
    a live writer then looked dead, and its lock and temporaries were taken.
    Elsewhere (and with ``wall_clock``): the creation time psutil reports,
    which those systems store once per process.
    """
    if _LINUX and not wall_clock:
        try:
            with open(f"/proc/{pid}/stat", "rb") as handle:
                fields = handle.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            return None
        return None if fields[0] == b"Z" else round(int(fields[19]) / _TICKS, 2)
    try:
        process = psutil.Process(pid)
        return None if process.status() == psutil.STATUS_ZOMBIE else round(process.create_time(), 2)
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None


def process_alive(pid: int, start: float | None) -> bool:
    """Whether process ``pid`` (started at ``start`` as :func:`current_process` recorded it, if known) still
    runs on this host: a process under that pid that started at another time is another process."""
    legacy = start is not None and start > _WALL_CLOCK and _LINUX
    found = _start_time(pid, wall_clock=legacy)
    if found is None:
        return _hidden(pid)
    return start is None or abs(found - start) < (2.0 if legacy else 0.05)


def _hidden(pid: int) -> bool:
    """Whether ``pid`` runs but may not be inspected (another user's process where ``/proc`` hides it): counted
    alive, as taking over its output could lose its work, and refusing only asks the user to check."""
    if os.name != "posix":  # signal 0 would terminate it on Windows; psutil asks without touching it
        return psutil.pid_exists(pid)
    try:  # signal 0 checks, sends nothing; a process we may inspect but could not is a zombie or just ended
        os.kill(pid, 0)
    except PermissionError:
        return True
    except (OSError, OverflowError):
        return False
    return False


_ME = (os.getpid(), _start_time(os.getpid()))


def current_process() -> tuple[int, float | None]:
    """(pid, start time) of this process, as locks and temporaries record their owner."""
    global _ME
    if _ME[0] != os.getpid():  # forked
        _ME = (os.getpid(), _start_time(os.getpid()))
    return _ME


# ------------------------------------------------------------------ temporaries


STEM_MAX = 200
"""Bytes of an output's name that its hidden siblings (temporaries, lock) repeat whole; a longer name is cut and
ends in a hash of the whole (:func:`sibling_stem`), so a sibling (up to 50 bytes more) fits the 255-byte name
limit of common filesystems whenever the output's own name does."""


def sibling_stem(name: str) -> str:
    """``name`` as the hidden siblings of an output named so repeat it (``.STEM.lock``, ``.STEM.tmp-...``): whole
    up to :data:`STEM_MAX` bytes, else its first bytes, ``~`` and 16 hex digits of a hash of the whole name."""
    raw = os.fsencode(name)
    if len(raw) <= STEM_MAX:
        return name
    return f"{raw[: STEM_MAX - 17].decode('utf-8', 'ignore')}~{hashlib.sha1(raw).hexdigest()[:16]}"


def temporary_sibling(path: str | os.PathLike, tag: str = "tmp") -> Path:
    """A hidden, unique name next to ``path`` (same filesystem, so a rename is atomic) naming its owner."""
    path = Path(path)
    pid, start = current_process()
    owner = f"{_host_tag(_host())}-{pid}-{int((start or 0) * 100):x}"
    return path.parent / f".{sibling_stem(path.name)}.{tag}-{owner}-{uuid.uuid4().hex[:6]}"


def is_temporary(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a temporary sibling made by :func:`temporary_sibling` (never a store to open)."""
    name = Path(path).name
    return name.startswith(".") and _TEMP.search(name) is not None


def _remove(path: Path) -> None:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    except IsADirectoryError:  # made a folder meanwhile (a write still in flight: _remove_late_writes)
        shutil.rmtree(path, ignore_errors=True)


def clean_stale(path: str | os.PathLike) -> list[Path]:
    """Remove temporaries of ``path`` left by dead processes on this host; returns what was removed.

    A moved-aside old output (``.NAME.old-...``) whose owner died before the
    new one arrived is put back at ``path`` instead.
    """
    path = Path(path)
    removed: list[Path] = []
    prefix = f".{sibling_stem(path.name)}."
    try:
        siblings = [p for p in path.parent.iterdir() if p.name.startswith(prefix)]
    except OSError:
        return removed
    here = _host_tag(_host())
    for sibling in sorted(siblings, key=lambda p: p.name):
        match = _TEMP.fullmatch(sibling.name[len(prefix) - 1 :])
        if match is None or match["host"] != here:
            continue
        if process_alive(int(match["pid"]), int(match["start"], 16) / 100 or None):
            continue
        if match["tag"] == "old" and not os.path.lexists(path):
            os.replace(sibling, path)
            continue
        _remove(sibling)
        removed.append(sibling)
    return removed


def replace_path(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Move the finished ``src`` (file or folder) to ``dst``, replacing what is there.

    A folder cannot be renamed over a non-empty one, so an existing ``dst``
    first moves aside and is deleted once ``src`` is in place: at every moment
    ``dst`` is either the old complete output or the new one (a kill in
    between leaves the old one aside, which :func:`clean_stale` puts back).
    """
    from tilefuse.signals import held

    src, dst = Path(src), Path(dst)
    if dst.is_dir() and not dst.is_symlink():
        here = _cwd() == real_path(dst)  # an output of the same kind run in (claim refuses any other)
        trash = temporary_sibling(dst, "old")
        try:
            with held():  # the swap happens whole: a SIGTERM or Ctrl-C is taken once the new one is in place
                os.replace(dst, trash)
                os.replace(src, dst)
                if here:  # follow it: relative paths of the rest of the run resolve in the new folder, not the deleted one
                    os.chdir(dst)
        finally:  # also when a signal held meanwhile is taken: the old one never stays beside the output
            if not os.path.lexists(dst) and os.path.lexists(trash):  # the new one did not get in place: the old one back
                os.replace(trash, dst)
            with held():
                shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(src, dst)


def write_file(path: str | os.PathLike, data: str | bytes) -> None:
    """Write ``data`` to the file ``path`` whole or not at all: under a temporary name moved into place, so a
    kill or a full disk mid-write leaves the previous file (a file a run keeps rewriting: log, metrics, split)."""
    path = Path(path)
    tmp = temporary_sibling(path)
    try:
        if isinstance(data, str):
            tmp.write_text(data)
        else:
            tmp.write_bytes(data)
        replace_path(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------------- markers


def _png_text(path: Path) -> dict[str, str]:
    """tEXt chunks of a PNG up to its image data (empty for anything that is not a PNG)."""
    out: dict[str, str] = {}
    with open(path, "rb") as handle:
        if handle.read(8) != b"\x89PNG\r\n\x1a\n":
            return out
        while True:
            head = handle.read(8)
            if len(head) < 8:
                return out
            length, kind = struct.unpack(">I4s", head)
            if kind in (b"IDAT", b"IEND") or length > 1 << 20:
                return out
            data = handle.read(length)
            handle.read(4)
            if kind == b"tEXt" and b"\0" in data:
                key, _, value = data.partition(b"\0")
                out[key.decode("latin-1")] = value.decode("latin-1")


def found_kind(path: str | os.PathLike) -> str | None:
    """The kind of tilefuse output at ``path`` by its marker, or None (absent, foreign or unreadable)."""
    path = Path(path)
    try:
        if path.is_dir():
            if (path / "zarr.json").is_file():
                attrs = json.loads((path / "zarr.json").read_text()).get("attributes", {})
                kind = attrs.get("tilefuse_store")
                return kind if KINDS.get(kind) == "zarr" else None
            if (path / MARKER_FILE).is_file():
                kind = json.loads((path / MARKER_FILE).read_text()).get("kind")
                return kind if KINDS.get(kind) == "folder" else None
            return None
        if not path.is_file():
            return None
        with open(path, "rb") as handle:
            head = handle.read(8)
        if head.startswith(b"\x89PNG"):
            return "png" if _png_text(path).get(PNG_KEY) == "png" else None
        if head[:4] in (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+"):
            import rasterio

            with rasterio.Env(CPL_LOG="/dev/null"), rasterio.open(path) as src:
                tag = src.tags().get(TIFF_TAG)
                return tag if tag in TIFF_KINDS else None
        if head.lstrip()[:1] == b"{" and path.stat().st_size < 64 << 20:
            data = json.loads(path.read_text())
            return "json" if isinstance(data, dict) and data.get(JSON_KEY) == "json" else None
    except Exception:  # anything unreadable carries no marker
        return None
    return None


def mark_folder(path: str | os.PathLike, kind: str) -> None:
    """Stamp folder output ``path`` as tilefuse's ``kind``; a GeoTIFF folder's marker also lists the files
    written into it, so a later overwrite deletes only those (:func:`_ours`)."""
    record: dict[str, Any] = {"kind": kind}
    if kind == "geotiff-folder":
        record["files"] = sorted(entry.name for entry in Path(path).iterdir() if entry.name != MARKER_FILE)
    (Path(path) / MARKER_FILE).write_text(json.dumps(record) + "\n")


def _marked_files(folder: Path) -> list[str] | None:
    """The files a GeoTIFF folder's marker lists; None where it lists none (an earlier release's)."""
    try:
        files = json.loads((folder / MARKER_FILE).read_text()).get("files")
    except (OSError, ValueError, AttributeError):
        return None
    return files if isinstance(files, list) else None


def png_metadata() -> dict[str, str]:
    """``metadata=`` for matplotlib's ``savefig`` marking a PNG as tilefuse's."""
    return {PNG_KEY: "png", "Software": "tilefuse"}


def tiff_tags(kind: str = "geotiff") -> dict[str, str]:
    """Tags (default domain) marking a GeoTIFF as tilefuse's ``kind`` (:data:`TIFF_KINDS`)."""
    return {TIFF_TAG: kind}


def json_document(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` with the top-level key marking a JSON file as tilefuse's."""
    return {**data, JSON_KEY: "json"}


# ------------------------------------------------------------------ contents

RUN_ENTRIES = frozenset(
    {"state", "model.safetensors", "config.json", "log.jsonl", "curves.png", "metrics.json", "split.json", "index"}
)
"""What training writes at the top of a run folder (tilefuse.training, tilefuse.sampling)."""
RUN_STATE_FILES = frozenset({"config.json", "model.safetensors", "trainer.json", "trainer.safetensors", MARKER_FILE})
"""What training writes in a run's ``state`` folder."""
INDEX_FILE = re.compile(r"[a-z]+-[0-9a-f]{40}\.npz$")
"""A sampler index file in a run's ``index`` folder (:class:`tilefuse.sampling.IndexCache`)."""
_LOCK = re.compile(r"\..+\.lock(\.(stale|new)-[0-9a-f]{6})?$")
_SIDECARS = (".aux.xml", ".ovr", ".msk")


def _ours(entry: Path, kind: str) -> bool:
    """Whether ``entry``, at the top of a ``kind`` output, is something tilefuse writes there."""
    name = entry.name
    if name == MARKER_FILE or is_temporary(entry) or _LOCK.match(name):
        return True
    if KINDS[kind] == "zarr":  # the group's metadata, its record of chunks, and its arrays (never a nested store)
        from tilefuse.storage import DIGESTS

        if name == "zarr.json" or (name == DIGESTS and entry.is_file() and not entry.is_symlink()):
            return True
        if entry.is_dir() and (entry / "zarr.json").is_file() and found_kind(entry) is None:
            return _own_array(entry)
        return _damaged_array(entry)
    if kind == "run":
        return name in RUN_ENTRIES
    if kind == "checkpoint":
        return name in ("config.json", "model.safetensors")
    if kind == "geotiff-folder":  # the GeoTIFFs its marker lists (each marked) and GDAL's sidecars of them
        base = next((name[: -len(s)] for s in _SIDECARS if name.endswith(s)), name)
        listed = _marked_files(entry.parent)
        # not a COG exported into the folder, nor a user's copy of one of its files: both carry the marker too
        return (listed is None or base in listed) and found_kind(entry.parent / base) in TIFF_KINDS
    return True  # demo folders are reused, never deleted: each output inside is guarded itself


def _own_array(entry: Path) -> bool:
    """Whether array ``entry`` is one its store is written with (:func:`tilefuse.storage.own_arrays`), not a
    layer a user added. A store whose list is missing or damaged counts every array as its own."""
    from tilefuse.storage import own_arrays

    try:
        ours = own_arrays(json.loads((entry.parent / "zarr.json").read_text()).get("attributes", {}))
    except (OSError, ValueError, AttributeError):
        return True
    return ours is None or entry.name in ours


def _damaged_array(entry: Path) -> bool:
    """Whether ``entry`` is an array of the store above it whose own metadata is gone or damaged: named in the
    store's consolidated metadata and holding nothing but its chunk folder ``c`` and ``zarr.json``."""
    try:
        listed = json.loads((entry.parent / "zarr.json").read_text()).get("consolidated_metadata", {}).get("metadata", {})
        # "digests": a prediction manifest's record of its blocks (tilefuse.prediction.BLOCK_DIGESTS)
        return entry.is_dir() and not entry.is_symlink() and entry.name in listed and {e.name for e in entry.iterdir()} <= {"c", "zarr.json", "digests"}
    except (OSError, ValueError, AttributeError):
        return False


def foreign_entries(path: str | os.PathLike, kind: str) -> list[Path]:
    """Entries of the ``kind`` output folder ``path`` that tilefuse does not write there, sorted: at its top, and
    in a run folder's ``state`` and ``index`` folders too (a user's notes there, or a prediction store written
    into them, went with the run on ``train --overwrite``).

    Replacing the output deletes the whole folder, so :func:`claim` refuses to
    overwrite one that holds any (a user's notes, a store written inside a run
    or GeoTIFF folder): those are never deleted, even with overwrite.
    """
    try:
        found = [entry for entry in Path(path).iterdir() if not _ours(entry, kind)]
        if kind == "run":
            for name, ours in (("state", lambda n: n in RUN_STATE_FILES), ("index", INDEX_FILE.match)):
                inner = Path(path, name)
                if inner.is_dir() and not inner.is_symlink():
                    found += [e for e in inner.iterdir() if not (is_temporary(e) or (e.is_file() and not e.is_symlink() and ours(e.name)))]
        return sorted(found)
    except OSError:
        return []


# ------------------------------------------------------------------ the guard


_URL = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]+):/")
"""A URL (s3://, gs://, https://, file://...), also as pathlib leaves it (s3:/bucket/...)."""


def local_path(path: str | os.PathLike, what: str = "path", *, output: bool = False, file: bool = False) -> Path:
    """``path`` as a local path with ``~`` expanded to the home folder; a URL is one :class:`InputError` line.

    tilefuse reads and writes local paths only: a URL given as an output was
    written as a local folder named after it (``s3:/bucket/scene.zarr``), and a
    quoted ``~`` (or one passed to the Python API) made a folder named ``~``.
    ``what`` names the path in the message; ``output`` says which way it goes; ``file``: a file output, so a
    path written as a folder's (``out/``, ``.``) is refused (a file named ``out`` was written).
    """
    if not isinstance(path, (str, os.PathLike)):
        raise InputError(f"{what} must be a path (a str or os.PathLike), got {type(path).__name__} {clipped(repr(path))}")
    try:
        text = os.fspath(path)
    except TypeError:  # an os.PathLike whose __fspath__ gives neither str nor bytes
        text = None
    if not isinstance(text, str):
        raise InputError(
            f"{what} must be a path given as text, got {type(path).__name__} {clipped(repr(path))}, whose __fspath__ gives "
            f"{type(text).__name__ if text is not None else 'neither str nor bytes'}: pass a str or pathlib.Path (os.fsdecode() decodes bytes)"
        )
    if not text:  # pathlib reads '' as '.', the current folder
        raise InputError(f"{what} is empty: give the path to {'write' if output else 'read'}")
    if file and os.path.basename(text) in ("", ".", ".."):  # out/, out/., .. (pathlib drops a trailing / or /.)
        raise InputError(f"{what} {text} names a folder, but this output is a file: add the file's name (e.g. {os.path.join(text, 'NAME')})")
    match = _URL.match(text)
    if match:
        fix = "write it to a local path and copy it there" if output else "download or mount it and pass the local path"
        raise InputError(f"{what} {text} is a URL ({match['scheme']}://): tilefuse reads and writes local paths only; {fix}")
    expanded = os.path.expanduser(text)
    if expanded.startswith("~"):  # ~someone unknown here: it would be a folder named '~someone'
        raise InputError(f"{what} {text}: there is no user {expanded.split(os.sep)[0][1:]!r} here to expand ~ to: write the full path")
    return Path(expanded)


def _check_local(path: str | os.PathLike, what: str) -> None:
    """Refuse an output path that is a URL, or that starts with a ``~`` its caller did not expand (:func:`local_path`)."""
    text = os.fspath(path)
    local_path(text, what, output=True)  # a URL: one line
    if os.path.expanduser(text) != text:
        raise InputError(f"{what} {path} starts with ~, which is not expanded here: write the full path ({local_path(path)})")


def real_path(path: str | os.PathLike) -> Path:
    """Absolute path with symlinks, ``..`` and trailing slashes resolved (also for paths that do not exist yet)."""
    return Path(os.path.realpath(os.fspath(path)))  # not abspath first: it drops "link/.." lexically


def _cwd() -> Path | None:
    try:
        return Path(os.getcwd())
    except OSError:  # deleted under us
        return None


def _check_cwd(target: Path, path: str | os.PathLike, kind: str, what: str) -> None:
    """Refuse an output that holds the current folder, or is it and is not already a ``kind`` output: replacing it
    moves aside and deletes the folder the command runs in (an empty one counts as absent for folder kinds)."""
    here = _cwd()
    if here is None or not here.is_relative_to(target):
        return
    if here != target:
        raise InputError(
            f"{what} {path} holds the current folder {here}: replacing it would delete the folder this command runs "
            "in; choose another output path"
        )
    if found_kind(target) != kind:
        raise InputError(
            f"{what} {path} is the current folder: it would be replaced under this command, with all it holds; "
            f"choose another output path (e.g. a new folder inside it)"
        )


def _flatten(inputs: Iterable[Any]) -> list[Path]:
    out: list[Path] = []
    for item in inputs:
        if item is None:
            continue
        if isinstance(item, (str, os.PathLike)):
            out.append(Path(item))
        else:
            out.extend(_flatten(item))
    return out


def _empty_dir(path: Path) -> bool:
    try:
        return path.is_dir() and not path.is_symlink() and not any(path.iterdir())
    except OSError:
        return False


def _part_of(path: Path) -> str | None:
    """The kind of tilefuse folder output ``path`` belongs to, or None: a file training writes at the top of a run
    folder (:data:`RUN_ENTRIES`), or a GeoTIFF a GeoTIFF folder's marker lists. Such a file is never replaced as
    an output of its own (a run's curves by a quicklook, synth's optical.tif by an export: both carry a marker)."""
    kind = found_kind(path.parent)
    if kind == "run" and path.name in RUN_ENTRIES:
        return kind
    if kind == "geotiff-folder":
        listed = _marked_files(path.parent)
        return kind if (path.name in listed if listed is not None else found_kind(path) in TIFF_KINDS) else None
    return None


def _describe(path: Path) -> str:
    part = _part_of(path)
    if part:
        return f"part of the tilefuse {'run folder' if part == 'run' else 'GeoTIFF folder'} {path.parent}"
    kind = found_kind(path)
    if kind == "raster":
        return "a scene's input raster that tilefuse synth wrote (not an export)"
    if kind:
        return f"a tilefuse {kind}"
    if path.is_dir() and (path / "zarr.json").is_file() and _unparsable(path / "zarr.json"):
        return "a zarr store whose zarr.json is damaged (tilefuse cannot tell it wrote it: remove it yourself if it did)"
    return "a folder not written by tilefuse" if path.is_dir() else "a file not written by tilefuse"


def _unparsable(path: Path) -> bool:
    try:
        json.loads(path.read_bytes())
    except ValueError:
        return True
    except OSError:
        pass
    return False


def human_size(n: float) -> str:
    """``n`` bytes for a message: 1.5 GB."""
    unit = "B"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            break
        n /= 1024
    return f"{n:.0f} B" if unit == "B" else f"{n:.1f} {unit}"


def check_space(path: str | os.PathLike, size: int) -> None:
    """Refuse when the filesystem of ``path`` has less than ``size`` bytes free."""
    if size <= 0:
        return
    parent = real_path(path).parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    try:
        free = shutil.disk_usage(parent).free
    except OSError:
        return
    if free < size:
        raise InputError(
            f"not enough free space for {path}: it needs about {human_size(size)}, {parent} has {human_size(free)} free; "
            "free some space or choose another output"
        )


PATH_SLACK = 64
"""Bytes an output adds below its path (a store's temporary name and its arrays' chunk keys)."""


def _check_length(target: Path, path: str | os.PathLike, what: str) -> None:
    """Refuse an output whose name (or a folder name above it) is longer than its filesystem allows, or whose path
    leaves no room for what is written inside it: one line, before a temporary or lock is made."""
    ancestor = next((p for p in (target, *target.parents) if os.path.isdir(p)), Path(target.anchor or os.sep))  # '/' has no parents
    try:
        name_max, path_max = os.pathconf(ancestor, "PC_NAME_MAX"), os.pathconf(ancestor, "PC_PATH_MAX")
    except (OSError, ValueError):
        name_max, path_max = 255, 4096
    for part in target.parts[len(ancestor.parts) :]:
        size = len(os.fsencode(part))
        if size > name_max:
            raise InputError(
                f"{what} {clipped(os.fspath(path), 80)}: the name {clipped(part)} is {size} bytes, more than the {name_max} a name may have "
                f"on this filesystem: choose a shorter name"
            )
    size = len(os.fsencode(target))
    if size + PATH_SLACK > path_max:
        raise InputError(
            f"{what} {clipped(os.fspath(path), 80)} is {size} bytes long as a full path; with what is written inside it, more than the "
            f"{path_max} a path may have here: choose a shorter name or a folder nearer the root"
        )


def _check_links(path: str | os.PathLike, what: str) -> None:
    """Refuse an output path through a symlink whose target does not exist (a disk not mounted, a folder since
    removed): its target's folders would be created wherever they fall and the output written there."""
    here = Path(os.path.abspath(path))
    for link in (here, *here.parents):
        if os.path.islink(link) and not os.path.exists(link):
            raise InputError(
                f"{what} {path}: {link} is a symlink to {os.readlink(link)}, which does not exist (a disk not mounted?): "
                "mount or create it, or remove the link"
            )


def check_inputs(path: str | os.PathLike, inputs: Iterable[Any], *, what: str = "output") -> Path:
    """Refuse an output ``path`` that is, contains or lies inside one of ``inputs`` (real paths), or that is a URL
    or starts with an unexpanded ``~`` (:func:`local_path`); returns its real path."""
    _check_local(path, what)
    _check_links(path, what)
    target = real_path(path)
    _check_length(target, path, what)
    for source in _flatten(inputs):
        real = real_path(source)
        if target == real:
            raise InputError(f"{what} {path} is the input {source}: choose another output path")
        if real.is_relative_to(target):
            raise InputError(f"{what} {path} contains the input {source}: choose another output path")
        if target.is_relative_to(real):
            raise InputError(f"{what} {path} lies inside the input {source}: choose another output path")
    return target


def claim(
    path: str | os.PathLike,
    kind: str,
    *,
    inputs: Iterable[Any] = (),
    overwrite: bool = False,
    exist_ok: bool = False,
    size: int = 0,
    what: str = "output",
) -> Path:
    """Check that ``path`` may be written as a ``kind`` output; returns its real path. Writes nothing.

    Refused with one line: a path that is, contains or lies inside one of
    ``inputs``; an existing path that is not tilefuse's ``kind`` (whatever
    ``overwrite``); an existing ``kind`` output unless ``overwrite`` or
    ``exist_ok`` (the caller continues it, e.g. a resume); less free space
    than ``size`` bytes. ``what`` names the output in messages (e.g. ``out=``).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown output kind {kind!r}")
    target = check_inputs(path, inputs, what=what)
    _check_cwd(target, path, kind, what)
    store = next((p for p in target.parents if (p / "zarr.json").is_file() and KINDS.get(found_kind(p) or "") == "zarr"), None)
    if store is not None:  # it would be a foreign entry of that store for ever (never replaced, even with overwrite)
        raise InputError(
            f"{what} {path} lies inside the tilefuse {found_kind(store)} store {store}: a store holds only its own arrays; "
            "choose a path outside it"
        )
    ancestor = next(p for p in target.parents if os.path.lexists(p))  # the root always exists
    if not ancestor.is_dir():
        raise InputError(f"{what} {path} cannot be created: {ancestor} is a file, not a folder; choose another output path")
    if not os.access(ancestor, os.W_OK):  # a read-only filesystem or no permission: say so before any work
        reason = "read-only file system" if os.statvfs(ancestor).f_flag & os.ST_RDONLY else "permission denied"
        raise InputError(f"cannot write {path}: {reason} ({ancestor}): choose another output (a writable folder)")
    if os.path.ismount(target):  # written beside it and renamed into place: a mount point cannot be
        raise InputError(
            f"{what} {path} is a mount point: tilefuse writes an output beside its path and renames it into place, "
            f"which a mount point cannot be; write into a new folder inside it (e.g. {os.path.join(path, 'out')})"
        )
    exists = os.path.lexists(target) and not (KINDS[kind] == "folder" and _empty_dir(target))
    if exists:
        found = None if _part_of(target) else found_kind(target)  # a run's curves.png is no quicklook to replace
        if found != kind:
            raise InputError(
                f"{what} {path} exists and is {_describe(target)}, not a tilefuse {kind}: "
                "it is never replaced, even with overwrite; choose another output path"
            )
        if not (overwrite or exist_ok):
            raise InputError(f"{path} already exists: choose another output or pass overwrite=True (--overwrite) to replace it")
        foreign = foreign_entries(target, kind) if overwrite and target.is_dir() else []
        if foreign:
            more = f" (and {len(foreign) - 1} more)" if len(foreign) > 1 else ""
            raise InputError(
                f"{what} {path} holds {os.path.relpath(foreign[0], target)}{more}, which tilefuse did not write there: it is never deleted, "
                "even with overwrite; move it out of the folder or choose another output path"
            )
    check_space(target, size)
    return target


_FULL = {
    os.strerror(getattr(errno, name)): what
    for name, what in (("ENOSPC", "the disk is full"), ("EDQUOT", "the disk quota is full"))
    if hasattr(errno, name)
}
"""strerror of a full disk or quota -> what it means (the write needs space, not permissions)."""


def write_error(path: str | os.PathLike, reason: str, *, kept: str | None = None) -> str:
    """The one line for a filesystem that refuses to write ``path`` (also the CLI's safety net).

    A full disk or quota says so (choose another output or free some space); ``kept``, what a partly written output
    keeps (``"PATH keeps the blocks written so far"``), adds that ``--resume`` finishes it once space is freed.
    """
    if reason == os.strerror(errno.EISDIR):  # a folder where a file goes (a store's chunk replaced by one): no permission to fix
        return f"cannot write {path}: a folder is in the way ({reason}): move it out of the way, or choose another output"
    if reason in _FULL:
        if kept:
            return (
                f"cannot write {path}: {reason} ({_FULL[reason]}): {kept}; free some space, then finish it with "
                "--resume (Python: resume=True), or choose another output"
            )
        return f"cannot write {path}: {reason}: choose another output or free some space ({_FULL[reason]})"
    return f"cannot write {path}: {reason}: choose another output (a writable folder with enough free space) or fix its permissions"


_STORAGE_ERRNOS = tuple(getattr(errno, n) for n in ("ENOSPC", "EDQUOT", "EROFS", "EFBIG") if hasattr(errno, n))


def filesystem_reason(error: BaseException, errnos: frozenset[int] = WRITE_ERRNOS) -> str | None:
    """Why ``error`` is the filesystem refusing a write, or None.

    An ``OSError`` with one of :data:`WRITE_ERRNOS` anywhere in the exception
    chain, or a library error (GDAL, codecs) whose message carries the text of
    a full disk, a quota or a read-only filesystem.
    """
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in errnos:
            return error.strerror or os.strerror(error.errno)
        text = str(error)
        for code in _STORAGE_ERRNOS:
            if os.strerror(code).lower() in text.lower():
                return os.strerror(code)
        error = error.__cause__ or error.__context__
    return None


@contextlib.contextmanager
def os_errors_as_input(path: str | os.PathLike, *, storage_only: bool = False) -> Iterator[None]:
    """Turn the filesystem refusing a write inside the block (:func:`filesystem_reason`) into one :class:`InputError` line.

    ``storage_only``: only a full disk, a quota or a read-only filesystem (for
    blocks that also read inputs, where a permission error may be a read's).
    """
    try:
        yield
    except InputError:
        raise
    except Exception as error:
        reason = filesystem_reason(error, frozenset(_STORAGE_ERRNOS) if storage_only else WRITE_ERRNOS)
        if reason is None:
            target = real_path(path).parent
            with contextlib.suppress(OSError):  # GDAL says only "write failed": a full disk is the usual cause
                if "rasterio" in type(error).__module__ and shutil.disk_usage(target).free < 1 << 20:
                    reason = os.strerror(errno.ENOSPC)
        if reason is None:
            raise
        raise InputError(write_error(path, reason)) from None


@contextlib.contextmanager
def create(
    path: str | os.PathLike,
    kind: str,
    *,
    inputs: Iterable[Any] = (),
    overwrite: bool = False,
    size: int = 0,
    lock: bool = False,
    directory: bool | None = None,
    what: str = "output",
) -> Iterator[Path]:
    """Write a ``kind`` output at ``path`` whole or not at all: yields the temporary path to write.

    :func:`claim` first (again under the output's lock when ``lock``), stale
    temporaries cleaned, then the caller writes the yielded temporary: an
    empty folder already made for folder kinds (or with ``directory=True``),
    a path to create otherwise (zarr stores, single files). Then the marker is
    stamped (folder kinds) and the temporary renamed over ``path``. On any
    error the temporary is removed and ``path`` is as before; filesystem
    refusals become one line (:func:`os_errors_as_input`).
    """
    folder = KINDS[kind] == "folder" if directory is None else directory
    target = claim(path, kind, inputs=inputs, overwrite=overwrite, size=size, what=what)
    with output_lock(path, inputs=inputs) if lock else contextlib.nullcontext():
        if lock:  # the state may have changed while another writer held it
            target = claim(path, kind, inputs=inputs, overwrite=overwrite, size=size, what=what)
        with os_errors_as_input(path):
            target.parent.mkdir(parents=True, exist_ok=True)
            clean_stale(target)
            tmp = temporary_sibling(target)
            try:
                if folder:
                    tmp.mkdir()
                yield tmp
                if KINDS[kind] == "folder":
                    mark_folder(tmp, kind)
                # again at the rename, which may come hours later: a folder or file put at the output meanwhile
                # (another tool writing there, a user's copy) was moved aside and deleted
                claim(path, kind, inputs=inputs, overwrite=overwrite, what=what)
                replace_path(tmp, target)
            except BaseException as error:
                _remove(tmp)
                if not isinstance(error, Exception):
                    _remove_late_writes(tmp)
                raise


def _remove_late_writes(tmp: Path, settle: float = 0.15, limit: float = 2.0) -> None:
    """Remove ``tmp`` again while writes still land in it, until none has for ``settle`` seconds.

    An interrupt (Ctrl-C, SIGTERM) stops the main thread, not a write already
    in flight: zarr's IO thread finishes a metadata or chunk write after the
    temporary was removed and recreates it (a hidden half-written store was
    left after about one early Ctrl-C of ingest in four).
    """
    deadline = time.monotonic() + limit
    quiet_since = time.monotonic()
    while time.monotonic() - quiet_since < settle and time.monotonic() < deadline:
        time.sleep(0.03)
        if os.path.lexists(tmp):
            _remove(tmp)
            quiet_since = time.monotonic()


# ------------------------------------------------------------------------ locks


_HELD: dict[tuple[Path, int], int] = {}
"""(lock file, thread id) -> nesting depth: re-entrant within one thread, exclusive between threads."""


def lock_path(path: str | os.PathLike) -> Path:
    target = real_path(path)
    return target.parent / f".{sibling_stem(target.name)}.lock"


def _read_lock(lock: Path) -> dict[str, Any] | None:
    """The lock's record; None without a lock, {} for an unreadable one."""
    try:
        data = json.loads(lock.read_text())
        return data if isinstance(data, dict) and isinstance(data.get("pid"), int) else {}
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}


UNREADABLE_GRACE = 2.0
"""Seconds an empty lock is waited on before it counts as left by a killed writer and is taken over: on a
filesystem without hard links a lock is created empty and written just after (:func:`_create_lock`), and an
earlier release of tilefuse always did so. A lock file holding anything but a record, or a folder by that name,
is not tilefuse's: it is refused, never removed (:func:`_unwritten_lock`)."""

_NO_HARD_LINKS = frozenset({errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK, errno.EXDEV})


def _create_lock(lock: Path, record: str) -> bool:
    """Create ``lock`` holding ``record`` in one step; False when it exists.

    The record is written under a temporary name and hard-linked into place, so
    no reader ever finds the lock empty. (Created with ``O_EXCL`` and written
    after, it was empty for a moment; a second writer reading it then took the
    "unreadable" lock over, and both wrote the output.) Where the filesystem has
    no hard links, ``O_EXCL`` and write, and readers give an unreadable lock
    :data:`UNREADABLE_GRACE` seconds (:func:`_settled_holder`).
    """
    new = lock.with_name(f"{lock.name}.new-{uuid.uuid4().hex[:6]}")
    try:
        new.write_text(record)
        os.link(new, lock)
        return True
    except FileExistsError:
        return False
    except OSError as error:
        if error.errno not in _NO_HARD_LINKS:
            raise
    finally:
        new.unlink(missing_ok=True)
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as handle:
        handle.write(record)
    return True


def _settled_holder(lock: Path) -> dict[str, Any] | None:
    """:func:`_read_lock`, re-read while the lock is unreadable and younger than :data:`UNREADABLE_GRACE`."""
    for _ in range(int(UNREADABLE_GRACE / 0.05) + 1):
        holder = _read_lock(lock)
        if holder != {}:
            return holder
        try:
            age = time.time() - lock.stat().st_mtime
        except OSError:
            continue  # gone meanwhile: the next read says so
        if not 0 <= age < UNREADABLE_GRACE:  # old (or the clock moved): damaged
            return holder
        time.sleep(0.05)
    return _read_lock(lock)


def _unwritten_lock(path: Path) -> bool:
    """Whether ``path``, a lock (or a copy of one) that holds no record, is one tilefuse made and never wrote: an
    empty file (:func:`_create_lock` without hard links, killed between creating and writing it). A file with
    anything else in it, or a folder, is not tilefuse's, and is never removed or moved."""
    try:
        info = path.lstat()
    except OSError:
        return False
    return stat.S_ISREG(info.st_mode) and info.st_size == 0


def _remove_dead_lock_copies(lock: Path) -> None:
    """Remove the ``.new-`` and ``.stale-`` copies of ``lock`` that a writer killed mid-acquisition left: those
    naming a dead process on this host, and unreadable ones older than :data:`UNREADABLE_GRACE`."""
    copy = re.compile(re.escape(lock.name) + r"\.(new|stale)-[0-9a-f]{6}")
    for path in lock.parent.iterdir():
        if not copy.fullmatch(path.name):
            continue
        holder = _read_lock(path)
        try:
            if holder == {}:
                dead = _unwritten_lock(path) and not 0 <= time.time() - path.stat().st_mtime < UNREADABLE_GRACE
            else:
                dead = holder is not None and holder.get("host") == _host() and not process_alive(holder["pid"], holder.get("start"))
            if dead:
                path.unlink(missing_ok=True)
        except OSError:
            continue  # gone meanwhile, or not ours to remove


def live_writer(path: str | os.PathLike) -> str | None:
    """Who holds the lock of output ``path`` while writing it ("process N" or "process N on HOST"), None when
    no live process does (no lock, or a dead writer's: the store stays as that writer left it)."""
    holder = _read_lock(lock_path(path))
    if not holder:
        return None
    if holder.get("host") != _host():
        return f"process {holder['pid']} on {holder.get('host')}"
    return f"process {holder['pid']}" if process_alive(holder["pid"], holder.get("start")) else None


@contextlib.contextmanager
def output_lock(path: str | os.PathLike, *, inputs: Iterable[Any] = ()) -> Iterator[Path]:
    """Hold the lock of output ``path`` for the block (re-entrant in one thread); yields the lock file.

    A lock held by a live process is refused with one line naming it; one
    left by a dead process on this host (pid gone, or another process under
    its pid) is taken over. ``inputs`` are checked first, so no lock file is
    ever made inside an input.
    """
    check_inputs(path, inputs)
    lock = lock_path(path)
    key = (lock, threading.get_ident())
    if _HELD.get(key):
        _HELD[key] += 1
        try:
            yield lock
        finally:
            _HELD[key] -= 1
        return
    pid, start = current_process()
    record = json.dumps({"pid": pid, "host": _host(), "start": start, "output": str(real_path(path))})
    created = False  # (another thread of this process may hold the lock: same record, not ours to remove)
    try:  # from here on, an interrupt (Ctrl-C as the lock appears) also removes the lock we made
        with os_errors_as_input(path):
            lock.parent.mkdir(parents=True, exist_ok=True)
            for _ in range(3):
                created = _create_lock(lock, record)
                if not created:
                    holder = _settled_holder(lock)
                    if holder is None:
                        continue  # released meanwhile
                    if holder and holder.get("host") != _host():
                        raise InputError(
                            f"{path} is being written by process {holder['pid']} on {holder.get('host')} (lock {lock}): "
                            "wait for it to finish, or delete the lock file if that process is gone"
                        ) from None
                    if holder and process_alive(holder["pid"], holder.get("start")):
                        raise InputError(
                            f"{path} is being written by process {holder['pid']} (lock {lock}): "
                            "wait for it to finish or choose another output"
                        ) from None
                    if holder == {} and not _unwritten_lock(lock):
                        raise InputError(
                            f"{lock} is in the way of the lock of {path}: it is not a lock tilefuse wrote (tilefuse never "
                            "leaves one that is not its record, or empty); move it away, or choose another output"
                        ) from None
                    # a dead writer's (or an empty) lock: take it over
                    stale = lock.with_name(f"{lock.name}.stale-{uuid.uuid4().hex[:6]}")
                    try:
                        os.replace(lock, stale)
                    except FileNotFoundError:
                        continue
                    if _read_lock(stale) != holder:  # another writer took it over first: give its lock back
                        with contextlib.suppress(OSError):
                            os.link(stale, lock)
                    stale.unlink(missing_ok=True)
                    continue
                break
            else:
                raise InputError(f"{path} is being locked and unlocked by other writers (lock {lock}): retry, or choose another output")
            _remove_dead_lock_copies(lock)
        _HELD[key] = 1
        yield lock
    finally:
        _HELD.pop(key, None)
        if created and _read_lock(lock) == json.loads(record):
            lock.unlink(missing_ok=True)


def holds_output(param: str, *, inputs: tuple[str, ...] = ()) -> Callable:
    """Decorator: hold :func:`output_lock` on the output named by parameter ``param`` for the whole call.

    A full disk, quota or read-only filesystem met anywhere in the call (e.g.
    while blocks are written in place) ends as one :class:`InputError` line.

    ``inputs`` name the parameters holding the call's input paths (paths or
    lists of paths); they are checked against the output before the lock file
    is made. The wrapped function does its own :func:`claim`.
    """

    def decorate(function: Callable) -> Callable:
        signature = inspect.signature(function)

        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            out = bound.arguments[param]
            with output_lock(out, inputs=[bound.arguments.get(name) for name in inputs]), os_errors_as_input(out, storage_only=True):
                return function(*args, **kwargs)

        return wrapper

    return decorate
