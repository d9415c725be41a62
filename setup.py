# Build of record for pass_ext's native library: CPU kernels always, CUDA kernels when nvcc and a CUDA
# build of torch are present (FORCE_CUDA=1 compiles them without a GPU). CMakeLists.txt globs the same dirs.
import glob
import os

ROOT = os.path.dirname(os.path.abspath(__file__))
# torch guesses CUDA_HOME from the nvcc on PATH, which may be a wrapper outside the toolkit: prefer the toolkit.
if "CUDA_HOME" not in os.environ and os.path.isfile("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

import torch  # noqa: E402
from setuptools import setup  # noqa: E402
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def _rel(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _want_cuda():
    if os.environ.get("FORCE_CUDA", "0") == "1":
        if CUDA_HOME is None or torch.version.cuda is None:
            raise RuntimeError("FORCE_CUDA=1 but nvcc or a CUDA build of torch is missing "
                               f"(CUDA_HOME={CUDA_HOME}, torch.version.cuda={torch.version.cuda})")
        return True
    return CUDA_HOME is not None and torch.version.cuda is not None and torch.cuda.is_available()


def _extension():
    sources = _rel("csrc/pass_ext.cpp") + _rel("csrc/cpu/*.cpp")
    cxx = ["-O3"]
    include_dirs = [os.path.join(ROOT, "csrc")]
    if not _want_cuda():
        print("pass_ext: building CPU kernels only (no nvcc, no CUDA build of torch, or no GPU; "
              "set FORCE_CUDA=1 to compile the CUDA kernels anyway)")
        return CppExtension("pass_ext._C", sources, include_dirs=include_dirs,
                            extra_compile_args={"cxx": cxx})
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        # No GPU to read the architecture from: default to the H200/H100 (sm_90 machine code).
        os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"
    # torch's CUDA headers include cuSPARSE/cuBLAS headers; a bare toolkit may lack them while the
    # pip-installed CUDA libraries that torch depends on ship them.
    if not os.path.isfile(os.path.join(CUDA_HOME, "include", "cusparse.h")):
        import nvidia
        for base in nvidia.__path__:
            for sub in ("cu13/include", "cusparse/include", "cublas/include"):
                if os.path.isdir(os.path.join(base, sub)):
                    include_dirs.append(os.path.join(base, sub))
    print(f"pass_ext: building CPU + CUDA kernels (TORCH_CUDA_ARCH_LIST="
          f"{os.environ.get('TORCH_CUDA_ARCH_LIST', 'visible GPU')})")
    nvcc = ["-O3", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr",
            "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
            "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__"]
    return CUDAExtension("pass_ext._C", sources + _rel("csrc/cuda/*.cu"), include_dirs=include_dirs,
                         define_macros=[("PASS_EXT_WITH_CUDA", "1")],
                         extra_compile_args={"cxx": cxx + ["-DPASS_EXT_WITH_CUDA=1"], "nvcc": nvcc})


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
