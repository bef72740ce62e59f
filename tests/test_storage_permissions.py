"""A store file the filesystem refuses to read is "cannot be read", never "damaged".

A metadata file (the root ``zarr.json``, an array's ``zarr.json``, ``chunk_digests.npz``, a shard index) or a chunk
that a user may not read (chmod 000 on it, a folder on its way without search permission) or that the disk fails
to read (EIO) was reported as a corrupt store to be written again with ``--overwrite`` (which would destroy a good
store), or escaped as a PermissionError that the CLI's safety net took for a failed *write* ("cannot write ...:
choose another output") from read-only commands. Each is one line naming the file, the OS's reason and the fix:
the permissions of the file, or of the folder that cannot be searched.

Tests run as root, whom permission bits do not stop, so the refusal is simulated: :func:`refuse` makes opening a
file (and, for a folder without search permission, opening or stat-ing anything inside it) raise the OSError a
user without the permission gets.
"""

from __future__ import annotations

import asyncio
import builtins
import errno
import io
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr

from test_damaged_storage import PREDICT, pristine  # noqa: F401  (pristine: the module's stores, a fixture)

from tilefuse import storage
from tilefuse.cli import main
from tilefuse.errors import InputError
from tilefuse.storage import chunk_key

MISDIAGNOSES = ("damaged", "corrupt", "--overwrite", "re-ingest", "cannot write", "missing", "Traceback")


def refuse(monkeypatch, target: Path, code: int = errno.EACCES, *, folder: bool = False) -> None:
    """Make the filesystem refuse to read ``target``: opening it raises OSError ``code`` (a file: chmod 000, or an
    I/O error); with ``folder``, ``target`` is a folder without search permission (chmod a-x): opening or stat-ing
    anything inside it raises, the folder itself still stats."""
    target = os.path.realpath(target)
    real_open, real_stat = io.open, os.stat

    def refused(file) -> bool:
        if isinstance(file, int):
            return False
        path = os.path.realpath(os.fspath(file))
        return path.startswith(target + os.sep) if folder else path == target

    def fail(file):
        raise OSError(code, os.strerror(code), os.fspath(file))

    def fake_open(file, *args, **kwargs):
        if refused(file):
            fail(file)
        return real_open(file, *args, **kwargs)

    def fake_stat(file, *args, **kwargs):
        if folder and refused(file):
            fail(file)
        return real_stat(file, *args, **kwargs)

    monkeypatch.setattr(io, "open", fake_open)
    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(os, "stat", fake_stat)


def one_line(err: str) -> str:
    """The one error line on stderr (progress bars aside)."""
    lines = [line for line in err.splitlines() if "|" not in line and line.strip()]  # tqdm bars have a '|'
    assert len(lines) == 1 and lines[0].startswith("tilefuse: error:"), err
    return lines[0]


def a_read_error(line: str, what: str, fix: str) -> None:
    """``line`` says that ``what`` cannot be read and ``fix``, and nothing that calls the store damaged."""
    assert f"{what} cannot be read: " in line and fix in line, line
    assert not any(word in line for word in MISDIAGNOSES), line


def read_first(message: str, store: Path, unit: str, name: str) -> str:
    """How ``message`` should name the key of array ``name`` it names (zarr reads several keys at once, and any
    may be the first to fail)."""
    found = re.search(rf"{unit} \((\d+), (\d+)\) of", message)
    assert found, message
    return f"{store}: {unit} ({found[1]}, {found[2]}) of {name!r} ({name}/c/{found[1]}/{found[2]})"


PERMISSION = "Permission denied; fix its permissions (chmod, or ask its owner)"
DISK = "Input/output error; check the disk or filesystem it is on"


def folder_fix(store: Path, folder: str) -> str:
    return f"Permission denied; fix the permissions of the folder {store / folder}, which cannot be searched"


def copy_of(pristine, tmp_path: Path, layout: str = "chunks") -> Path:
    _, stores, _, _ = pristine
    store = tmp_path / "scene.zarr"
    shutil.copytree(stores[layout], store)
    return store


@pytest.mark.parametrize(
    "target, folder, code, what",
    [
        ("label/zarr.json", False, errno.EACCES, "the metadata of array 'label' (label/zarr.json)"),
        ("label", True, errno.EACCES, "the metadata of array 'label' (label/zarr.json)"),
        ("x/zarr.json", False, errno.EACCES, "the metadata of array 'x' (x/zarr.json)"),
        ("label/zarr.json", False, errno.EIO, "the metadata of array 'label' (label/zarr.json)"),
        ("chunk_digests.npz", False, errno.EACCES, "its record of where each chunk belongs (chunk_digests.npz)"),
        ("chunk_digests.npz", False, errno.EIO, "its record of where each chunk belongs (chunk_digests.npz)"),
    ],
)
def test_metadata_that_cannot_be_read_is_one_line_for_info_and_predict(pristine, tmp_path, capsys, monkeypatch, target, folder, code, what):
    """`label/` mode 000 read as another user: info, info --no-verify and predict all said 'the metadata of array
    'label' (label/zarr.json) is damaged: the store is corrupt ..., write it again with --overwrite'."""
    _, _, checkpoint, _ = pristine
    store = copy_of(pristine, tmp_path)
    out = tmp_path / "p.zarr"
    fix = DISK if code == errno.EIO else folder_fix(store, target) if folder else PERMISSION
    refuse(monkeypatch, store / target, code, folder=folder)
    commands = [["info", str(store)], ["info", str(store), "--no-verify"],
                ["predict", "--checkpoint", str(checkpoint), "--store", str(store), "--out", str(out), *PREDICT]]
    for args in commands:
        capsys.readouterr()
        assert main(args) == 2, args
        a_read_error(one_line(capsys.readouterr().err), f"{store}: {what}", fix)
    assert not out.exists()
    monkeypatch.undo()
    assert main(["info", str(store)]) == 0  # the store was intact all along


