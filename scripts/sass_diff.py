"""Which kernels two builds of the library compile differently: every cubin of both (cuobjdump -xelf all), each
function's SASS (nvdisasm) with addresses, label numbers, mangled names, nvcc's internal helper numbering and
spacing taken out, compared as multisets of bodies per cubin. Prints, per cubin that differs, the functions whose
body only one side has (a renamed template whose code did not change counts as the same), then a summary line.

    python3 scripts/sass_diff.py a.so b.so

CUOBJDUMP / NVDISASM name the tools (default: from PATH, then /usr/local/cuda/bin). On a machine without the
CUDA toolkit, PyPI's nvidia-cuda-cuobjdump and nvidia-cuda-nvdisasm wheels carry them. Exit status 1 when a
cubin differs.
"""

import collections
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile


def tool(name):
    path = os.environ.get(name.upper()) or shutil.which(name) or os.path.join("/usr/local/cuda/bin", name)
    if not os.path.exists(path):
        sys.exit(f"sass_diff: {name} not found (set {name.upper()})")
    return path


def cubins(lib, into):
    subprocess.run([tool("cuobjdump"), "-xelf", "all", os.path.abspath(lib)], cwd=into, check=True,
                   capture_output=True)
    return sorted(f for f in os.listdir(into) if f.endswith(".cubin"))


def bodies(path):
    """{function name: hash of its normalised instructions}."""
    sass = subprocess.run([tool("nvdisasm"), "-c", path], check=True, capture_output=True, text=True).stdout
    funcs, name = {}, None
    for line in sass.splitlines():
        m = re.match(r"^\.text\.(\S+):", line)
        if m:
            name = m.group(1)
            funcs[name] = []
            continue
        if name is None:
            continue
        ins = re.sub(r"/\*[0-9a-f]+\*/", "", line)
        ins = re.sub(r"\.L_x_\d+", ".L", ins)
        ins = re.sub(r"_Z[A-Za-z0-9_]+", "SYM", ins)
        ins = re.sub(r"__internal_\d+_", "__internal_", ins)
        ins = re.sub(r"\s+", " ", ins).strip()
        if ins.endswith(";") and not ins.startswith("//"):
            funcs[name].append(ins)
    return {n: hashlib.sha1("\n".join(b).encode()).hexdigest() for n, b in funcs.items()}


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    with tempfile.TemporaryDirectory() as da, tempfile.TemporaryDirectory() as db:
        names_a, names_b = cubins(sys.argv[1], da), cubins(sys.argv[2], db)
        same = differ = 0
        for f in sorted(set(names_a) | set(names_b)):
            if f not in names_a or f not in names_b:
                differ += 1
                print(f"{f}: only in {'b' if f not in names_a else 'a'}")
                continue
            a, b = bodies(os.path.join(da, f)), bodies(os.path.join(db, f))
            count_a, count_b = collections.Counter(a.values()), collections.Counter(b.values())
            only_a = [n for n, h in a.items() if count_b[h] == 0]
            only_b = [n for n, h in b.items() if count_a[h] == 0]
            if only_a or only_b:
                differ += 1
                print(f"{f}:")
                for n in only_a:
                    print(f"  only in a: {n}")
                for n in only_b:
                    print(f"  only in b: {n}")
            else:
                same += 1
    print(f"{same} cubins with the same kernel bodies, {differ} differing")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
