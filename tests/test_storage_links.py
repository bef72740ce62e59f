"""Outputs reached through symlinks: a live link is written through, a dangling one is refused."""

import os

import pytest

from tilefuse import outputs
from tilefuse.cli import main
from tilefuse.errors import InputError


def _tree(root):
    return sorted(os.path.relpath(os.path.join(d, n), root) for d, ds, fs in os.walk(root) for n in ds + fs)


@pytest.mark.parametrize("where", ["output", "parent"])
def test_a_dangling_symlink_in_an_output_path_is_one_line_and_nothing_is_created_at_its_target(where, tmp_path, capsys):
    """A link to a disk that is not mounted (or a folder since removed): its target's folders were created on
    whatever filesystem holds them and the whole output written there."""
    gone = tmp_path / "unmounted" / "disk"
    link = tmp_path / "link"
    link.symlink_to(gone)
    out = link if where == "output" else link / "sub" / "s.zarr"
    for args in (["synth", str(tmp_path / "s.zarr"), "--size", "32", "--geotiff", str(out if where == "output" else out.parent)],
                 ["synth", str(out), "--size", "32"]):
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "does not exist" in err and "symlink" in err, err
    assert _tree(tmp_path) == ["link"] and not (tmp_path / "unmounted").exists()
    with pytest.raises(InputError, match="symlink"):
        outputs.claim(out, "scene")


def test_a_live_symlink_to_an_output_is_written_through_and_kept(tmp_path, capsys):
    real = tmp_path / "data" / "s.zarr"
    assert main(["synth", str(real), "--size", "32"]) == 0
    link = tmp_path / "s.zarr"
    link.symlink_to(real)
    assert main(["synth", str(link), "--size", "32", "--seed", "1", "--overwrite"]) == 0, capsys.readouterr().err
    assert link.is_symlink() and os.readlink(link) == str(real) and outputs.found_kind(real) == "scene"
    assert sorted(os.listdir(tmp_path / "data")) == ["s.zarr"]


@pytest.mark.parametrize("kind", ["loop", "cycle", "dangling"])
def test_a_store_given_through_a_broken_symlink_says_what_is_wrong(kind, tmp_path, capsys):
    """A symlink loop given as a store was 'loop1 does not exist: check the path'; a link to nothing named the
    link only."""
    import tilefuse

    link = tmp_path / "link.zarr"
    if kind == "loop":
        link.symlink_to(link)
    elif kind == "cycle":
        link.symlink_to(tmp_path / "other")
        (tmp_path / "other").symlink_to(link)
    else:
        link.symlink_to(tmp_path / "unmounted" / "s.zarr")
    said = "is a symlink loop" if kind != "dangling" else f"is a symlink to {tmp_path / 'unmounted' / 's.zarr'}, which does not exist"
    for call in (tilefuse.open_scene, tilefuse.open_prediction):
        with pytest.raises(InputError, match=f"^{link} {said}"):
            call(link)
    assert main(["info", str(link)]) == 2
    assert capsys.readouterr().err.count("\n") == 1
