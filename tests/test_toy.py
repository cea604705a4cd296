"""research/toy.py's command line: --help prints its usage and exits without running the toys."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_help_prints_usage_without_running(tmp_path):
    out = subprocess.run([sys.executable, os.path.join(ROOT, "research", "toy.py"), "--help"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("usage: toy.py") and "--out-dir" in out.stdout
    assert os.listdir(tmp_path) == []  # nothing written: the toys did not run
