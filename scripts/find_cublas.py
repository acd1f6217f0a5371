"""Print the include and library folders of cuBLASLt (cublasLt.h, libcublasLt.so*), one per line, for
setup.py and scripts/check_cuda_compiles.sh; exit 1 with the places searched when either is missing.

Searched in order: $CUBLAS_HOME/{include,lib64,lib}; the CUDA toolkit ($CUDA_HOME, or the folder above
nvcc's bin/); the NVIDIA pip wheels beside this Python (nvidia-cublas for CUDA 13: nvidia/cu13/,
nvidia-cublas-cu12: nvidia/cublas/), which CUDA builds of torch depend on.
"""

from __future__ import annotations

import glob
import os
import shutil
import sys
import sysconfig


def candidates() -> list[str]:
    roots = [os.environ.get("CUBLAS_HOME"), os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = os.path.realpath(nvcc)
        roots.append(os.path.dirname(os.path.dirname(real)))
        with open(real, "rb") as handle:  # a wrapper script such as `exec /usr/local/cuda-13.0/bin/nvcc`
            head = handle.read(4096)
        if head.startswith(b"#!"):
            for word in head.decode(errors="ignore").split():
                if word.endswith("/bin/nvcc"):
                    roots.append(os.path.dirname(os.path.dirname(word)))
    roots.append("/usr/local/cuda")
    site = sysconfig.get_paths()["purelib"]
    roots += sorted(glob.glob(os.path.join(site, "nvidia", "cu1*")), reverse=True)
    roots.append(os.path.join(site, "nvidia", "cublas"))
    return [r for r in roots if r]


def find() -> tuple[str, str] | None:
    for root in candidates():
        include = os.path.join(root, "include")
        if not os.path.isfile(os.path.join(include, "cublasLt.h")):
            continue
        for lib in ("lib64", "lib", os.path.join("targets", "x86_64-linux", "lib")):
            if glob.glob(os.path.join(root, lib, "libcublasLt.so*")):
                return include, os.path.join(root, lib)
    return None


if __name__ == "__main__":
    found = find()
    if found is None:
        print("cuBLASLt not found in: " + ", ".join(candidates()), file=sys.stderr)
        sys.exit(1)
    print(found[0])
    print(found[1])
