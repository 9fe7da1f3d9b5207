"""Where a run's time and memory go (``quantfix.timing``)."""
import pytest

from quantfix import timing


def test_host_peak_starts_afresh_at_exec():
    """A process started by one that grew to 1 GB reports its own peak, not its parent's (Linux
    carries ru_maxrss across exec: bench_scale's 1B row once showed the 8B builder's 16 GB)."""
    import subprocess
    import sys
    from pathlib import Path

    root = str(Path(__file__).resolve().parent.parent)
    child = ("import sys; sys.path.insert(0, %r); import resource; from quantfix.timing import host_peak_kib; "
             "print(host_peak_kib(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)" % root)
    parent = ("import os, sys; b = bytearray(2 ** 30); b[::4096] = b'x' * len(b[::4096]); "
              "os.execv(sys.executable, [sys.executable, '-c', %r])" % child)
    out = subprocess.run([sys.executable, "-c", parent], capture_output=True, text=True, check=True).stdout.split()
    own, inherited = int(out[0]), int(out[1])
    assert inherited > 2 ** 20  # the effect this guards against is real here
    assert own < inherited - 600 * 1024
