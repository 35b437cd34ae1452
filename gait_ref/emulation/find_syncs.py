"""Write cupy-syncs.json: which CuPy functions read the device internally, from CuPy's source.

CuPy makes some calls wait for the GPU without saying so at the call site: a function
that needs a device value on the host (a count of nonzeros to size its output, a
validity check such as ``(indices < 0).any()`` before raising) copies it out, which
synchronises the stream. This script finds them in a CuPy source tree (the release the
emulator targets: ``git clone --branch v14.2.0 https://github.com/cupy/cupy``):

1. sync sites: lines that read the device on the host -- ``.get()``, ``.item()``,
   ``.tolist()``, ``asnumpy(``, ``int(...[-1])``, an ``if``/``while`` on ``.any()`` /
   ``.all()`` / ``cupy.any(...)``, ``bool(self.get())``, and CuPy's own
   ``# synchronize`` comments -- each attributed to the function that holds it;
2. the call graph: a function syncs when it holds a site or calls (by a name defined
   once in the tree) a function that syncs; the chain is kept as evidence and the
   distinct sites reached are the count of reads (an upper bound: a site on an error
   branch may not run);
3. the public names: each ``cupy.<name>`` and ``cupy.ndarray.<method>`` the emulator
   offers is "syncs" (with its chain), "sync_free" (its definition was found and reaches
   no site, or it is a ufunc / elementwise / reduction kernel object), or unlisted (no
   definition found: the emulator's test fails if gait_ref calls it).

    python -m gait_ref.emulation.find_syncs /path/to/cupy-v14.2.0
"""
from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

SITE = re.compile(
    r"#\s*(may\s+)?synchroniz"                       # CuPy's own marks
    r"|(?<![\w'\"])\w[\w\.\]\[\)]*\.(get|item|tolist)\(\)"    # x.get(), a.item(), idx.tolist()
    r"|\basnumpy\("
    r"|\bint\([^()]*\[-1\]\)"                        # int(scan[-1])
    r"|^\s*(if|elif|while)\b.*(\.any\(\)|\.all\(\)|cupy\.(any|all)\()"
    r"|bool\(self\.get\(\)\)")
NOT_SITE = re.compile(r"_ind\.get\(\)|\.get\(\)\[|'[^']*\.get\(\)|\"[^\"]*\.get\(\)|kwargs\.get|\w+_cache\.get"
                      r"|_ThreadLocal\w*\.get\(\)|\._\w+\.get\(\)|os\.environ|dict\b")
# Sites that do not read the device on the paths gait_ref can take, each with the reason read in the source.
NOT_A_DEVICE_READ = {
    "get_cuda_alignment": "runs only for structured dtypes, once per dtype (cached in _cuda_alignments)",
    "_check_cusolver_dev_info_if_synchronization_allowed":
        "returns before the read unless cupyx.errstate(linalg='raise'); the default is 'ignore'",
    "_check_cublas_info_array_if_synchronization_allowed":
        "returns before the read unless cupyx.errstate(linalg='raise'); the default is 'ignore'",
    "__richcmp__": "item() of a 0-d numpy operand (host data)",
    "__array_ufunc__": "item() of 0-d numpy inputs (host data)",
    "declaration": "cupy.fuse's constants, host values",
    "BitGenerator.__init__": "asnumpy only of a seed given as a device array",
}
DEF = re.compile(r"^(\s*)(?:async\s+)?(?:cp?def|def)\s+(?:[\w\.\[\], *]+\s+)?(\w+)\s*\(")
CLASS = re.compile(r"^(\s*)(?:cdef\s+)?class\s+(\w+)")
KERNEL_OBJECT = re.compile(r"^(?:cdef\s+(?:\w+\s+)?)?(\w+)\s*=\s*(?:_core\.|core\.|cupy\._core\.|_kernel\.)?"
                           r"(create_\w+|ElementwiseKernel|ReductionKernel|_create_\w+|_ufunc|ufunc)\b")
