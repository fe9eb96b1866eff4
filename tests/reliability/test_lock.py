"""One writer per directory (ckpt_callbacks/_manager/_lock.py): refused, taken over when stale, re-entrant in-process."""

from __future__ import annotations

import errno
import gc
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from ckpt_callbacks import CheckpointManager, CheckpointWriteError
from ckpt_callbacks._manager import _lock
from ckpt_callbacks._manager._lock import LOCK_FILE_NAME

pytestmark = pytest.mark.timeout(120)

_TRY = textwrap.dedent(
    """
    import sys
    from ckpt_callbacks import CheckpointManager, CheckpointWriteError
    try:
        m = CheckpointManager(sys.argv[1])
    except CheckpointWriteError as e:
        print("REFUSED", e.errno, e)
        sys.exit(3)
    m.save({"x": 1}, step=int(sys.argv[2]) if len(sys.argv) > 2 else 1)
    m.close()
    print("OK")
    """
)


def _try_in_other_process(directory, step=1) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", _TRY, str(directory), str(step)], capture_output=True, text=True, timeout=60
    )


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_second_process_is_refused_with_a_clear_error(tmp_path):
    d = tmp_path / "run"
    with CheckpointManager(str(d)) as mgr:
        mgr.save({"x": 0}, step=0)
        r = _try_in_other_process(d)
        assert r.returncode == 3, r.stdout + r.stderr
        assert f"REFUSED {errno.EBUSY}" in r.stdout
        assert f"process {os.getpid()}" in r.stdout and socket.gethostname() in r.stdout
        assert "delete the lock file" in r.stdout and LOCK_FILE_NAME in r.stdout
        holder = json.loads((d / LOCK_FILE_NAME).read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    assert not (d / LOCK_FILE_NAME).exists()  # released on close
    assert _try_in_other_process(d, 2).returncode == 0


def test_lock_of_a_killed_writer_is_taken_over(tmp_path):
    d = tmp_path / "run"
    code = (
        f"import os,signal; from ckpt_callbacks import CheckpointManager as C; m=C({str(d)!r}); "
        "m.save({'x':1},step=1); os.kill(os.getpid(), signal.SIGKILL)"
    )
    r = subprocess.run([sys.executable, "-c", code], timeout=60)
    assert r.returncode == -signal.SIGKILL
    assert json.loads((d / LOCK_FILE_NAME).read_text())["pid"] != os.getpid()  # the dead writer's
    with CheckpointManager(str(d)) as mgr:
        assert json.loads((d / LOCK_FILE_NAME).read_text())["pid"] == os.getpid()
        assert mgr.latest_checkpoint.endswith("ckpt-1")


def test_lock_inherited_by_a_forked_child_does_not_outlive_the_writer(tmp_path):
    """A writer killed while a forked child (say a DataLoader worker) lives on must not keep the lock."""
    d = tmp_path / "run"
    code = textwrap.dedent(
        f"""
        import os, signal, time
        from ckpt_callbacks import CheckpointManager
        m = CheckpointManager({str(d)!r})
        if os.fork() == 0:
            time.sleep(30)
            os._exit(0)
        print("forked", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    p = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        assert p.stdout.readline().strip() == "forked"
        p.wait(60)
        r = _try_in_other_process(d)
        assert r.returncode == 0, r.stdout + r.stderr
    finally:
        os.killpg(p.pid, signal.SIGKILL)


def test_same_process_is_reentrant_and_released_by_the_last_owner(tmp_path):
    d = tmp_path / "run"
    a = CheckpointManager(str(d))
    a.save({"x": 1}, step=1)
    b = CheckpointManager(str(d))  # e.g. a callback re-created after the previous one was closed
    b.save({"x": 2}, step=2)
    a.close()
    assert _try_in_other_process(d, 3).returncode == 3  # b still holds it
    del b  # never closed: garbage collection releases its share
    gc.collect()
    assert not (d / LOCK_FILE_NAME).exists()
    assert _try_in_other_process(d, 3).returncode == 0


def test_many_dropped_managers_in_cycles_do_not_deadlock(tmp_path):
    d = str(tmp_path / "run")
    for _ in range(200):
        m = CheckpointManager(d)
        cycle = [m]
        cycle.append(cycle)  # only the cycle collector frees it, at an arbitrary allocation
        del m, cycle
    gc.collect()
    assert not os.path.exists(os.path.join(d, LOCK_FILE_NAME))


def test_private_opt_out_takes_no_lock_and_deletes_nothing(tmp_path):
    d = tmp_path / "run"
    with CheckpointManager(str(d)) as mgr:
        mgr.save({"x": 1}, step=1)
        (d / ".ckpt-2.index.tmp-0123abcd").write_bytes(b"in flight")  # another writer's temp file
        reader = CheckpointManager(str(d), _allow_concurrent_writers=True)
        assert reader.removed_leftovers == []
        assert (d / ".ckpt-2.index.tmp-0123abcd").exists()
        assert reader.restore() == {"x": 1}
        reader.close()
        assert (d / LOCK_FILE_NAME).exists()  # the writer's lock is untouched


def test_two_processes_racing_exactly_one_wins(tmp_path):
    for round_no in range(4):
        d = tmp_path / f"race{round_no}"
        code = textwrap.dedent(
            f"""
            import sys, time
            from ckpt_callbacks import CheckpointManager, CheckpointWriteError
            time.sleep(max(0.0, {time.time() + 1.5} - time.time()))
            try:
                m = CheckpointManager({str(d)!r})
            except CheckpointWriteError:
                print("REFUSED"); sys.exit(0)
            print("WON", flush=True)
            time.sleep(1.5)
            m.close()
            """
        )
        procs = [
            subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
            for _ in range(3)
        ]
        outs = sorted(p.communicate(timeout=60)[0].strip() for p in procs)
        assert outs == ["REFUSED", "REFUSED", "WON"], outs


# ---------------------------------------------------------------- without flock


@pytest.fixture
def no_flock(monkeypatch):
    def flock(fd, op):
        raise OSError(errno.ENOLCK, "no locks on this filesystem")

    monkeypatch.setattr(_lock.fcntl, "flock", flock)


def test_exclusive_file_fallback(tmp_path, no_flock):
    d = tmp_path / "run"
    d.mkdir()
    lock = d / LOCK_FILE_NAME
    host = socket.gethostname()
    lock.write_text(json.dumps({"pid": 1, "host": host}))  # pid 1 is alive: refused
    with pytest.raises(CheckpointWriteError, match="process 1 on host") as info:
        CheckpointManager(str(d))
    assert info.value.errno == errno.EBUSY
    lock.write_text(json.dumps({"pid": _dead_pid(), "host": host}))  # dead on this host: stale
    with CheckpointManager(str(d)):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert not lock.exists()
    lock.write_text(json.dumps({"pid": _dead_pid(), "host": "some-other-host"}))  # cannot tell: refused
    with pytest.raises(CheckpointWriteError, match="some-other-host"):
        CheckpointManager(str(d))


# ---------------------------------------------------------------- object stores: the lease


def _lease_doc(**kw):
    doc = {"pid": 1, "host": socket.gethostname(), "token": "x", "time": time.time(), "lease_s": 300}
    doc.update(kw)
    return json.dumps(doc).encode()


@pytest.mark.parametrize(
    "holder, refused",
    [
        (dict(host="other-host"), True),  # fresh lease of another host
        (dict(host="other-host", time=time.time() - 10 * _lock.LEASE_SECONDS), False),  # expired
        (dict(pid=1), True),  # this host, live pid
        ("dead", False),  # this host, dead pid
        ("garbage", False),
    ],
)
def test_object_store_lease(holder, refused):
    import fsspec

    url = f"memory://lease-{os.getpid()}-{time.monotonic_ns()}/run"
    fs = fsspec.filesystem("memory")
    path = url[len("memory://") :] + "/" + LOCK_FILE_NAME
    doc = (
        b"{not json"
        if holder == "garbage"
        else _lease_doc(pid=_dead_pid())
        if holder == "dead"
        else _lease_doc(**holder)
    )
    fs.pipe_file(path, doc)
    if refused:
        with pytest.raises(CheckpointWriteError) as info:
            CheckpointManager(url)
        assert info.value.errno == errno.EBUSY and LOCK_FILE_NAME in str(info.value)
        assert fs.cat_file(path) == doc
        return
    with CheckpointManager(url) as mgr:
        mgr.save({"x": 1}, step=1)
        assert json.loads(fs.cat_file(path))["pid"] == os.getpid()
    assert not fs.exists(path)


def test_unwritable_directory_gets_a_warning_not_an_error(tmp_path, monkeypatch, caplog):
    """Restoring from a read-only location must keep working; saving there fails at save time."""
    d = tmp_path / "run"
    with CheckpointManager(str(d)) as mgr:
        mgr.save({"x": 1}, step=1)
    real_open = os.open

    def read_only_open(path, flags, *a, **k):
        if str(path).endswith(LOCK_FILE_NAME):
            raise OSError(errno.EROFS, "Read-only file system", path)
        return real_open(path, flags, *a, **k)

    monkeypatch.setattr(_lock.os, "open", read_only_open)
    with caplog.at_level("WARNING", logger="ckpt_callbacks"), CheckpointManager(str(d)) as mgr:
        assert mgr.restore() == {"x": 1}
    assert "No writer lock" in caplog.text


def test_s3_lease_uses_a_conditional_create(monkeypatch):
    """On a real S3 API (moto server): If-None-Match create, a second process refused, release deletes."""
    moto_server = pytest.importorskip("moto.server", reason="moto[server] provides the local S3 API")
    s3fs = pytest.importorskip("s3fs", reason="s3fs is the S3 backend")
    server = moto_server.ThreadedMotoServer(port=0, ip_address="127.0.0.1")
    server.start()
    try:
        host, port = server.get_host_and_port()
        for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            monkeypatch.setenv(k, "testing")
        monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        opts = {"client_kwargs": {"endpoint_url": f"http://{host}:{port}"}}
        fs = s3fs.S3FileSystem(**opts)
        fs.mkdir("locks")
        fs.pipe_file("locks/probe", b"1", mode="create")
        with pytest.raises(FileExistsError):  # the backend enforces the conditional create
            fs.pipe_file("locks/probe", b"2", mode="create")
        url = "s3://locks/run"
        code = textwrap.dedent(
            f"""
            from ckpt_callbacks import CheckpointManager, CheckpointWriteError
            try:
                CheckpointManager({url!r}, storage_options={opts!r})
            except CheckpointWriteError as e:
                print("REFUSED", e.errno)
            """
        )
        with CheckpointManager(url, storage_options=opts) as mgr:
            mgr.save({"x": 1}, step=1)
            holder = json.loads(fs.cat_file(f"locks/run/{LOCK_FILE_NAME}"))
            assert holder["pid"] == os.getpid()
            r = subprocess.run(
                [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=dict(os.environ)
            )
            assert r.stdout.strip() == f"REFUSED {errno.EBUSY}", r.stdout + r.stderr
        fs.invalidate_cache()
        assert not fs.exists(f"locks/run/{LOCK_FILE_NAME}")
    finally:
        server.stop()
