"""The method core never imports Flower: import every module of momkd_fed with flwr blocked."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import momkd_fed

SCRIPT = r"""
import importlib, sys
from pathlib import Path
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "flwr" or name.startswith("flwr."):
            raise ImportError(f"momkd_fed must not import {name}")
        return None
sys.meta_path.insert(0, Block())
import momkd_fed
root = Path(momkd_fed.__path__[0])
mods = [".".join(("momkd_fed",) + p.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
        for p in sorted(root.rglob("*.py"))]
for m in mods:
    importlib.import_module(m)
print(len(mods))
"""


def test_no_module_of_the_core_imports_flwr():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    n = int(out.stdout.strip().splitlines()[-1])
    assert n == sum(1 for _ in Path(momkd_fed.__path__[0]).rglob("*.py"))  # every module was really imported
