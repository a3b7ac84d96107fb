"""The store and the disk going wrong under a real ``worldhost serve`` process (issue #12):
a second host through another name for the file, the file deleted or replaced while
the host runs, a damaged WAL at restart, a file another process holds busy, and a
full disk at restart."""

from __future__ import annotations

import fcntl
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from host.client import CallError, Disconnected, connect
from serverproc import ServerProcess

SLOW_CHECKPOINTS = "[store]\ndebounce_s = 600.0\nmax_delay_s = 600.0\n"


def _config(tmp_path: Path, text: str = SLOW_CHECKPOINTS) -> Path:
    path = tmp_path / "c.toml"
    path.write_text(text)
    return path


def _serve_all(names: list[tuple[str, Path]], timeout: float = 20
               ) -> list[subprocess.CompletedProcess[str]]:
    """``worldhost serve --db NAME`` (run in a directory) for each, at once; each must
    refuse to start: their exit codes and stderr."""
    procs = [subprocess.Popen([sys.executable, "-m", "host", "serve", "--db", db, "--port", "0"],
                              cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "WORLDHOST_LOG": "WARNING"})
             for db, cwd in names]
    done = []
    deadline = time.monotonic() + timeout
    for (db, _), proc in zip(names, procs):
        try:
            out, err = proc.communicate(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
                p.communicate()
            pytest.fail(f"a second host started on {db}")
        done.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return done


async def _say(url: str, count: int) -> None:
    async with connect(url, name="writer") as c:
        for i in range(count):
            await c.call("chat.say", text=f"line {i}")


async def _chat_and_info(url: str) -> tuple[list[str], dict]:
    async with connect(url, name="reader") as c:
        history = await c.call("chat.history", limit=100)
        lines = [m["text"] for m in history["messages"]]
        return lines, c.server_info


# --- #12.6 ---------------------------------------------------------------------

def test_a_second_host_is_refused_however_it_names_the_store(tmp_path: Path) -> None:
    db = tmp_path / "world.db"
    (tmp_path / "sub").mkdir()
    server = ServerProcess(db).start()
    try:
        trio.run(_say, server.url, 1)
        (tmp_path / "link.db").symlink_to(db)
        os.link(db, tmp_path / "hard.db")
        names = [("link.db", tmp_path), (str(tmp_path / "hard.db"), tmp_path),
                 ("../sub/../link.db", tmp_path / "sub")]
        for (name, _), done in zip(names, _serve_all(names)):
            assert done.returncode == 2, (name, done.stderr)
            assert "in use by another worldhost" in done.stderr, (name, done.stderr)
        (tmp_path / "doc.json").write_text("{}")
        offline = subprocess.run([sys.executable, "-m", "host", "import", str(tmp_path / "hard.db"),
                                  str(tmp_path / "doc.json")], capture_output=True, text=True)
        assert offline.returncode != 0 and "in use" in offline.stderr
        trio.run(_say, server.url, 1)  # the first host was never disturbed
    finally:
        assert server.stop() == 0


# --- #12.8 ---------------------------------------------------------------------

@pytest.mark.parametrize("how", ["deleted", "replaced"])
def test_a_store_deleted_or_replaced_under_the_host_is_not_acknowledged(
        tmp_path: Path, how: str) -> None:
    db = tmp_path / "world.db"
    other = tmp_path / "other" / "world.db"
    other.parent.mkdir()
    if how == "replaced":  # another healthy store, moved over this one's files
        ServerProcess(other).start().stop()
    server = ServerProcess(db, config=_config(tmp_path)).start()

    def swap_files() -> None:
        for suffix in ("", "-wal", "-shm"):
            target = Path(f"{db}{suffix}")
            if how == "deleted":
                target.unlink()
            elif Path(f"{other}{suffix}").exists():
                os.replace(f"{other}{suffix}", target)
            else:
                target.unlink()

    async def write_after() -> str:
        with trio.fail_after(10):
            async with connect(server.url, name="writer", reconnect=False) as c:
                for i in range(3):
                    await c.call("chat.say", text=f"line {i}")
                swap_files()
                try:
                    await c.call("chat.say", text="never durable")
                except (CallError, Disconnected) as exc:
                    return type(exc).__name__
                return "acknowledged"

    try:
        outcome = trio.run(write_after)
    except Exception as exc:  # noqa: BLE001 - the connection dropped as the host stopped
        outcome = type(exc).__name__
    assert outcome != "acknowledged"
    assert server.proc is not None and server.proc.wait(10) == 2
    server.stderr.close()
    log = server.log()
    assert "STORE LOST" in log and str(db) in log
    assert "Traceback" not in log


# --- #12.9 ---------------------------------------------------------------------

def _damage(wal: Path, how: str) -> None:
    data = wal.read_bytes()
    if how == "truncated":
        wal.write_bytes(data[:len(data) // 3])
    elif how == "garbled":
        middle = len(data) // 2
        wal.write_bytes(data[:middle] + bytes(b ^ 0x5A for b in data[middle:middle + 64])
                        + data[middle + 64:])
    else:
        wal.unlink()


@pytest.mark.parametrize("how", ["truncated", "garbled", "deleted"])
def test_a_damaged_wal_is_kept_and_reported(tmp_path: Path, how: str) -> None:
    db = tmp_path / "world.db"
    server = ServerProcess(db, config=_config(tmp_path)).start()
    trio.run(_say, server.url, 10)
    if how == "garbled":
        # an intact WAL after kill -9 is not damage: everything is there, nothing reported
        server.kill9()
        server.start()
        lines, info = trio.run(_chat_and_info, server.url)
        assert lines == [f"line {i}" for i in range(10)] and "recovered" not in info
    trio.run(_say, server.url, 25)
    server.kill9()
    assert not list(tmp_path.glob("world.db-wal.damaged-*"))
    wal = Path(f"{db}-wal")
    original = wal.read_bytes()
    _damage(wal, how)
    left = wal.read_bytes() if wal.exists() else None
    server.start()
    try:
        lines, info = trio.run(_chat_and_info, server.url)
    finally:
        server.stop()
    assert len(lines) < 35  # the audit's case: acknowledged actions are gone ...
    recovered = info["recovered"]  # ... and the host says so
    assert recovered["wal_frames_lost"] > 0
    copy = Path(recovered["wal_copy"])
    assert copy.name.startswith("world.db-wal.damaged-")
    assert Path(f"{copy}-shm").exists()
    if left is not None:
        assert copy.read_bytes() == left  # what could not be read, kept as it was
        assert copy.read_bytes() != original
    log = server.log()
    assert "WAL" in log and str(copy) in log


# --- #12.13 --------------------------------------------------------------------

def test_a_busy_store_delays_only_the_writes(tmp_path: Path) -> None:
    db = tmp_path / "world.db"
    server = ServerProcess(db, config=_config(
        tmp_path, SLOW_CHECKPOINTS + "busy_timeout_ms = 20000\n")).start()

    async def main() -> None:
        async with connect(server.url, name="writer") as writer, \
                connect(server.url, name="reader") as reader, trio.open_nursery() as nursery:
            await writer.call("chat.say", text="before")
            blocker = sqlite3.connect(db, isolation_level=None)
            blocker.execute("BEGIN IMMEDIATE")  # holds the file's write lock: busy
            written = trio.Event()

            async def write() -> None:
                await writer.call("chat.say", text="while busy")
                written.set()

            nursery.start_soon(write)
            await trio.sleep(0.2)
            started = time.monotonic()
            with trio.fail_after(2):  # was: waited for the busy timeout (5 s by default)
                await reader.call("host.ping")
                history = await reader.call("chat.history", limit=100)
            assert time.monotonic() - started < 1
            assert not written.is_set()  # the write waits for the disk ...
            assert [m["text"] for m in history["messages"]][0] == "before"
            blocker.execute("ROLLBACK")
            blocker.close()
            with trio.fail_after(5):
                await written.wait()  # ... and is acknowledged once it is stored
    try:
        trio.run(main)
    finally:
        assert server.stop() == 0
    server.start()
    try:
        lines, _ = trio.run(_chat_and_info, server.url)
        assert lines == ["before", "while busy"]
    finally:
        server.stop()


@pytest.fixture
def freezable_disk(tmp_path: Path) -> Iterator[Path]:
    """A small ext4 filesystem on a loop device, which ``fsfreeze`` can freeze for real
    (the tests run as root); always thawed and unmounted afterwards."""
    image, disk = tmp_path / "disk.img", tmp_path / "disk"
    with open(image, "wb") as f:
        f.truncate(16 << 20)
    subprocess.run(["mkfs.ext4", "-q", str(image)], check=True)
    disk.mkdir()
    subprocess.run(["mount", "-o", "loop", str(image), str(disk)], check=True)
    try:
        yield disk
    finally:
        subprocess.run(["fsfreeze", "-u", str(disk)], capture_output=True, check=False)
        subprocess.run(["umount", "-l", str(disk)], check=False)


@pytest.mark.parametrize("synchronous", ["NORMAL", "FULL"])
def test_a_frozen_filesystem_delays_only_the_writes(tmp_path: Path, freezable_disk: Path,
                                                    synchronous: str) -> None:
    """Journal commits run on the writer thread (``journal_commits = "thread"``, the
    default), so a filesystem frozen under a commit holds only the writes; pings and
    reads used to queue behind it."""
    db = freezable_disk / "world.db"
    server = ServerProcess(db, config=_config(
        tmp_path, SLOW_CHECKPOINTS + f'synchronous = "{synchronous}"\n')).start()

    async def main() -> None:
        async with connect(server.url, name="writer") as writer, \
                connect(server.url, name="reader") as reader, trio.open_nursery() as nursery:
            await writer.call("chat.say", text="before")
            written = trio.Event()

            async def write() -> None:
                await writer.call("chat.say", text="while frozen")
                written.set()

            subprocess.run(["fsfreeze", "-f", str(freezable_disk)], check=True)
            try:
                nursery.start_soon(write)
                await trio.sleep(0.3)
                with trio.fail_after(2):
                    await reader.call("host.ping")
                    history = await reader.call("chat.history", limit=100)
                assert not written.is_set()
            finally:
                subprocess.run(["fsfreeze", "-u", str(freezable_disk)], check=True)
            assert [m["text"] for m in history["messages"]][0] == "before"
            with trio.fail_after(5):
                await written.wait()
    try:
        trio.run(main)
    finally:
        server.stop()
    server.start()
    try:
        lines, _ = trio.run(_chat_and_info, server.url)
        assert lines == ["before", "while frozen"]
    finally:
        server.stop()


# --- #12.15 (full disk) ------------------------------------------------------------

@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs (the tests run as root)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)], check=True)
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_a_restart_on_a_full_disk_says_so_in_one_line(tmp_path: Path, tiny_disk: Path) -> None:
    db = tiny_disk / "world.db"
    server = ServerProcess(db, config=_config(tmp_path)).start()
    # lines enough that the checkpoint after the restart needs pages the store lacks
    trio.run(_say, server.url, 60)
    server.kill9()
    with open(tiny_disk / "filler", "wb", buffering=0) as filler:
        try:
            while True:
                filler.write(b"\0" * 65536)
                filler.flush()
        except OSError:
            pass
    cmd = [sys.executable, "-m", "host", "serve", "--db", str(db), "--port", "0",
           "--config", str(tmp_path / "c.toml")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=30,
                          env={**os.environ, "WORLDHOST_LOG": "CRITICAL"})
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    # it names the store it could not write: the server's own, or the world's
    assert "disk is full" in lines[0] and str(tiny_disk / "world.") in lines[0]
    (tiny_disk / "filler").unlink()
    server.start()  # with room again, everything acknowledged is there
    try:
        lines, _ = trio.run(_chat_and_info, server.url)
        assert lines == [f"line {i}" for i in range(60)]
    finally:
        server.stop()
    shutil.rmtree(tiny_disk, ignore_errors=True)


def test_after_a_crash_the_restarted_host_keeps_its_hold_on_the_wal_index(
        tmp_path: Path) -> None:
    """The WAL check at startup reads the WAL's index (the -shm file) again once SQLite
    has opened it. Closing that file dropped every POSIX lock the process held on it,
    SQLite's too: its lock on the index's "in use" byte, by which another connection
    (``worldhost inspect``, the sqlite3 shell) tells that it must not reset the index
    nor take itself for the last user of the WAL."""
    db = tmp_path / "world.db"
    server = ServerProcess(db, config=_config(tmp_path)).start()
    trio.run(_say, server.url, 10)
    server.kill9()
    server.start()  # its WAL holds what no checkpoint does yet: the host checks it
    try:
        fd = os.open(f"{db}-shm", os.O_RDWR)
        try:
            with pytest.raises(OSError):  # SQLite's own: byte 128, "DMS" in os_unix.c
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 128)
        finally:
            os.close(fd)
        trio.run(_say, server.url, 1)
        lines, _ = trio.run(_chat_and_info, server.url)
        assert lines == [f"line {i}" for i in range(10)] + ["line 0"]
    finally:
        assert server.stop() == 0, server.log()[-2000:]
