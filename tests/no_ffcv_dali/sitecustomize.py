"""Put this folder first on PYTHONPATH to run Python as if ffcv, nvidia-dali and torchcodec were not installed.

Used by tests/test_without_ffcv_dali.py and tests/test_device_check.py: the lent GPU machine has none of these
packages, and fastrsb must still import, convert `--formats dali`, benchmark and train there (decoding on the
device with torchvision).

- Importing `ffcv`, `nvidia.dali`, `torchcodec` or any of their submodules raises ModuleNotFoundError, as for a
  package that is not installed (`nvidia` itself stays importable: torch's CUDA libraries live under it).
- At exit, a process in which either package was imported anyway (a blocker that stopped blocking, or an
  import behind its back) writes `[no_ffcv_dali] imported: ...` to stderr and exits 97.
- FASTRSB_NO_FFCV_DALI=check: nothing is blocked, only the exit check runs (the test uses it to prove that
  the check notices an import).

Python imports the first `sitecustomize` on sys.path at start-up; this one shadows any other (the test
interpreters here have none). Subprocesses inherit PYTHONPATH, so the blocker follows them.
"""
import atexit
import os
import sys

BLOCKED = ("ffcv", "nvidia.dali", "torchcodec")
EXIT_STATUS = 97


def _is_blocked(name: str) -> bool:
    return any(name == b or name.startswith(b + ".") for b in BLOCKED)


class _NotInstalled:
    """A meta path finder ahead of all others that finds the blocked packages nowhere."""

    def find_spec(self, name, path=None, target=None):
        if _is_blocked(name):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


def _check_at_exit() -> None:
    imported = [b for b in BLOCKED if sys.modules.get(b) is not None]  # a submodule brings its package
    if imported:
        sys.stdout.flush()
        sys.stderr.write(f"[no_ffcv_dali] imported: {', '.join(imported)} (pid {os.getpid()})\n")
        sys.stderr.flush()
        os._exit(EXIT_STATUS)


if os.environ.get("FASTRSB_NO_FFCV_DALI") != "check":
    sys.meta_path.insert(0, _NotInstalled())
atexit.register(_check_at_exit)  # registered first, so it runs last
