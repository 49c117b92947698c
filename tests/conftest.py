from __future__ import annotations

import gc
import os
import signal

import pytest

from tests.datagen import make_coded_tree, make_good_tree


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory):
    """A converted 3-class dataset (both formats): 20 train + 6 val images per class."""
    from dataprep.convert import Settings, convert

    root = tmp_path_factory.mktemp("small")
    make_good_tree(root / "src" / "train", 20, size=(120, 90))
    make_good_tree(root / "src" / "val", 6, size=(120, 90), seed=1)
    convert(root / "src", root / "data", Settings(shard_size=16), workers=2, progress=False, log=lambda s: None)
    return root / "data"


@pytest.fixture(scope="session")
def coded_dataset(tmp_path_factory):
    """Colour-coded images (tests.datagen.CODES: pixels say which image they are): 14 train and 5 val
    images per class, odd sizes."""
    from dataprep.convert import Settings, convert

    root = tmp_path_factory.mktemp("coded")
    make_coded_tree(root / "src", {"train": 14, "val": 5})
    convert(root / "src", root / "data", Settings(shard_size=16), workers=2, progress=False, log=lambda s: None)
    return root / "data"


# --- leftover child processes ---------------------------------------------------------------------------------
# A child process that outlives its test can block the interpreter's exit (multiprocessing joins its children
# at exit): pytest prints its summary and then never returns, and CI sees a timeout instead of a red test. Each
# test's new children are recorded; any still alive when the session ends fail the run, named with the test
# that started them, and are killed so that the process can exit.

_CHILD_OWNER: dict[int, str] = {}  # pid -> nodeid of the test after which it was first seen


def live_children() -> dict[int, str]:
    """pid -> command line of this process's live child processes, except multiprocessing's resource tracker
    (it exits by itself when this process does)."""
    me, found = os.getpid(), {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                state, ppid = f.read().rsplit(")", 1)[1].split()[:2]
            if int(ppid) != me or state == "Z":
                continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except (OSError, ValueError):
            continue  # it ended while being read
        if "multiprocessing.resource_tracker" not in cmd:
            found[int(entry)] = cmd
    return found


@pytest.fixture(autouse=True)
def _record_leftover_children(request):
    yield
    for pid in live_children():
        _CHILD_OWNER.setdefault(pid, request.node.nodeid)


def pytest_sessionfinish(session, exitstatus):
    gc.collect()  # what only a reference cycle kept alive goes first, as it would in a long run
    left = live_children()
    if not left:
        return
    lines = [f"  pid {pid} ({cmd[:80]}), first seen after {_CHILD_OWNER.get(pid, 'the session fixtures')}"
             for pid, cmd in left.items()]
    session.config.get_terminal_writer().line(
        "FAILED: child processes outlived their tests (they would block this process's exit):\n" + "\n".join(lines),
        red=True)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