@pytest.mark.parametrize("name", ["labels", "block_done"])
def test_prediction_metadata_that_cannot_be_read_is_one_line_for_evaluate(pristine, tmp_path, capsys, monkeypatch, name):
    _, stores, _, pred = pristine
    store = tmp_path / "pred.zarr"
    shutil.copytree(pred, store)
    refuse(monkeypatch, store / name / "zarr.json")
    assert main(["evaluate", str(store), "--labels", str(stores["chunks"])]) == 2
    a_read_error(one_line(capsys.readouterr().err), f"{store}: the metadata of array {name!r} ({name}/zarr.json)", PERMISSION)


@pytest.mark.parametrize("case", ["file", "folder", "eio"])
def test_a_root_zarr_json_that_cannot_be_read_is_an_input_error_not_a_permission_error(pristine, tmp_path, monkeypatch, case):
    """Root `zarr.json` mode 000 (or the store's folder without search permission): the PermissionError escaped
    every reader of storage, and the CLI said 'cannot write s.zarr/zarr.json: ... choose another output'."""
    store = copy_of(pristine, tmp_path)
    if case == "folder":
        refuse(monkeypatch, store, folder=True)
        fix = folder_fix(store.parent, store.name)
    else:
        refuse(monkeypatch, store / "zarr.json", errno.EIO if case == "eio" else errno.EACCES)
        fix = DISK if case == "eio" else PERMISSION
    import tilefuse

    for read in (storage.open_group, storage.open_dataset, storage.verify_store, tilefuse.open_scene, tilefuse.info):
        with pytest.raises(InputError) as caught:
            read(store)
        a_read_error(str(caught.value), f"{store}: its metadata file zarr.json", fix)


@pytest.mark.parametrize("layout", ["chunks", "shards"])
def test_a_chunk_folder_without_search_permission_is_unreadable_not_missing(pristine, tmp_path, capsys, monkeypatch, layout):
    """`label/c` without search permission: info's check of every chunk said 'cannot write scene.zarr/label/c/0/0:
    Permission denied: choose another output' (Path.is_file raised; from Python 3.13 it reads as a missing chunk),
    and predict's repair check (key_problem) raised it."""
    store = copy_of(pristine, tmp_path, layout)
    refuse(monkeypatch, store / "label" / "c", folder=True)
    unit = "shard" if layout == "shards" else "chunk"
    assert main(["info", str(store)]) == 2
    a_read_error(one_line(capsys.readouterr().err), f"{store}: {unit} (0, 0) of 'label' (label/c/0/0)", folder_fix(store, "label/c"))
    check = storage.verified_store(store).checks["label"]
    assert storage.key_problem(store, check, (0, 0)) == "unreadable (Permission denied)"
    with pytest.raises(InputError) as caught:  # zarr reads the keys at once: any may be the first to fail
        storage.open_group(store)["label"][...]
    a_read_error(str(caught.value), read_first(str(caught.value), store, unit, "label"), folder_fix(store, "label/c"))


def test_a_shard_index_that_cannot_be_read_is_one_line(pristine, tmp_path, monkeypatch):
    """A shard's index read apart from its chunk (the record of where the chunk belongs is checked by it) escaped
    as a PermissionError; read by zarr it was already one line."""
    from zarr.abc.store import RangeByteRequest, SuffixByteRequest
    from zarr.core.buffer import default_buffer_prototype

    store = copy_of(pristine, tmp_path, "shards")
    verified = storage.verified_store(store)
    check = verified.checks["label"]
    key = chunk_key("label", (0, 0))
    data = np.frombuffer((store / key).read_bytes(), np.uint8)
    offset, length = np.frombuffer(data[-(check.inner * 16 + 4) : -4].tobytes(), "<u8").reshape(-1, 2)[0]
    inner = verified._store
    real_get = inner.get

    async def get(key, prototype, byte_range=None):
        if isinstance(byte_range, SuffixByteRequest):  # the index
            raise PermissionError(errno.EACCES, "Permission denied", str(store / key))
        return await real_get(key, prototype, byte_range)

    monkeypatch.setattr(inner, "get", get)
    what = f"{store}: shard (0, 0) of 'label' (label/c/0/0)"
    with pytest.raises(InputError) as caught:  # one chunk of the shard, its index not read before
        asyncio.run(verified.get(key, default_buffer_prototype(), RangeByteRequest(int(offset), int(offset + length))))
    a_read_error(str(caught.value), what, PERMISSION)
    with pytest.raises(InputError) as caught:  # zarr reading the shards (any first): each its index first
        zarr.open_group(verified, mode="r", zarr_format=3, use_consolidated=verified.consolidated)["label"][...]
    a_read_error(str(caught.value), read_first(str(caught.value), store, "shard", "label"), PERMISSION)
