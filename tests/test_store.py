"""Storage behind URIs (local and a real S3-compatible server on 127.0.0.1) and the output lease."""
from __future__ import annotations

import os
import threading
import time

import pyarrow as pa
import pytest

from pipeline.store import Lease, OutputBusy, Storage, table_hash
from tests.s3util import s3_bucket, s3_server  # noqa: F401  (fixtures)


@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path):
    if request.param == "local":
        return Storage(tmp_path / "out")
    return Storage(request.getfixturevalue("s3_bucket") + "/out")


def test_write_read_list_delete(storage):
    storage.write_bytes("a/b/x.bin", b"hello")
    storage.write_json("a/m.json", {"k": 1})
    n = storage.write_parquet("a/t.parquet", pa.table({"x": [1, 2, 3]}))
    assert storage.read_bytes("a/b/x.bin") == b"hello"
    assert storage.read_json("a/m.json") == {"k": 1} and storage.read_json("a/none.json", "d") == "d"
    assert storage.read_parquet("a/t.parquet")["x"].to_pylist() == [1, 2, 3] and n > 0
    assert storage.list("a") == ["m.json", "t.parquet"]
    assert storage.list("a", recursive=True) == ["b/x.bin", "m.json", "t.parquet"]
    assert storage.list("missing") == [] and storage.size("a") == 5 + len(storage.read_bytes("a/m.json")) + n
    assert storage.is_file("a/m.json") and not storage.is_file("a/none")
    storage.delete("a/m.json")
    storage.delete("a/m.json")  # idempotent
    assert not storage.exists("a/m.json")
    storage.delete_dir("a/b")
    assert storage.list("a", recursive=True) == ["t.parquet"]


def test_storage_pickles_without_its_filesystem(storage):
    import pickle

    storage.write_bytes("k", b"v")
    clone = pickle.loads(pickle.dumps(storage))
    assert clone.uri == storage.uri and clone._fs is None and clone.read_bytes("k") == b"v"


def test_local_writes_leave_no_temp_files_and_dead_temps_are_cleaned(tmp_path):
    s = Storage(tmp_path, owner="me")
    s.write_bytes("d/x", b"1")
    assert sorted(os.listdir(tmp_path / "d")) == ["x"]
    (tmp_path / "d" / ".x.tmp-dead1-abcd").write_bytes(b"partial")  # a killed run's leftover
    (tmp_path / ".dataset.tmp-dead1-ffff").mkdir()  # e.g. a failed publish directory
    (tmp_path / "d" / ".y.tmp-me-0000").write_bytes(b"mine, in flight")
    assert s.clean_dead_tmp("me") == 2
    assert sorted(os.listdir(tmp_path / "d")) == [".y.tmp-me-0000", "x"]
    assert not (tmp_path / ".dataset.tmp-dead1-ffff").exists()


def test_table_hash_is_content_based():
    a = pa.table({"x": [1, 2], "y": ["a", "b"]})
    assert table_hash(a) == table_hash(pa.table({"x": [1, 2], "y": ["a", "b"]}))
    assert table_hash(a) != table_hash(pa.table({"x": [1, 3], "y": ["a", "b"]}))


def _holder(storage) -> dict | None:
    return Lease(storage).current()


def test_second_driver_is_refused_while_the_first_is_alive(storage):
    first = Lease(storage, ttl_s=5, heartbeat_s=0.5)
    first.acquire()
    try:
        second = Lease(storage, ttl_s=5, heartbeat_s=0.5)
        with pytest.raises(OutputBusy, match="another driver"):
            second.acquire(wait_s=1.5)  # the heartbeat keeps the lease fresh past the wait
        assert _holder(storage)["owner"] == first.owner and first.epoch == 1
    finally:
        first.release()
    assert _holder(storage)["released"]  # epochs only grow: a release marks its epoch, it does not delete it


def test_waiting_driver_gets_the_lease_when_the_first_releases(tmp_path):
    storage = Storage(tmp_path)
    first = Lease(storage, ttl_s=5, heartbeat_s=0.2)
    first.acquire()
    threading.Timer(0.5, first.release).start()
    second = Lease(storage, ttl_s=5, heartbeat_s=0.2)
    second.acquire(wait_s=10)
    assert _holder(storage)["owner"] == second.owner and second.epoch == 2 and second.took_over is None
    second.release()


