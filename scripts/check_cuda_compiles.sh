#!/usr/bin/env bash
# Compile-check the CUDA extension's sources with plain nvcc for Ampere (sm_80) and Hopper (sm_90)
# plus PTX (compute_90, the fallback newer GPUs JIT-compile), the targets setup.py builds; no GPU needed. Every csrc/*.cu is
# compiled as setup.py's CUDAExtension would (torch's half/bf16 macros, -O3, warnings as errors) and
# the device objects are linked into a shared library against cuBLASLt (found by scripts/find_cublas.py:
# the CUDA toolkit or the nvidia-cublas wheel), so unresolved cuBLASLt symbols fail here too; the torch
# binding (csrc/*.cpp) is compiled against the installed torch's headers, which the CPU wheel ships too
# (it lacks only the generated c10/cuda/impl/cuda_cmake_macros.h, skipped by
# C10_CUDA_NO_CMAKE_CONFIGURE_FILE; it only sets Windows export macros).
# Usage: scripts/check_cuda_compiles.sh   (NVCC and PYTHON override the tools)
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC=${NVCC:-nvcc}
PYTHON=${PYTHON:-.venv/bin/python}
GENCODE=(-gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90
    -gencode arch=compute_90,code=compute_90)

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

mapfile -t cublas < <("$PYTHON" scripts/find_cublas.py)
cublas_include=${cublas[0]}
cublas_lib=${cublas[1]}
torch_includes=$("$PYTHON" -c "from torch.utils.cpp_extension import include_paths; print(' '.join(include_paths()))")
python_include=$("$PYTHON" -c "import sysconfig; print(sysconfig.get_paths()['include'])")
cxx11_abi=$("$PYTHON" -c "import torch; print(int(torch.compiled_with_cxx11_abi()))")
torch_macros=(-D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__
    -D__CUDA_NO_HALF2_OPERATORS__)

objects=()
for source in csrc/*.cu; do
    echo "nvcc sm_80 sm_90 compute_90 -c $source"
    object="$out/$(basename "$source").o"
    "$NVCC" "${GENCODE[@]}" -std=c++17 -O3 --use_fast_math "${torch_macros[@]}" --Werror all-warnings \
        -Xcompiler -fPIC -Icsrc -isystem "$cublas_include" -c "$source" -o "$object"
    objects+=("$object")
done
"$NVCC" -shared "${GENCODE[@]}" "${objects[@]}" -L"$cublas_lib" -l:"$(basename "$(ls "$cublas_lib"/libcublasLt.so* | head -1)")" \
    -Xlinker --no-undefined -o "$out/device_code.so"
echo "device code links against cuBLASLt ($cublas_lib)"

system_includes=()
for dir in $torch_includes "$python_include" "$cublas_include"; do system_includes+=(-isystem "$dir"); done
for source in csrc/*.cpp; do
    echo "nvcc -c $source (torch binding)"
    "$NVCC" -std=c++17 -O1 -x c++ -Icsrc "${system_includes[@]}" -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE \
        -DTORCH_EXTENSION_NAME=_cuda -DTORCH_API_INCLUDE_EXTENSION_H -D_GLIBCXX_USE_CXX11_ABI="$cxx11_abi" \
        -Xcompiler -Wall,-Wextra,-Werror -c "$source" -o "$out/$(basename "$source").o"
done
echo "all CUDA sources compile for sm_80, sm_90 and compute_90 (PTX)"
