"""End-to-end benchmark (thin wrapper over ``lora-cluster bench``; same flags).

Run: .venv/bin/python benchmarks/e2e.py [--preset cpu-tiny|h100-moe] [--adapters 1,5,...] ...
Results go to benchmarks/results/e2e_<preset>.json and .png unless --out says otherwise.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "kernels")]  # runnable from a plain checkout too

from lora_cluster.cli import main  # noqa: E402

if __name__ == "__main__":
    argv = sys.argv[1:]
    if not any(a == "--out" or a.startswith("--out=") for a in argv):
        argv += ["--out", str(ROOT / "benchmarks" / "results")]
    sys.exit(main(["bench", *argv]))