ALIAS = re.compile(r"^(\w+)\s*=\s*(?:\w+\s*=\s*)*(?:_core\.|core\.|cupy\._core\.|_routines_\w+\.)?(\w+)\s*$")
# Python's operators on cupy.ndarray and the Cython methods that implement them (core.pyx).
OPERATOR_METHODS = {**{f"__{op}__": "__richcmp__" for op in ("eq", "ne", "lt", "le", "gt", "ge")},
                    **{f"__r{op}__": f"__{op}__" for op in ("add", "sub", "mul", "truediv", "floordiv", "mod",
                                                            "pow", "matmul", "and", "or", "xor", "lshift",
                                                            "rshift", "divmod")}}
CALL = re.compile(r"(?:\b(\w+)\.)?(?<![\w.])?\b(\w+)\s*\(")
# A call through an attribute follows CuPy's own modules and objects only (numpy.unravel_index, a
# C++ vector's .at() and the like are other functions of the same name).
CUPY_PREFIX = re.compile(r"^(cupy\w*|_\w*|core|self|cls|linalg|lapack|cublas|internal)$")
# The copies out themselves (core.pyx: ndarray.get copies on the stream and synchronises it).
EXPLICIT_READS = {"cupy.ndarray.get": "cupy/_core/core.pyx: _ndarray_base.get -> stream.synchronize()",
                  "cupy.asnumpy": "cupy/_core/core.pyx: asnumpy -> _ndarray_base.get"}
HOST_MODULES = {"numpy", "np", "math", "os", "sys", "operator", "functools", "itertools", "warnings", "re",
                "string", "str", "dict", "list", "tuple", "set", "runtime", "driver", "stream", "device"}
# Calls whose sync depends on the arguments; the emulator applies the condition (see its docs).
ARGUMENT_DEPENDENT = {
    "where": "only with the condition alone (nonzero); where(cond, x, y) is one elementwise kernel",
}


def _exempt(qual: str) -> bool:
    return qual in NOT_A_DEVICE_READ or qual.split(".")[-1] in NOT_A_DEVICE_READ


def scan(root: Path):
    """{qualified function: {"file", "line", "sites": [...], "calls": {...}}} and kernel objects."""
    funcs, kernels, aliases = {}, set(), {}
    for path in sorted(list(root.rglob("*.py")) + list(root.rglob("*.pyx"))):
        rel = str(path.relative_to(root.parent))
        if "/testing/" in rel or "/_fusion" in rel:
            continue
        stack = []                       # [(indent, qualified name, is a class)]
        docstring = False
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            stripped = line.strip()
            if stripped.count('"""') % 2 == 1:
                docstring = not docstring
                continue
            if docstring or not stripped:
                continue
            indent = len(line) - len(line.lstrip())
            while stack and indent <= stack[-1][0] and not stripped.startswith(("#", ")")):
                stack.pop()
            m = DEF.match(line) or CLASS.match(line)
            if m:
                name, is_def = m.group(2), bool(DEF.match(line))
                in_class = stack and stack[-1][2]
                qual = f"{stack[-1][1]}.{name}" if in_class else name
                if is_def:
                    funcs.setdefault(qual, {"file": rel, "line": n, "sites": [], "calls": set()})
                stack.append((indent, qual if is_def else name, not is_def))
                continue
            k = KERNEL_OBJECT.match(line)
            if k and not stack:
                kernels.add(k.group(1))
            a = ALIAS.match(line)
            if a and not stack and not k:
                aliases[a.group(1)] = a.group(2)
                for alias in re.findall(r"(\w+)\s*=", line)[1:]:     # sqrt = sqrt_fixed = _core.sqrt
                    aliases[alias] = a.group(2)
            if not stack or stack[-1][1] not in funcs:
                continue
            f = funcs[stack[-1][1]]
            code = line.split("#")[0]
            if SITE.search(line) and not NOT_SITE.search(line):
                if _exempt(stack[-1][1]):
                    continue                               # the exempt read and the calls on its line
                f["sites"].append(f"{rel}:{n}: {stripped[:100]}")
            for prefix, name in CALL.findall(code):
                if not prefix or CUPY_PREFIX.match(prefix):
                    f["calls"].add(name)
                elif prefix not in HOST_MODULES and name != "get":    # x.nonzero(): an array's method
                    # (not x.get(): dicts and thread-locals have one; the array's is below)
                    f["calls"].add(f"_ndarray_base.{name}")
    for name, target in aliases.items():        # multiply = _core.multiply, _core's multiply = _multiply
        if target in kernels or f"_{target}" in kernels:
            kernels.add(name)
    return funcs, kernels


