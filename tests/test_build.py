"""The native library itself: it loads, registers every op, and shares torch's C++ runtime."""
import shutil
import subprocess

import pytest
import torch

import pass_ext
from pass_ext import _C

OPS = ("attention_with_kv_cache", "speculative_verify", "sample", "decode_linear")


def test_ops_registered_with_every_kernel():
    assert pass_ext.build_info() in ("cpu", "cpu+cuda")
    for name in OPS:
        op = getattr(torch.ops.pass_ext, name)
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op.default.name(), "CPU")
        if pass_ext.ops.has_cuda_kernels():
            assert torch._C._dispatch_has_kernel_for_dispatch_key(op.default.name(), "CUDA")


@pytest.mark.skipif(shutil.which("readelf") is None, reason="needs readelf")
def test_links_the_shared_cpp_runtime():
    """A toolchain that links libstdc++ statically puts a second C++ runtime in the process next to torch's;
    formatting an error message then crashes (seen with a GCC under /opt on a GPU image). Rebuild with the
    system compiler: CXX=/usr/bin/g++ CC=/usr/bin/gcc pip install --no-build-isolation -e ."""
    dyn = subprocess.run(["readelf", "-d", _C.__file__], capture_output=True, text=True, check=True).stdout
    needed = [line for line in dyn.splitlines() if "(NEEDED)" in line]
    assert any("libstdc++" in line or "libc++" in line for line in needed), (
        f"{_C.__file__} does not link the shared C++ runtime (NEEDED: {needed}); rebuild with CXX=/usr/bin/g++")


def test_error_messages_format_numbers():
    """The error path formats integers and shapes; this crashed with a statically linked C++ runtime."""
    q = torch.randn(2, 3, 4, 64)
    k = torch.randn(2, 3, 2, 64)
    cache = torch.zeros(2, 2, 16, 64)
    with pytest.raises(RuntimeError, match=r"cache_lens must be \[B=2\], got \[1\]"):
        torch.ops.pass_ext.attention_with_kv_cache(q, k, k.clone(), cache, cache.clone(),
                                                   torch.zeros(1, dtype=torch.int32), None, 0.1, torch.empty_like(q))
