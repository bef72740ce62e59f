"""An output that is a mount point: it cannot be renamed into place, so it is refused before any work."""

import os

import pytest
from fs_fixtures import tmpfs

from tilefuse import outputs
from tilefuse.cli import main
from tilefuse.errors import InputError


@pytest.fixture
def mount_point(tmp_path):
    """An empty tmpfs mounted at tmp_path/out (root only), unmounted afterwards."""
    with tmpfs(tmp_path / "out", "4m") as mount:
        yield mount


def test_an_empty_mount_point_as_a_folder_output_is_one_line_before_any_work(mount_point, tmp_path, capsys):
    """It was written in full on the parent's filesystem (the wrong disk), then renaming it over the mount point
    ended in an EBUSY traceback."""
    for args in (["synth", str(tmp_path / "s.zarr"), "--size", "32", "--geotiff", str(mount_point)],
                 ["synth", str(mount_point), "--size", "32", "--overwrite"]):
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "mount point" in err and "Traceback" not in err, err
    assert sorted(os.listdir(tmp_path)) == ["out"] and os.listdir(mount_point) == []
    assert os.path.ismount(mount_point)
    with pytest.raises(InputError, match="mount point"):
        outputs.claim(mount_point, "run", what="out=")
    # a new folder inside it is the way
    assert main(["synth", str(tmp_path / "s.zarr"), "--size", "32", "--geotiff", str(mount_point / "tifs")]) == 0
    assert outputs.found_kind(mount_point / "tifs") == "geotiff-folder"
