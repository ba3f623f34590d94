"""Every module of the package imports on its own: no import cycles, no import-order dependence.

A cycle (a imports b at the top, b imports a) only fails when one of the two is imported first,
so each module is imported first once: in one fresh interpreter, every ``sana_ray`` module is
dropped from ``sys.modules`` before the next one is imported (third-party packages stay loaded,
which keeps this fast).
"""

from __future__ import annotations

import json
import subprocess
import sys

SCRIPT = r"""
import importlib, json, pkgutil, sys, traceback
import sana_ray
names = sorted(m.name for m in pkgutil.walk_packages(sana_ray.__path__, "sana_ray."))
failures = {}
for name in names:
    for loaded in [m for m in sys.modules if m == "sana_ray" or m.startswith("sana_ray.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except Exception:
        failures[name] = traceback.format_exc(limit=3)
print(json.dumps({"modules": names, "failures": failures}))
"""


def test_every_module_imports_alone():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(result["modules"]) > 40 and "sana_ray.data.cache.reader" in result["modules"]
    assert result["failures"] == {}, "\n".join(f"{k}:\n{v}" for k, v in result["failures"].items())