def close_over_calls(funcs):
    """{function: sorted sites reached, with the chain to each}, through uniquely named callees."""
    by_name = {}
    for qual in funcs:
        by_name.setdefault(qual.split(".")[-1], []).append(qual)
    unique = {name: quals[0] for name, quals in by_name.items() if len(quals) == 1}
    reached = {q: {s: [q] for s in f["sites"]} for q, f in funcs.items()}
    changed = True
    while changed:
        changed = False
        for q, f in funcs.items():
            for callee_name in f["calls"]:
                callee = callee_name if "." in callee_name and callee_name in funcs else unique.get(callee_name)
                if callee is None or callee == q or callee_name in ARGUMENT_DEPENDENT:
                    continue
                for site, chain in reached[callee].items():
                    if site not in reached[q] and q not in chain:
                        reached[q][site] = [q] + chain
                        changed = True
    return reached


def classify(root: Path, api: dict) -> dict:
    funcs, kernels = scan(root)
    reached = close_over_calls(funcs)
    defined = {}
    for qual in funcs:
        defined.setdefault(qual.split(".")[-1], []).append(qual)

    def public(name, candidates):
        quals = [q for q in candidates if q in funcs]
        if not quals and name in kernels:
            return "sync_free", None
        if not quals:
            return None, None
        sites = {}
        for q in quals:
            sites.update(reached[q])
        if not sites:
            return "sync_free", None
        return "syncs", {"reads": len(sites), "where": [f"{s}  via {' -> '.join(c)}" for s, c in sorted(sites.items())]}

    out = {"cupy_version": api["cupy_version"],
           "made_by": "python -m gait_ref.emulation.find_syncs <CuPy source at tag v" + api["cupy_version"] + ">",
           "reads": "distinct read sites reachable from the call: an upper bound where a site is on an error branch",
           "syncs": {}, "sync_free": []}

    def top_level(n):       # a function, or a class: what calling it and its instances runs
        return [q for q in defined.get(n, []) if "." not in q] + [q for q in (f"{n}.__init__", f"{n}.__call__")
                                                                  if q in funcs]
    names = [(f"cupy.{n}", n, top_level(n)) for n in api["cupy"]]
    names += [(f"cupy.ndarray.{n}", n, [q for q in defined.get(OPERATOR_METHODS.get(n, n), [])
                                        if q.split(".")[0] in ("_ndarray_base", "ndarray")])
              for n in api["cupy.ndarray"]]
    names += [(f"cupy.random.{n}", n, [q for q in defined.get(n, []) if "." not in q]) for n in api["cupy.random"]]
    names += [(f"cupy.lib.stride_tricks.{n}", n, [q for q in defined.get(n, []) if "." not in q])
              for n in api["cupy.lib.stride_tricks"]]
    names += [(f"cupy.linalg.{n}", n, [q for q in defined.get(n, []) if "." not in q]) for n in api["cupy.linalg"]]
    names += [(f"cupy.random.Generator.{n}", n, [q for q in defined.get(n, []) if q.startswith("Generator.")])
              for n in api["cupy.random.Generator"]]
    for full, short, candidates in names:
        verdict, detail = public(short, candidates)
        if verdict == "syncs":
            out["syncs"][full] = detail
        elif verdict == "sync_free":
            out["sync_free"].append(full)
    for name, why in EXPLICIT_READS.items():
        out["syncs"][name] = {"reads": 1, "where": [why]}
        if name in out["sync_free"]:
            out["sync_free"].remove(name)
    out["sync_free"].sort()
    return out


if __name__ == "__main__":
    source = Path(sys.argv[1]) / "cupy"
    api = json.loads(Path(__file__).with_name("cupy-api.json").read_text())
    result = classify(source, api)
    out = Path(__file__).with_name("cupy-syncs.json")
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, out)
    print(f"wrote {out}: {len(result['syncs'])} syncing, {len(result['sync_free'])} sync-free")
