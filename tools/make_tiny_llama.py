"""Save a tiny randomly initialised Llama with the SmolLM2 tokenizer, for tests and
configs/tiny.yaml.

    python tools/make_tiny_llama.py OUT_DIR [--seed 0] [--untied]

2 layers, hidden 64, 4 heads over 2 KV heads (grouped-query attention, as in Llama 3),
MLP 128, Llama 3 rope scaling, tied embeddings over SmolLM2's 49152-token vocabulary
(3.1M of its 3.3M parameters are the embedding). --untied gives it a separate output
head, as Llama 3 8B/70B have (tied bases hide bugs where the head is assumed to be the
embedding). The weights depend only on the seed; a second call with the same seed (and
the same --untied) finds the directory and returns at once.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

MARKER = "megafusion_tiny.json"  # records what made the directory, for idempotence

TINY = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    max_position_embeddings=4096,
    rope_theta=500000.0,
    # Llama 3's frequency-dependent rope scaling, so the tiny model exercises it.
    rope_scaling={
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 512,
    },
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
    hidden_act="silu",
)


def make_tiny_llama(out_dir: str | os.PathLike, seed: int = 0, untied: bool = False) -> Path:
    """Write the tiny model and tokenizer to out_dir (if not already there) and return it."""
    out = Path(out_dir).expanduser()
    arch = dict(TINY, tie_word_embeddings=not untied)
    marker = out / MARKER
    if marker.is_file():
        made = json.loads(marker.read_text())
        if made.get("seed") == seed and made.get("config") == _jsonable(arch):
            return out
        raise SystemExit(f"{out}: already holds a tiny Llama made with seed {made.get('seed')}; remove it or choose another directory")
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"{out}: exists and is not a tiny Llama directory made by this tool; choose another directory")

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from megafusion.model.loading import load_base_config, load_tokenizer

    tokenizer = load_tokenizer("smollm2")
    smol = load_base_config("smollm2")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=smol.bos_token_id,
        eos_token_id=smol.eos_token_id,
        pad_token_id=smol.pad_token_id,
        # A copy: transformers 5's LlamaConfig adds rope_theta to the rope_scaling dict it
        # is given, which is TINY's own, and the marker written below would then record a
        # config that no fresh process asks for.
        **json.loads(json.dumps(arch)),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).to(torch.float32)

    out.parent.mkdir(parents=True, exist_ok=True)
    # Build in a sibling and rename, so concurrent callers never see half a directory.
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=out.name + ".tmp"))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / MARKER).write_text(json.dumps({"seed": seed, "config": _jsonable(arch)}, indent=1) + "\n")
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.rename(tmp, out)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (out / MARKER).is_file():  # not a lost race with another writer
            raise
    return out


def _jsonable(value):
    return json.loads(json.dumps(value))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", help="directory to write (a Hugging Face LlamaForCausalLM directory)")
    parser.add_argument("--seed", type=int, default=0, help="weight initialisation seed (default 0)")
    parser.add_argument("--untied", action="store_true", help="a separate output head (tie_word_embeddings false)")
    args = parser.parse_args(argv)
    print(make_tiny_llama(args.out_dir, seed=args.seed, untied=args.untied))
    return 0


if __name__ == "__main__":
    sys.exit(main())
