"""The results tables in README.md and docs/ are generated from benchmarks/results: none is stale."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_docs_tables_match_the_result_files():
    r = subprocess.run([sys.executable, os.path.join("benchmarks", "tables.py"), "--check"],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
