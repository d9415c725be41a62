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


@pytest.mark.skipif(shutil.which("g++") is None or shutil.which("gcc") is None, reason="needs gcc and g++")
def test_setup_probe_tells_a_static_cpp_runtime(monkeypatch, capsys):
    """setup.py links a probe library with the toolchain build_ext will use and switches to /usr/bin/g++ when the
    default one copies libstdc++ in; the probe must tell the two apart (LDFLAGS=-static-libstdc++ forces a copy)."""
    import os
    import runpy

    import setuptools

    monkeypatch.setattr(setuptools, "setup", lambda **kwargs: None)  # run setup.py's definitions, build nothing
    monkeypatch.setenv("PASS_EXT_CHECK_CXX", "0")
    for name in ("FORCE_CUDA", "TORCH_CUDA_ARCH_LIST"):  # _extension() may set the arch list
        monkeypatch.setenv(name, os.environ.get(name, ""))
    ns = runpy.run_path(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "setup.py"))
    for name in ("LDFLAGS", "CC", "CXX"):
        monkeypatch.delenv(name, raising=False)
    assert ns["_links_shared_cpp_runtime"]()
    monkeypatch.setenv("LDFLAGS", "-static-libstdc++")
    assert not ns["_links_shared_cpp_runtime"]()
    monkeypatch.setenv("PASS_EXT_CHECK_CXX", "1")
    ns["_use_system_compiler_if_needed"]()  # LDFLAGS forces the copy whatever the compiler: a warning, no switch
    assert "CXX" not in os.environ
    assert "links libstdc++ statically" in capsys.readouterr().out
