"""Crash-safe output: a kill at the worst moment of a replacement (between its two renames) loses nothing, and the
next write cleans up what dead writers left."""

import os

from slimswarm import atomic


def _folder(path, text):
    path.mkdir()
    (path / "a.txt").write_text(text)
    (path / "b.txt").write_text(text * 2)
    return path


def _killed_between_renames(staged, target):
    """In a forked child: publish ``staged`` over ``target`` but die (like SIGKILL: no cleanup) right after the
    first rename, the moment the old output is moved aside and the new one is not yet in place."""
    pid = os.fork()
    if pid == 0:
        real = os.replace
        calls = []

        def replace(a, b):
            real(a, b)
            calls.append(1)
            if len(calls) == 1:
                os._exit(9)

        os.replace = replace
        atomic.publish_dir(staged, target)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 9


def test_a_kill_between_the_renames_is_undone_by_recover(tmp_path):
    target = _folder(tmp_path / "ck", "old")
    staged = _folder(tmp_path / "staged", "new")
    _killed_between_renames(staged, target)
    assert not target.exists()  # the worst moment: no output under its name...
    left = atomic.leftovers(target)
    assert [p.name.split("-")[0] for p in left] == [".ck.old"]  # ...but the old one intact beside it
    atomic.recover(target)
    assert (target / "a.txt").read_text() == "old" and (target / "b.txt").read_text() == "oldold"
    assert atomic.leftovers(target) == []


def test_the_next_write_recovers_then_replaces(tmp_path):
    target = _folder(tmp_path / "ck", "old")
    _killed_between_renames(_folder(tmp_path / "staged", "new"), target)
    staged = atomic.staging_dir(target)  # the next run: restores the old output first, then builds beside it
    assert (target / "a.txt").read_text() == "old"
    (staged / "a.txt").write_text("newer")
    atomic.publish_dir(staged, target)
    assert sorted(p.name for p in target.iterdir()) == ["a.txt"] and (target / "a.txt").read_text() == "newer"
    assert atomic.leftovers(target) == []


def test_leftovers_of_live_writers_are_kept(tmp_path):
    target = tmp_path / "ck"
    mine = atomic.staging_dir(target)  # this process is alive: another writer must not delete its work
    dead = tmp_path / ".ck.tmp-999999999-x"
    dead.mkdir()
    atomic.recover(target)
    assert mine.exists() and not dead.exists()


def test_write_file_keeps_open_permissions(tmp_path):
    p = atomic.write_file(tmp_path / "x.bin", lambda f: f.write(b"abc"))
    mask = os.umask(0)
    os.umask(mask)
    assert p.read_bytes() == b"abc" and (p.stat().st_mode & 0o777) == 0o666 & ~mask
    assert atomic.leftovers(p) == []
