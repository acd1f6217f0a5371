#!/usr/bin/env bash
# Compile-check the CUDA extension's sources with plain nvcc for Hopper (sm_90a); no GPU needed.
# Every csrc/*.cu is compiled as setup.py's CUDAExtension would (torch's half/bf16 macros, -O3,
# warnings as errors); the torch binding (csrc/*.cpp) is compiled against the installed torch's
# headers, which the CPU wheel ships too (it lacks only the generated c10/cuda/impl/cuda_cmake_macros.h,
# skipped by C10_CUDA_NO_CMAKE_CONFIGURE_FILE; it only sets Windows export macros).
# Usage: scripts/check_cuda_compiles.sh   (NVCC and PYTHON override the tools)
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC=${NVCC:-nvcc}
PYTHON=${PYTHON:-.venv/bin/python}
ARCH=${CUDA_ARCH:-sm_90a}

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

torch_includes=$("$PYTHON" -c "from torch.utils.cpp_extension import include_paths; print(' '.join(include_paths()))")
python_include=$("$PYTHON" -c "import sysconfig; print(sysconfig.get_paths()['include'])")
cxx11_abi=$("$PYTHON" -c "import torch; print(int(torch.compiled_with_cxx11_abi()))")
torch_macros=(-D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__
    -D__CUDA_NO_HALF2_OPERATORS__)

for source in csrc/*.cu; do
    echo "nvcc -arch=$ARCH -c $source"
    "$NVCC" -arch="$ARCH" -std=c++17 -O3 --use_fast_math "${torch_macros[@]}" --Werror all-warnings \
        -Icsrc -c "$source" -o "$out/$(basename "$source").o"
done

system_includes=()
for dir in $torch_includes "$python_include"; do system_includes+=(-isystem "$dir"); done
for source in csrc/*.cpp; do
    echo "nvcc -c $source (torch binding)"
    "$NVCC" -std=c++17 -O1 -x c++ -Icsrc "${system_includes[@]}" -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE \
        -DTORCH_EXTENSION_NAME=_cuda -DTORCH_API_INCLUDE_EXTENSION_H -D_GLIBCXX_USE_CXX11_ABI="$cxx11_abi" \
        -Xcompiler -Wall,-Wextra,-Werror -c "$source" -o "$out/$(basename "$source").o"
done
echo "all CUDA sources compile for $ARCH"
