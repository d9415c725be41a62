# Build of record for pass_ext's native library: CPU kernels always, CUDA kernels when nvcc and a CUDA
# build of torch are present (FORCE_CUDA=1 compiles them without a GPU). CMakeLists.txt globs the same dirs.
import glob
import os

ROOT = os.path.dirname(os.path.abspath(__file__))
# torch guesses CUDA_HOME from the nvcc on PATH, which may be a wrapper outside the toolkit: prefer the toolkit.
if "CUDA_HOME" not in os.environ and os.path.isfile("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

import shutil  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402

import torch  # noqa: E402
from setuptools import setup  # noqa: E402
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def _links_shared_cpp_runtime() -> bool:
    """Whether the compiler and linker that build_ext will use put libstdc++ in a shared library as a dependency
    (NEEDED) rather than copying it in: a copy is a second C++ runtime next to torch's, and the extension then
    crashes on its first error message that formats a number (seen with a GCC under /opt on a GPU image).
    Answers True when it cannot tell (no compiler to try, a failed link)."""
    from setuptools._distutils import sysconfig as dist_sysconfig
    from setuptools._distutils.ccompiler import new_compiler

    compiler = new_compiler()
    dist_sysconfig.customize_compiler(compiler)
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "probe.cpp")
        with open(src, "w") as f:
            f.write("#include <sstream>\n#include <string>\n"
                    "std::string probe(long v) { std::ostringstream s; s << v; return s.str(); }\n")
        try:
            objects = compiler.compile([src], output_dir=tmp, extra_postargs=["-fPIC"])
            lib = os.path.join(tmp, "probe.so")
            compiler.link_shared_object(objects, lib, target_lang="c++")
        except Exception:  # noqa: BLE001 (no usable compiler here: the real build will say why)
            return True
        if shutil.which("readelf"):
            dyn = subprocess.run(["readelf", "-d", lib], capture_output=True, text=True).stdout
            return any("(NEEDED)" in line and ("libstdc++" in line or "libc++" in line) for line in dyn.splitlines())
        with open(lib, "rb") as f:
            data = f.read()
        return b"libstdc++.so" in data or b"libc++.so" in data


def _use_system_compiler_if_needed() -> None:
    """Build with /usr/bin/g++ and gcc when the toolchain build_ext would use (the default one, or CC / CXX from
    the environment: some images set them to such a GCC) links libstdc++ statically and the system compiler does
    not. PASS_EXT_CHECK_CXX=0 skips the probe."""
    if os.environ.get("PASS_EXT_CHECK_CXX", "1") == "0" or _links_shared_cpp_runtime():
        return
    before = {name: os.environ.get(name) for name in ("CC", "CXX")}
    if os.path.isfile("/usr/bin/g++") and os.path.isfile("/usr/bin/gcc"):
        os.environ["CC"], os.environ["CXX"] = "/usr/bin/gcc", "/usr/bin/g++"
        if _links_shared_cpp_runtime():
            print(f"pass_ext: the compiler (CC={before['CC']}, CXX={before['CXX']}) links libstdc++ statically, a "
                  "second C++ runtime next to torch's; building with /usr/bin/gcc and /usr/bin/g++ instead "
                  "(PASS_EXT_CHECK_CXX=0 keeps yours)")
            return
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    print("pass_ext: WARNING: the compiler links libstdc++ statically; the extension may crash on its first error "
          "message. Set CC and CXX to a compiler that links it as a shared library.")


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
    flags = ["-DPASS_EXT_WITH_CUDA=1"]
    if os.environ.get("PASS_EXT_TRACE", "0") == "1":
        # Per-block timestamps in the decode kernels (csrc/trace.h, bench/trace_step.py): a profiling build.
        print("pass_ext: PASS_EXT_TRACE=1: compiling the kernels' trace marks in")
        flags.append("-DPASS_EXT_TRACE=1")
    return CUDAExtension("pass_ext._C", sources + _rel("csrc/cuda/*.cu"), include_dirs=include_dirs,
                         define_macros=[("PASS_EXT_WITH_CUDA", "1")],
                         extra_compile_args={"cxx": cxx + flags, "nvcc": nvcc + flags})


_use_system_compiler_if_needed()
setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
