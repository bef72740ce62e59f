"""Output names as long as the filesystem allows: the guarded writer's temporaries and locks fit beside them."""

import os

import pytest

from tilefuse import outputs
from tilefuse.cli import main
from tilefuse.errors import InputError

NAME_MAX = 255


def _name(length: int, suffix: str = ".zarr", char: str = "a") -> str:
    """A file name of ``length`` bytes in UTF-8 ending in ``suffix``."""
    stem = char * ((length - len(suffix.encode())) // len(char.encode()))
    return stem + "a" * (length - len((stem + suffix).encode())) + suffix


@pytest.mark.parametrize("length", [200, 215, 240, 255])
@pytest.mark.parametrize("char", ["a", "é", "水"])
def test_sibling_names_fit_the_name_limit_and_stay_distinct(length, char, tmp_path):
    out = tmp_path / _name(length, char=char)
    other = tmp_path / (_name(length, char=char)[:-6] + "b.zarr")
    names = [outputs.temporary_sibling(out, "tmp"), outputs.temporary_sibling(out, "old"), outputs.lock_path(out)]
    for path in names:
        assert len(path.name.encode()) + len(".stale-abcdef") <= NAME_MAX, path.name
    assert all(outputs.is_temporary(p) for p in names[:2])
    assert outputs.lock_path(out) != outputs.lock_path(other)  # each output its own lock
    assert outputs.temporary_sibling(out).name.split(".tmp-")[0] != outputs.temporary_sibling(other).name.split(".tmp-")[0]


@pytest.mark.parametrize("length", [215, 230, 255])
def test_a_store_with_a_long_name_is_written_replaced_and_cleaned(length, tmp_path, capsys):
    name = _name(length)
    assert main(["synth", str(tmp_path / name), "--size", "32"]) == 0, capsys.readouterr().err
    assert main(["synth", str(tmp_path / name), "--size", "32", "--overwrite", "--seed", "1"]) == 0, capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == [name]
    assert outputs.found_kind(tmp_path / name) == "scene"
    # a dead writer's temporary of that output is recognised and cleaned by the next run
    dead = outputs.temporary_sibling(tmp_path / name)
    dead = dead.with_name(dead.name.replace(f"-{os.getpid()}-", "-4194303-"))
    dead.mkdir()
    assert main(["synth", str(tmp_path / name), "--size", "32", "--overwrite"]) == 0, capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == [name]


@pytest.mark.parametrize("name", ["a" * 256 + ".zarr", "é" * 130 + ".zarr"])
def test_a_name_longer_than_the_filesystem_allows_is_one_line(name, tmp_path, capsys):
    assert main(["synth", str(tmp_path / name), "--size", "32"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "255" in err and "shorter name" in err, err
    assert os.listdir(tmp_path) == []
    with pytest.raises(InputError, match="shorter name"):
        outputs.claim(tmp_path / name / "inner.zarr", "scene")
