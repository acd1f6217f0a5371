"""Build script: the pure-Python package always; the CUDA extension only where it can be built.

The extension (`slm_fast._cuda`) needs a CUDA build of torch and an nvcc toolkit. Everywhere else
(CPU-only torch, no toolkit, SLM_FAST_NO_CUDA=1) the package installs without it and the torch and
Triton backends cover every feature. Install without build isolation so this file sees the torch
that is installed: `pip install --no-build-isolation -e .`.
"""

import glob
import os
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
        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            suffix = "a" if major == 9 else ""
            os.environ["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}{suffix}"
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0a"
    sources = sorted(glob.glob("csrc/*.cu")) + sorted(glob.glob("csrc/*.cpp"))
    if not sources:
        return [], {}, "csrc/ holds no sources"
    ext = CUDAExtension(
        name="slm_fast._cuda",
        sources=sources,
        include_dirs=[os.path.abspath("csrc")],
        extra_compile_args={"cxx": ["-O3", "-std=c++17"], "nvcc": ["-O3", "-std=c++17", "--use_fast_math"]},
    )
    return [ext], {"build_ext": BuildExtension}, None


ext_modules, cmdclass, reason = cuda_extension_or_reason()
if reason:
    print(f"slm_fast: skipping the CUDA extension: {reason}", file=sys.stderr)

setup(ext_modules=ext_modules, cmdclass=cmdclass)
