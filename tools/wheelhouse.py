"""The packages a GPU machine without network lacks, as a wheelhouse: built on a machine
with PyPI, installed offline there. Used by tools/gpu_check.py (--build-wheels DIR,
--wheels DIR).

The target (DESIGN.md): Python 3.12, torch 2.11, transformers 5.x, no deepspeed,
diffusers or mosaicml-streaming. The wheelhouse holds those and the packages they import
that the target lacks, at the versions installed here (tested together), as Python 3.12
wheels; deepspeed publishes an sdist only, so its wheel is built here (pure Python: its
ops compile at run time). Beside them: the tiny Llama that gpu_check trains (its SmolLM2
tokenizer comes from a GGUF package that is not on the target) and a copy of megafusion's
source. About 30 MB; `build` takes about a minute.

Installed with pip --no-index --no-deps into a temporary directory put on sys.path and
PYTHONPATH: mosaicml-streaming pins transformers<5 and numpy<2.2, so resolving
dependencies would make pip refuse, or downgrade what the target has.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# {distribution: module}. Found by importing the training, data and check code with every
# distribution hidden that the target does not have (tests/tools/test_gpu_check.py redoes it).
WHEELS = {
    "deepspeed": "deepspeed", "hjson": "hjson", "pydantic": "pydantic", "pydantic-core": "pydantic_core",
    "annotated-types": "annotated_types", "typing-inspection": "typing_inspection",
    "diffusers": "diffusers",
    "mosaicml-streaming": "streaming", "catalogue": "catalogue", "zstd": "zstd",
    "python-snappy": "snappy", "cramjam": "cramjam", "brotli": "brotli",
}
TARGET_PYTHON = "3.12"
SOURCE_DIRS = ("megafusion", "tools", "configs", "ds_configs")
PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in range(5, 40)] + ["manylinux2014_x86_64", "manylinux1_x86_64", "any"]


def log(msg: str) -> None:
    print(f"[wheelhouse] {msg}", file=sys.stderr, flush=True)


def build(out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    pins = {d: importlib.metadata.version(d) for d in WHEELS}
    for old in out.glob("*.whl"):  # one version of each, or pip would choose
        if old.name.split("-")[0].lower().replace("_", "-") in pins:
            old.unlink()
    pip = [sys.executable, "-m", "pip"]
    binary = [f"{d}=={v}" for d, v in pins.items() if d != "deepspeed"]
    log(f"downloading {len(binary)} wheels for Python {TARGET_PYTHON}")
    subprocess.run([*pip, "download", "--quiet", "--no-deps", "--only-binary=:all:", "--python-version", TARGET_PYTHON,
                    "--implementation", "cp", *[a for p in PLATFORMS for a in ("--platform", p)], "-d", str(out),
                    *binary], check=True)
    log(f"building deepspeed=={pins['deepspeed']} from its sdist")
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([*pip, "download", "--quiet", "--no-deps", "--no-binary=:all:", "-d", tmp,
                        f"deepspeed=={pins['deepspeed']}"], check=True)
        subprocess.run([*pip, "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", str(out),
                        str(next(Path(tmp).glob("deepspeed-*")))], check=True, env=dict(os.environ, DS_BUILD_OPS="0"))
    sys.path.insert(0, str(REPO))
    from tools.make_tiny_llama import make_tiny_llama

    make_tiny_llama(out / "tiny-llama", seed=0)
    src = out / "megafusion-src"
    shutil.rmtree(src, ignore_errors=True)
    for d in SOURCE_DIRS:
        shutil.copytree(REPO / d, src / d, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    (out / "manifest.json").write_text(json.dumps({"python": TARGET_PYTHON, "pins": pins}, indent=1) + "\n")
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    log(f"{out}: {len(list(out.glob('*.whl')))} wheels, tiny-llama, megafusion-src; {size / 2**20:.1f} MiB")
    return out


def install(wheels: Path | None) -> dict:
    """Install the WHEELS this interpreter lacks from `wheels`, offline; what was missing."""
    missing = [d for d, module in WHEELS.items() if importlib.util.find_spec(module) is None]
    info = {"missing": missing}
    if not missing or wheels is None:
        return info
    site = Path(tempfile.gettempdir()) / "megafusion-wheelhouse-site"
    log(f"installing {', '.join(missing)} from {wheels} into {site}")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--upgrade",
                    "--find-links", str(wheels), "--target", str(site), *missing], check=True, stdout=sys.stderr)
    sys.path.insert(0, str(site))
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(site), str(REPO), os.environ.get("PYTHONPATH")) if p)
    importlib.invalidate_caches()
    info.update(installed_into=str(site), missing=[d for d, m in WHEELS.items() if importlib.util.find_spec(m) is None])
    return info
