"""Session-wide fixtures (the tiny random Llama that configs/tiny.yaml names, synthetic
shards) and the hooks that let pytest-xdist workers run the suite side by side."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

_SHM_BEFORE = pytest.StashKey[set]()

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # tests/launchers.py (site-packages may hold a "tests" package)


def cache_root() -> Path:
    return Path(os.environ.get("MEGAFUSION_CACHE", Path.home() / ".cache" / "megafusion"))


def _in_controller(config) -> bool:
    """This process is pytest's own (plain pytest, or pytest-xdist's controller), not an
    xdist worker: hooks that act once per test run belong here."""
    return not hasattr(config, "workerinput")


def _deepspeed_shm() -> set[Path]:
    shm = Path("/dev/shm")
    return set(shm.glob("deepspeed_*")) if shm.is_dir() else set()


def pytest_sessionstart(session):
    if _in_controller(session.config):
        session.config.stash[_SHM_BEFORE] = _deepspeed_shm()


def pytest_sessionfinish(session):
    """DeepSpeed's CPU launcher leaves ~69 MB allreduce buffers in /dev/shm per run;
    remove the ones this test run created. Only the controller does, after every worker
    has finished: a worker that finished its share early would otherwise remove the
    buffers of launches the other worker still has running."""
    if not _in_controller(session.config):
        return
    for path in _deepspeed_shm() - session.config.stash.get(_SHM_BEFORE, set()):
        try:
            path.unlink()
        except OSError:
            pass


def _xdist_unit(nodeid: str) -> str:
    """The unit of work a test belongs to under pytest-xdist: its module, so that module
    fixtures (trained runs, launches) are built once; and one unit for all of tests/slurm/,
    because each of its files starts a local Slurm whose job ids count from 1 and
    slurm/common.sh derives MASTER_PORT from the job id: two at once would ask for the
    same port."""
    module = nodeid.split("::", 1)[0]
    return "tests/slurm/" if module.startswith("tests/slurm/") else module


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """`make test` runs two pytest-xdist workers; they share the suite by _xdist_unit.
    (A scheduler, not xdist_group marks: xdist 3.8 applies those by renaming node ids
    through an attribute pytest 9 no longer reads, so the marks do nothing.)"""
    if config.getvalue("dist") not in ("load", "loadscope", "loadfile", "loadgroup"):
        return None  # "each", "worksteal": what the user asked for
    from xdist.scheduler import LoadScopeScheduling

    class ByUnit(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _xdist_unit(nodeid)

    return ByUnit(config, log)


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
