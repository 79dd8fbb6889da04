"""What megafusion relies on from transformers that changed in 5.x (the GPU target has
transformers 5 and torch 2.11; CI pins 4.57). Each test holds under both: some fail on
the old code under the pinned versions, the rest only under transformers 5 (said so)."""
from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TEXTS = ["A photo of a cat sitting on a mat.", "hello world", " leading space", "Ünïcödé  double  spaces\nnewline"]


def test_the_tokenizer_is_read_as_its_tokenizer_json_defines_it(tiny_llama, tmp_path):
    """transformers 5's LlamaTokenizer (named by the tiny Llama's tokenizer_config.json,
    written by transformers 4 from the SmolLM2 GGUF) rebuilds a Metaspace pipeline over
    this byte-level BPE: "hello world" became [2797, 683, 1886] instead of [28120, 905].
    load_tokenizer reads tokenizer.json as written, and what it saves names a class that
    transformers 5's AutoTokenizer reads the same way (the old code saved
    LlamaTokenizerFast: that assertion fails under 4.57 too)."""
    from tokenizers import Tokenizer

    from megafusion.model.loading import load_tokenizer, tokenizer_from_dir

    reference = Tokenizer.from_file(str(Path(tiny_llama) / "tokenizer.json"))
    tok = load_tokenizer(tiny_llama)
    for text in TEXTS:
        want = reference.encode(text, add_special_tokens=False).ids
        assert tok(text, add_special_tokens=False)["input_ids"] == want, text
        assert tok.decode(want) == reference.decode(want)
    assert tok(TEXTS[1])["input_ids"] == reference.encode(TEXTS[1]).ids  # the BOS of its post-processor

    # A directory that names LlamaTokenizerFast over a byte-level BPE, as transformers 4
    # writes it from the GGUF: the class is not what decides.
    named = tmp_path / "named"
    shutil.copytree(tiny_llama, named, ignore=shutil.ignore_patterns("*.safetensors"))
    cfg = json.loads((named / "tokenizer_config.json").read_text())
    (named / "tokenizer_config.json").write_text(json.dumps(dict(cfg, tokenizer_class="LlamaTokenizerFast")))
    assert tokenizer_from_dir(named)(TEXTS[1], add_special_tokens=False)["input_ids"] == \
        reference.encode(TEXTS[1], add_special_tokens=False).ids

    saved = tmp_path / "saved"
    tok.save_pretrained(saved)
    # transformers 5 names its PreTrainedTokenizerFast (an alias) TokenizersBackend
    assert json.loads((saved / "tokenizer_config.json").read_text())["tokenizer_class"] in \
        ("PreTrainedTokenizerFast", "TokenizersBackend")


def test_make_tiny_llama_leaves_its_architecture_as_it_found_it(tmp_path):
    """transformers 5's LlamaConfig adds rope_theta to the rope_scaling dict it is given:
    with TINY's own dict, the marker recorded a config no fresh process asks for, and
    the second make_tiny_llama (every test session's fixture) refused the directory.
    Fails on the old code under transformers 5 only."""
    from tools import make_tiny_llama as m

    before = copy.deepcopy(m.TINY)
    out = m.make_tiny_llama(tmp_path / "tiny", seed=0)
    assert m.TINY == before
    marker = json.loads((out / m.MARKER).read_text())
    assert marker["config"] == json.loads(json.dumps(dict(before, tie_word_embeddings=True)))


def test_the_hf_config_and_model_avoid_names_transformers_5_reads():
    """transformers 5's from_pretrained reads config.fusion_config as its own kernel-fusion
    mapping (a method there failed: "'function' object has no attribute 'items'") and
    wants _tied_weights_keys as {tied: source} (a list failed: "'list' object has no
    attribute 'keys'"). Both fail on the old code under 4.57 too."""
    from megafusion.model.hf import LMFusionForCausalLM, MegafusionConfig

    assert getattr(MegafusionConfig(), "fusion_config", None) is None
    assert LMFusionForCausalLM._tied_weights_keys == {"model.lm_head.weight": "model.embed_tokens.weight"}


def test_a_llava_base_with_its_processor_saved_by_transformers_5_is_accepted(tiny_llava_only, tmp_path):
    """transformers 5 saves a processor as processor_config.json (the image processor
    inside), not preprocessor_config.json. Fails on the old code under 4.57 too."""
    from megafusion.model.loading import BaseModelError, is_vlm_base

    base = tmp_path / "llava"
    shutil.copytree(tiny_llava_only, base, ignore=shutil.ignore_patterns("*.safetensors"))
    pre = base / "preprocessor_config.json"
    if pre.is_file():  # as transformers 4 writes it: the same content, under 5's name
        processor = json.loads((base / "processor_config.json").read_text()) if (base / "processor_config.json").is_file() else {}
        (base / "processor_config.json").write_text(json.dumps(dict(processor, image_processor=json.loads(pre.read_text()))))
        pre.unlink()
    assert is_vlm_base(str(base))
    (base / "processor_config.json").unlink()
    with pytest.raises(BaseModelError, match="without its processor"):
        is_vlm_base(str(base))


ZERO3_LOAD = r"""
import json, os, sys, torch
from megafusion.parallel.launch import use_private_extensions_dir
use_private_extensions_dir()  # the shm op's JIT build, where the runs' ranks keep it
import deepspeed
deepspeed.init_distributed(dist_backend="gloo")
from megafusion.model.loading import load_base
from megafusion.parallel.base_weights import load_base_zero3
from megafusion.parallel.gather import gathered
base = sys.argv[1]
ds = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}
torch.manual_seed(0)
state = torch.random.get_rng_state()
model, _ = load_base_zero3(base, torch.float32, ds)
assert torch.equal(state, torch.random.get_rng_state()), "load_base_zero3 drew from the global RNG"
whole, _ = load_base(base)
assert model.config.to_dict() == whole.config.to_dict(), "configs differ"
want = dict(whole.named_parameters())
for name, p in model.named_parameters():
    with gathered([p]):
        assert torch.equal(p.data, want[name]), name
for name, b in model.named_buffers():
    assert torch.equal(b, dict(whole.named_buffers())[name]), name
print("zero3 load ok")
"""


@pytest.mark.slow
def test_load_base_zero3_draws_nothing_and_equals_the_whole_load(tiny_llama, tmp_path):
    """transformers 5's _from_config under ZeRO-3 re-initialised every weight after
    construction (initialize_weights_zero3: gathered, initialised on rank 0 from the
    global RNG, broadcast), past no_init_weights, and wrote the built dtype into the
    config: rank 0's RNG advanced, so the image tower's seeds differed from the whole
    build (the gpu_check losses differed from transformers 4's). Fails on the old code
    under transformers 5 only."""
    env = dict(os.environ, DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0",
               WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", ZERO3_LOAD, tiny_llama], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0 and "zero3 load ok" in out.stdout, (out.stdout + out.stderr)[-3000:]


def _free_port() -> int:
    from megafusion.parallel.launch import free_port

    return free_port()
