"""A reader that stops reading (``tilefuse models | head -1``, ``| true``) ends tilefuse quietly."""

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(os.name != "posix", reason="pipes and SIGPIPE are POSIX")


def _closed_stdout(args, cwd):
    """Run ``tilefuse ARGS`` with its stdout a pipe closed before anything is read; (status, stderr)."""
    read, write = os.pipe()
    os.close(read)  # the reader is gone before tilefuse writes a byte
    try:
        done = subprocess.run(
            [sys.executable, "-c", "import sys; from tilefuse.cli import main; sys.exit(main())", *args],
            stdout=write, stderr=subprocess.PIPE, cwd=cwd, timeout=120, text=True,
        )
    finally:
        os.close(write)
    return done.returncode, done.stderr


@pytest.mark.parametrize("args", [["models"], ["models", "--json"], ["--help"], ["info", "--help"]])
def test_a_closed_stdout_ends_quietly_with_the_sigpipe_status(args, tmp_path):
    status, stderr = _closed_stdout(args, tmp_path)
    assert stderr == ""
    assert status == 141  # 128 + SIGPIPE: what the shell reports for `yes | head`, so pipefail sees a cut output


def test_a_closed_stdout_of_info_ends_quietly(tmp_path):
    from tilefuse.scene import write_scene
    from tilefuse.synthetic import synth_scene

    write_scene(synth_scene(64), tmp_path / "s.zarr")
    status, stderr = _closed_stdout(["info", "s.zarr"], tmp_path)
    assert (status, stderr) == (141, "")
    assert not list(tmp_path.glob("*.png"))


def test_a_pipe_read_to_the_end_is_a_normal_exit(tmp_path):
    done = subprocess.run(
        [sys.executable, "-c", "import sys; from tilefuse.cli import main; sys.exit(main())", "models"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path, timeout=120, text=True,
    )
    assert (done.returncode, done.stderr) == (0, "")
    assert "pad" in done.stdout


def test_a_stdout_closed_from_the_start_is_no_traceback(tmp_path):
    """`tilefuse models >&-`: Python starts with sys.stdout None; the final flush was an AttributeError traceback."""
    done = subprocess.run(
        [sys.executable, "-c", "import sys; from tilefuse.cli import main; sys.exit(main(sys.argv[1:]))", "models"],
        stderr=subprocess.PIPE, cwd=tmp_path, timeout=120, text=True, preexec_fn=lambda: os.close(1),
    )
    assert "Traceback" not in done.stderr and done.returncode in (0, 141), (done.returncode, done.stderr)
