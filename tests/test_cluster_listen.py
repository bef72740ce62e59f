"""``listen=`` (``--listen``): the host a cluster started here (``local:N``, ``cuda``) puts its scheduler, workers and
dashboard on. A value no server can bind (another machine's address, a name that does not resolve, a host with a
port) failed deep in distributed's start: ``RuntimeError: Cluster failed to start: [Errno 99] Cannot assign
requested address`` after a hundred lines of traceback, exit status 1. Now it is one line naming the value and the
fix, before anything starts, and a start failure that the check could not foresee is one line too."""

import re
import subprocess
import sys
from pathlib import Path

import dask
import distributed
import pytest
from predict_fixtures import save_pointwise, write_test_scene

from tilefuse.cluster import client as cluster_client
from tilefuse.cluster.client import LOOPBACK, make_client
from tilefuse.errors import InputError

TESTS = Path(__file__).resolve().parent

REFUSED = {
    "8.8.8.8": r"8\.8\.8\.8 is not an address of this machine",  # another machine's address
    "no such host": r"neither an IPv4 address nor a host name that resolves",
    "999.1.1.1": r"",  # not an IP address; a resolver that answers every name gives another machine's address
    "localhost:80": r"it has a port.*write the host alone, e\.g\. --listen localhost \(Python: listen='localhost'\)",
    "0.0.0.0:8786": r"it has a port.*--listen 0\.0\.0\.0 ",
    "127.0.0.1:": r"it has a port",
    "[::1]:80": r"it has a port.*--listen 127\.0\.0\.1 ",
    "::1": r"listens on IPv4 only",  # dask's dashboard takes no IPv6 address
    "a:b:c": r"neither a host name nor an IPv4 address",
    "tcp://0.0.0.0": r"no URL",
}


@pytest.fixture
def nothing_starts(monkeypatch):
    """make_client may check, never start: distributed's Client fails the test if it is made."""

    def start(*args, **kwargs):
        raise AssertionError("a cluster was started for a listen address that cannot work")

    monkeypatch.setattr(distributed, "Client", start)


@pytest.mark.parametrize("listen", list(REFUSED))
def test_a_listen_address_no_server_can_bind_is_one_line_before_anything_starts(listen, nothing_starts):
    with pytest.raises(InputError) as refused:
        make_client("local:1", listen=listen)
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith(f"bad listen address {listen!r} (--listen; Python: listen=): "), message
    assert "127.0.0.1" in message or "write the host alone" in message, "the fix names what works"
    assert re.search(REFUSED[listen], message), message


def test_a_listen_address_that_is_not_text_is_one_line(nothing_starts):
    with pytest.raises(InputError, match=r"^bad listen address 8786 \(--listen; Python: listen=\): a host is text, not int: give"):
        make_client("local:1", listen=8786)


@pytest.mark.parametrize("listen", ["127.0.0.1", " 127.0.0.1 ", "localhost", "0.0.0.0"])
def test_addresses_of_this_machine_pass(listen):
    assert cluster_client._check_listen(listen) == listen.strip()
    assert cluster_client._check_listen(LOOPBACK) == "127.0.0.1", "the default stays loopback only"


def test_a_start_failure_the_check_could_not_foresee_is_one_line(monkeypatch, capfd):
    """An address that passed the check but no longer binds when the cluster starts (an interface gone meanwhile):
    one line naming listen=, dask's default scheduler left as it was and the client that never was closed (left to
    its __del__, it waited 60 s at the interpreter's exit and printed a TimeoutError traceback)."""
    from distributed import client as dask_client

    monkeypatch.setattr(cluster_client, "_check_listen", lambda listen: listen.strip())
    default = dask.config.get("scheduler", None)
    clients = set(map(id, dask_client._global_clients.values()))
    for listen in ("8.8.8.8", "no such host"):
        with pytest.raises(InputError, match=rf"^bad listen address '{listen}' \(--listen; Python: listen=\): the cluster could not listen on {listen} \(.+\): give an address of this machine, e\.g\. 127\.0\.0\.1"):
            make_client("local:1", listen=listen)
    assert dask.config.get("scheduler", None) == default
    assert set(map(id, dask_client._global_clients.values())) <= clients, "the failed client stayed dask's default"
    err = capfd.readouterr().err
    assert "Traceback" not in err and "distributed." not in err, err  # 'Cluster closed without starting up' too


@pytest.mark.parametrize("listen", ["8.8.8.8", "localhost:80"])
def test_predict_with_a_listen_address_that_cannot_work_says_one_line_and_leaves_nothing(tmp_path, listen):
    scene = write_test_scene(tmp_path / "scene.zarr", 64, 64)
    checkpoint = save_pointwise(tmp_path / "ckpt")
    before = sorted(tmp_path.rglob("*"))
    out = tmp_path / "pred.zarr"
    code = f"import sys; sys.path.insert(0, {str(TESTS)!r}); import predict_fixtures; from tilefuse.cli import entry; entry()"
    args = ["predict", "--checkpoint", checkpoint, "--store", scene, "--out", out, "--cluster", "local:1", "--listen", listen, "--tile", "32"]
    done = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, timeout=240)
    lines = done.stderr.splitlines()
    assert done.returncode == 2 and len(lines) == 1, (done.returncode, done.stderr[-3000:])
    assert lines[0].startswith(f"tilefuse: error: bad listen address '{listen}' (--listen; Python: listen=): "), lines
    assert not out.exists() and sorted(tmp_path.rglob("*")) == before, "a refused run left something behind"
