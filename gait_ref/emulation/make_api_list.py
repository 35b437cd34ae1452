"""Write cupy-api.json: the names a CuPy release exports, for the strict emulator.

Run it in an environment with the CuPy wheel installed (no GPU needed; `import cupy`
works without one). cupyx.scipy.linalg needs cuBLAS to import, so its names are read
from the package's ``__init__.py`` text instead.

    pip install cupy-cuda12x==14.2.0 && python -m gait_ref.emulation.make_api_list
"""
from __future__ import annotations

import ast
import json
import os
from pathlib import Path


def _public(obj, dunders=False):
    return sorted(n for n in dir(obj) if not n.startswith("_") or (dunders and n.startswith("__")))


def _names_imported_by(init_py: Path):
    names = set()
    for node in ast.walk(ast.parse(init_py.read_text())):
        if isinstance(node, ast.ImportFrom):
            names.update(a.asname or a.name for a in node.names if not a.name.startswith("_"))
    return sorted(names)


def collect() -> dict:
    import cupy
    import cupy.lib.stride_tricks
    import cupy.linalg
    import cupy.random
    import cupyx
    linalg_init = Path(cupyx.__file__).parent / "scipy" / "linalg" / "__init__.py"
    return {
        "cupy_version": cupy.__version__,
        "cupy": _public(cupy),
        "cupy.ndarray": _public(cupy.ndarray, dunders=True),
        "cupy.linalg": _public(cupy.linalg),
        "cupy.random": _public(cupy.random),
        "cupy.random.Generator": _public(cupy.random.Generator),
        "cupy.lib.stride_tricks": _public(cupy.lib.stride_tricks),
        "cupy.cuda": _public(cupy.cuda),
        "cupy.cuda.Stream": _public(cupy.cuda.Stream),
        "cupy.cuda.Event": _public(cupy.cuda.Event),
        "cupyx": _public(cupyx),
        "cupyx.scipy.linalg": _names_imported_by(linalg_init),
    }


if __name__ == "__main__":
    out = Path(__file__).with_name("cupy-api.json")
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(collect(), indent=0) + "\n")
    os.replace(tmp, out)
    print(f"wrote {out}")
