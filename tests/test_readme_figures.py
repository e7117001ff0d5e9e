"""The README's figures are the benchmark outputs kept in ``bench/out/``, rendered by
``bench/readme_figures.py``: none is typed by hand, and none is left behind by a rerun."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_benchmark_the_readme_quotes_is_kept():
    readme = (ROOT / "README.md").read_text()
    names = [p.stem for p in (ROOT / "bench").glob("*.py") if not p.stem.startswith("_")]
    quoted = [n for n in names if f"bench/out/{n}.json" in readme]
    assert quoted, "the README quotes no benchmark output"
    missing = [n for n in quoted if not (ROOT / "bench" / "out" / f"{n}.json").exists()]
    assert not missing, f"the README quotes bench/out/{missing[0]}.json, which is not in the repository"


def test_the_readme_figures_are_rendered_from_bench_out():
    run = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "readme_figures.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
