"""Session-wide fixtures: the tiny random Llama that configs/tiny.yaml names, and
synthetic shards."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # tests/launchers.py (site-packages may hold a "tests" package)


def cache_root() -> Path:
    return Path(os.environ.get("MEGAFUSION_CACHE", Path.home() / ".cache" / "megafusion"))


@pytest.fixture(scope="session", autouse=True)
def clean_deepspeed_shm():
    """DeepSpeed's CPU launcher leaves ~69 MB allreduce buffers in /dev/shm per run;
    remove the ones this session created."""
    shm = Path("/dev/shm")
    before = set(shm.glob("deepspeed_*")) if shm.is_dir() else set()
    yield
    for path in (set(shm.glob("deepspeed_*")) if shm.is_dir() else set()) - before:
        try:
            path.unlink()
        except OSError:
            pass


@pytest.fixture(scope="session")
def tiny_llama() -> str:
    """configs/tiny.yaml's model.base (written once, idempotent)."""
    from tools.make_tiny_llama import make_tiny_llama

    out = cache_root() / "tiny-llama"
    make_tiny_llama(str(out), seed=0)
    return str(out)


@pytest.fixture(scope="session")
def tiny_llama_untied() -> str:
    """The same tiny Llama with a separate output head (Llama 3 8B/70B are untied)."""
    from tools.make_tiny_llama import make_tiny_llama

    out = cache_root() / "tiny-llama-untied"
    make_tiny_llama(str(out), seed=0, untied=True)
    return str(out)


def _tiny_llava(kind: str) -> str:
    from tools.make_tiny_llava import make_tiny_llava

    out = cache_root() / f"tiny-{kind.replace('_', '-')}"
    make_tiny_llava(str(out), seed=0, next_=kind == "llava_next")
    return str(out)


@pytest.fixture(scope="session", params=["llava", "llava_next"])
def tiny_llava(request) -> str:
    """A tiny random LLaVA (or LLaVA-NeXT) with its processor (tools/make_tiny_llava.py)."""
    return _tiny_llava(request.param)


@pytest.fixture(scope="session")
def tiny_llava_only() -> str:
    """The tiny LLaVA alone, for tests too slow to run for both kinds."""
    return _tiny_llava("llava")


@pytest.fixture(scope="session")
def synthetic_shards(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("synthetic") / "train"
    subprocess.run([sys.executable, str(REPO / "tools" / "prepare_data.py"), "synthetic", "--out", str(out),
                    "--n", "2000", "--seed", "0"], check=True, capture_output=True)
    return str(out)


@pytest.fixture
def apex_stand_in(monkeypatch):
    """install(submodule=attrs, ...): registers an importable stand-in `apex` package for
    this test (NVIDIA apex needs CUDA to build), e.g. install(normalization={"FusedRMSNorm": C})
    makes `from apex.normalization import FusedRMSNorm` give C."""
    import importlib.machinery
    import types

    def install(**submodules):
        apex = types.ModuleType("apex")
        # A package with a spec: libraries probe importlib.util.find_spec("apex").
        apex.__spec__ = importlib.machinery.ModuleSpec("apex", None, is_package=True)
        monkeypatch.setitem(sys.modules, "apex", apex)
        for name, attrs in submodules.items():
            module = types.ModuleType(f"apex.{name}")
            for key, value in attrs.items():
                setattr(module, key, value)
            setattr(apex, name, module)
            monkeypatch.setitem(sys.modules, f"apex.{name}", module)

    return install
