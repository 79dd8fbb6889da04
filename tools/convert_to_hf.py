"""Export a training checkpoint as a Hugging Face model directory.

    python tools/convert_to_hf.py CHECKPOINT_DIR OUT_DIR [--tag TAG] [--dtype bf16|fp32]
                                  [--max-shard-size 5GB] [--overwrite]

CHECKPOINT_DIR is a run directory, its checkpoints/ directory or one checkpoint tag
directory; without --tag the checkpoint `latest` names is taken (the newest complete
one). The export streams: each shard is made from its tensors alone, read from the
memory-mapped checkpoint (ZeRO partitions laid out by DeepSpeed's zero_to_fp32, stage-0
or pipeline layer files) and, for the frozen text tower, from the base model's
safetensors that the run config (run.dir/config.yaml) names; host memory is about one
shard plus one layer, whatever the model's size. OUT_DIR receives sharded safetensors
with an index, config.json (auto_map to the copied megafusion/model code),
generation_config.json, the tokenizer with the begin/end-of-image tokens, the VAE (vae/,
in VAE mode), the run config and a model card:

    AutoModelForCausalLM.from_pretrained(OUT_DIR, trust_remote_code=True)

The export is written into a new directory beside OUT_DIR and takes OUT_DIR's place
only when complete: a failed export (a full disk, say) leaves OUT_DIR, or the export
it held before --overwrite, as it was. OUT_DIR may not be, contain or lie inside the
checkpoint, the base model or the VAE it reads (an export inside the run directory,
e.g. RUN_DIR/hf, is fine).

--dtype defaults to the run's train.dtype. See megafusion/export.py.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="tools/convert_to_hf.py", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint_dir", help="run directory, its checkpoints/ directory or a checkpoint tag directory")
    p.add_argument("out_dir", help="Hugging Face model directory to write")
    p.add_argument("--tag", default=None, help="checkpoint tag, e.g. global_step300 (default: the `latest` one)")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default=None, help="weight dtype (default: the run's train.dtype)")
    p.add_argument("--max-shard-size", default="5GB",
                   help="largest safetensors shard (default 5GB = 5e9 bytes; units KB, MB, GB, TB); "
                        "the export holds one shard in memory")
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists and is not empty")
    args = p.parse_args(argv)

    # DeepSpeed (read for its checkpoint layout) picks an accelerator when imported and,
    # finding no GPU, says so in a warning; the export is CPU work either way.
    import os

    import torch

    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    from megafusion.export import ExportError, export_checkpoint

    try:
        out = export_checkpoint(args.checkpoint_dir, args.out_dir, tag=args.tag, dtype=args.dtype,
                                max_shard_size=args.max_shard_size, overwrite=args.overwrite)
    except ExportError as exc:
        print(f"error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
