"""Save a tiny randomly initialised LLaVA (or LLaVA-NeXT) with its processor, for tests of
LLaVAFusion (a vision-language base, issue 15).

    python tools/make_tiny_llava.py OUT_DIR [--next] [--seed 0]

The language model is tools/make_tiny_llama.py's architecture with an untied head, over
SmolLM2's tokenizer plus an "<image>" token; the vision encoder a 2-layer CLIP ViT on
32x32 images in 8x8 patches (16 feature tokens an image, the CLS token dropped as
LLaVA's "default" strategy does); the projector LLaVA's two-layer GELU MLP. --next gives
LlavaNextForConditionalGeneration with anyres grids up to 64x64 and its image_newline,
so an image's token count depends on its size. The directory loads in plain
transformers (AutoProcessor, LlavaForConditionalGeneration) like a real checkpoint. A
second call with the same arguments finds the directory and returns at once.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tools.make_tiny_llama import TINY, _jsonable  # noqa: E402

MARKER = "megafusion_tiny_llava.json"
IMAGE_SIZE, PATCH = 32, 8
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
              image_size=IMAGE_SIZE, patch_size=PATCH, projection_dim=32)
GRID_PINPOINTS = [[32, 32], [32, 64], [64, 32], [64, 64]]


def make_tiny_llava(out_dir: str | os.PathLike, seed: int = 0, next_: bool = False) -> Path:
    out = Path(out_dir).expanduser()
    made_by = {"seed": seed, "next": next_, "text": _jsonable(TINY), "vision": VISION, "padding": "left, eos"}
    marker = out / MARKER
    if marker.is_file():
        if json.loads(marker.read_text()) == made_by:
            return out
        raise SystemExit(f"{out}: already holds a tiny LLaVA made with other arguments; remove it or choose another directory")
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"{out}: exists and is not a tiny LLaVA directory made by this tool; choose another directory")

    import torch
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaNextConfig, LlavaNextForConditionalGeneration,
                              LlavaNextImageProcessor, LlavaNextProcessor, LlavaProcessor)

    from megafusion.model.loading import load_base_config, load_tokenizer

    tokenizer = load_tokenizer("smollm2")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    # Batched prompts pad on the left, as LLaVA's released processors do for generation.
    tokenizer.pad_token, tokenizer.padding_side = tokenizer.eos_token, "left"
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    smol = load_base_config("smollm2")
    text = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=smol.bos_token_id, eos_token_id=smol.eos_token_id,
                       pad_token_id=smol.pad_token_id, **dict(TINY, tie_word_embeddings=False))
    vision = CLIPVisionConfig(**VISION)
    common = dict(text_config=text.to_dict(), vision_config=vision.to_dict(), image_token_index=image_token_id,
                  vision_feature_select_strategy="default", vision_feature_layer=-2, tie_word_embeddings=False)
    crop = {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    if next_:
        config = LlavaNextConfig(**common, image_grid_pinpoints=GRID_PINPOINTS)
        model_cls = LlavaNextForConditionalGeneration
        processor = LlavaNextProcessor(
            LlavaNextImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size=crop,
                                    image_grid_pinpoints=GRID_PINPOINTS),
            tokenizer, patch_size=PATCH, vision_feature_select_strategy="default", num_additional_image_tokens=1)
    else:
        config = LlavaConfig(**common)
        model_cls = LlavaForConditionalGeneration
        processor = LlavaProcessor(CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size=crop),
                                   tokenizer, patch_size=PATCH, vision_feature_select_strategy="default",
                                   num_additional_image_tokens=1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config).to(torch.float32)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=out.name + ".tmp"))  # renamed into place when whole
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
        (tmp / MARKER).write_text(json.dumps(made_by, indent=1) + "\n")
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)
        if out.exists():
            out.rmdir()
        os.rename(tmp, out)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not marker.is_file():
            raise
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--next", action="store_true", help="LlavaNextForConditionalGeneration (anyres)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(make_tiny_llava(args.out_dir, seed=args.seed, next_=args.next))
    return 0


if __name__ == "__main__":
    sys.exit(main())
