"""Build script: the pure-Python package always; the CUDA extension only where it can be built.

The extension (`slm_fast._cuda`) needs a CUDA build of torch, an nvcc toolkit and cuBLASLt (the
toolkit's, or the nvidia-cublas wheel's: scripts/find_cublas.py). It is built for sm_80 and sm_90
with PTX for newer GPUs (TORCH_CUDA_ARCH_LIST overrides; the local GPU's architecture is added when it
is neither). Everywhere else
(CPU-only torch, no toolkit, SLM_FAST_NO_CUDA=1) the package installs without it and the torch and
Triton backends cover every feature. Install without build isolation so this file sees the torch
that is installed: `pip install --no-build-isolation -e .`.
"""

import glob
import os
import runpy
import sys

from setuptools import setup


def cuda_extension_or_reason():
    """Return ([extension], cmdclass) when the CUDA extension can be built, else ([], {}) and a reason."""
    if os.environ.get("SLM_FAST_NO_CUDA") == "1":
        return [], {}, "SLM_FAST_NO_CUDA=1"
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError as exc:
        return [], {}, f"torch is not importable at build time ({exc}); install with --no-build-isolation"
    if torch.version.cuda is None:
        return [], {}, f"torch {torch.__version__} is a CPU build"
    if CUDA_HOME is None:
        return [], {}, "no CUDA toolkit found (set CUDA_HOME)"
    if "TORCH_CUDA_ARCH_LIST" not in os.environ:
        archs = ["8.0", "9.0+PTX"]
        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            if f"{major}.{minor}" not in ("8.0", "9.0"):
                archs.append(f"{major}.{minor}")
        os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(archs)
    cublas = runpy.run_path(os.path.join("scripts", "find_cublas.py"))["find"]()
    if cublas is None:
        return [], {}, "cuBLASLt not found (install nvidia-cublas, or a CUDA toolkit with it: scripts/find_cublas.py)"
    cublas_include, cublas_lib = cublas
    libraries = sorted(glob.glob(os.path.join(cublas_lib, "libcublasLt.so*")), key=len)
    sources = sorted(glob.glob("csrc/*.cu")) + sorted(glob.glob("csrc/*.cpp"))
    if not sources:
        return [], {}, "csrc/ holds no sources"
    ext = CUDAExtension(
        name="slm_fast._cuda",
        sources=sources,
        include_dirs=[os.path.abspath("csrc"), cublas_include],
        library_dirs=[cublas_lib],
        extra_compile_args={"cxx": ["-O3", "-std=c++17"], "nvcc": ["-O3", "-std=c++17", "--use_fast_math"]},
        extra_link_args=[f"-l:{os.path.basename(libraries[0])}", f"-Wl,-rpath,{cublas_lib}"],
    )
    return [ext], {"build_ext": BuildExtension}, None


ext_modules, cmdclass, reason = cuda_extension_or_reason()
if reason:
    print(f"slm_fast: skipping the CUDA extension: {reason}", file=sys.stderr)

setup(ext_modules=ext_modules, cmdclass=cmdclass)
