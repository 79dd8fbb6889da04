"""tools/convert_to_hf.py in a fresh process, with the host memory it used measured:

    python export_memory_worker.py RESULT_JSON CONVERT_ARGS...

Everything the export imports is imported and the base tokenizer read first, and glibc
returns the memory freed so far (malloc_trim); then the resident-set peak (VmHWM) is reset to the current RSS through /proc/self/clear_refs
("5", Linux >= 4.0; where that is refused the peak so far stays, which can only raise
the figure). RESULT_JSON receives the RSS before the export, the peak after it (bytes)
and the export's exit status. The peak counts pages of memory-mapped files while they
are mapped, as a node's memory limit does."""
import ctypes
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def main() -> int:
    result, args = Path(sys.argv[1]), sys.argv[2:]
    import deepspeed.utils.zero_to_fp32  # noqa: F401
    import diffusers  # noqa: F401
    import huggingface_hub  # noqa: F401
    import safetensors.torch  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401
    from transformers.models.llama import modeling_llama  # noqa: F401

    import megafusion.data.sequence  # noqa: F401  (the data pipeline's special ids: mosaicml-streaming)
    import megafusion.export  # noqa: F401
    import megafusion.model.hf  # noqa: F401
    from megafusion.config import load_config
    from megafusion.model.loading import load_tokenizer
    from tools.convert_to_hf import main as convert

    try:  # the export's own modules, where it has them (the whole-model exporter has none)
        import megafusion.export_stream  # noqa: F401
    except ImportError:
        pass
    run_dir = Path(args[0])
    load_tokenizer(load_config(run_dir / "config.yaml").model.base)
    try:  # memory freed so far back to the system, or the export could reuse it unmeasured
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        Path("/proc/self/clear_refs").write_text("5")
        reset = True
    except OSError:
        reset = False
    before = status_bytes("VmRSS")
    code = convert(args)
    result.write_text(json.dumps({"rss_before": before, "peak": status_bytes("VmHWM"), "peak_reset": reset,
                                  "exit": code}))
    return code


if __name__ == "__main__":
    sys.exit(main())
