"""DeepSpeed's JIT-built ops are kept per Python environment: two checkouts' environments
resolve torch's extension build directory to two places (torch's default, one per user,
made them rebuild each other's ops: CPU Adam took 110 s whenever the other had run last),
the same environment always to the same place, and a TORCH_EXTENSIONS_DIR the user set
is kept."""
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# What a rank does before DeepSpeed loads an op: set up its environment, then ask torch
# where a JIT build of that op goes (DeepSpeed's op builders load through
# torch.utils.cpp_extension.load, which builds in this directory).
PROBE = ("import os, sys; sys.path.insert(0, os.getcwd())\n"
         "from megafusion.parallel.launch import setup_environment\n"
         "setup_environment()\n"
         "from torch.utils.cpp_extension import _get_build_directory\n"
         "print(_get_build_directory('cpu_adam', verbose=False))\n")


def build_dir(python: Path, cache: Path, **extra) -> Path:
    env = {k: v for k, v in os.environ.items()
           if k not in ("TORCH_EXTENSIONS_DIR", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    env.update(MEGAFUSION_CACHE=str(cache), DS_ACCELERATOR="cpu", **extra)
    out = subprocess.run([str(python), "-c", PROBE], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return Path(out.stdout.strip().splitlines()[-1])


def test_each_environment_builds_ops_in_its_own_directory(tmp_path):
    python = Path(sys.executable)
    # A second checkout's environment: the same interpreter and packages reached through
    # another prefix (as a clone whose .venv links to this one is).
    other_env = tmp_path / "other-checkout" / ".venv"
    other_env.parent.mkdir()
    other_env.symlink_to(Path(sys.prefix))
    other_python = other_env / "bin" / python.name

    here = build_dir(python, tmp_path / "cache")
    again = build_dir(python, tmp_path / "cache")
    there = build_dir(other_python, tmp_path / "cache")
    assert here == again
    assert here != there
    for d in (here, there):
        assert (tmp_path / "cache") in d.parents and d.name == "cpu_adam"

    mine = tmp_path / "my-extensions"
    assert build_dir(python, tmp_path / "cache", TORCH_EXTENSIONS_DIR=str(mine)).parent == mine