def _dead(storage, epoch: int = 1, **rec) -> None:
    storage.write_json(Lease._key(epoch), {"owner": "dead", "host": "h", "pid": 1, "heartbeat": time.time() - 100,
                                           **rec})


def test_dead_owner_is_taken_over_and_the_superseded_driver_and_its_workers_stop(storage):
    _dead(storage)
    lease = Lease(storage, ttl_s=5, heartbeat_s=0.2)
    lease.acquire()
    assert lease.took_over["owner"] == "dead" and lease.epoch == 2
    Lease.fence(storage, 2)  # a worker of the holder's epoch may commit
    with pytest.raises(OutputBusy, match="a newer driver \\(epoch 2\\)"):
        Lease.fence(storage, 1)  # a worker left over from the dead driver may not
    # a successor that judged us dead takes epoch 3: our heartbeat notices, check() refuses, workers are fenced
    storage.write_json(Lease._key(3), {"owner": "thief", "host": "h", "pid": 2, "heartbeat": time.time()})
    deadline = time.time() + 5
    while not lease.lost.is_set() and time.time() < deadline:
        time.sleep(0.05)
    assert lease.lost.is_set()
    with pytest.raises(OutputBusy, match="lost the lease"):
        lease.check()
    with pytest.raises(OutputBusy):
        Lease.fence(storage, 2)
    lease.release()  # does not touch the other owner's lease
    assert _holder(storage)["owner"] == "thief" and not _holder(storage).get("released")


def _contend(storage, barrier, results) -> None:
    lease = Lease(Storage(storage.uri), ttl_s=30, heartbeat_s=5)
    barrier.wait()
    try:
        lease.acquire(wait_s=0)
        results.append(("held", lease.epoch))
        barrier.wait()  # every contender has answered: the winner lets go (its heartbeat thread ends)
        lease.release()
    except OutputBusy:
        results.append(("refused", None))
        barrier.wait()


def test_drivers_racing_for_a_stale_lease_one_wins(storage):
    """Four drivers see the same dead driver's lease at once: each tries to create epoch 2 (a conditional create),
    exactly one holds it, the others are refused (no settle time, no clock)."""
    _dead(storage)
    barrier, results = threading.Barrier(4), []
    threads = [threading.Thread(target=_contend, args=(storage, barrier, results)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(r for r, _ in results) == ["held", "refused", "refused", "refused"]
    assert [e for r, e in results if r == "held"] == [2] and _holder(storage)["epoch"] == 2
    assert _holder(storage)["released"]


def test_release_never_masks_the_error_that_ended_the_run(tmp_path, monkeypatch):
    storage = Storage(tmp_path)
    lease = Lease(storage, ttl_s=5, heartbeat_s=1)

    def read_only(*_a, **_k):
        raise PermissionError("read-only file system")

    with pytest.raises(ValueError, match="the real error"):
        with lease.held():
            monkeypatch.setattr(storage, "write_json", read_only)
            raise ValueError("the real error")


def test_a_dead_local_driver_lease_is_taken_over_at_once(tmp_path):
    """A lease of this host whose process is gone is stale now (a scheduler's retry need not wait for the ttl);
    one of another host, or of a live process, still waits for its heartbeat to expire."""
    import socket
    import subprocess
    import sys

    storage = Storage(tmp_path / "out")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)  # that process has exited
    storage.write_json(Lease._key(1), {"owner": "gone", "host": socket.gethostname(), "pid": pid,
                                       "heartbeat": time.time()})
    lease = Lease(storage, ttl_s=60, heartbeat_s=1)
    lease.acquire()
    assert lease.took_over["owner"] == "gone"
    lease.release()
    for other in ({"host": "another-host", "pid": pid}, {"host": socket.gethostname(), "pid": 1}):
        storage.write_json(Lease._key(9), {"owner": "alive", **other, "heartbeat": time.time()})
        with pytest.raises(OutputBusy, match="another driver"):
            Lease(storage, ttl_s=60, heartbeat_s=1).acquire()
