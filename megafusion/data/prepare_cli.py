"""The command line of tools/prepare_data.py (usage: megafusion/data/prepare.py): every
input is checked and the models load before anything at --out changes; a local --out is
written in a staging directory and installed when complete."""
from __future__ import annotations

import argparse
import sys

from .prepare import (DEFAULT_SHARD_SIZE, PrepareError, Staging, Summary, check_image_sources, check_out,
                      check_text_sources, is_url, join_out, write_images, write_summary, write_synthetic, write_text)


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser(prog: str = "prepare_data.py") -> argparse.ArgumentParser:
    p = _Parser(prog=prog, description="Write MDS shards for megafusion.")
    sub = p.add_subparsers(dest="command", metavar="{synthetic,images,text}", parser_class=_Parser)

    def common(sp):
        sp.add_argument("--out", required=True, help="output directory or object-store URL")
        sp.add_argument("--overwrite", action="store_true", help="replace a non-empty local --out")
        sp.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE, help="bytes per shard (before compression)")

    def aligned(sp):
        sp.add_argument("--align-encoder", default=None, metavar="PATH",
                        help="CLIP, SigLIP or DINOv2 directory: also store its patch features (model.align_encoder)")
        sp.add_argument("--align-feature-layer", type=int, default=None, metavar="K",
                        help="which of its hidden states (default: CLIP's penultimate, the last for the others)")

    s = sub.add_parser("synthetic", help="built-in coloured-shapes image-caption data")
    common(s)
    s.add_argument("--n", type=int, required=True, help="training samples")
    s.add_argument("--size", type=int, default=32)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--val-n", type=int, default=None, help="held-out samples written to OUT/val (default n/10, at most 1000; 0: none)")
    s.add_argument("--vae", default=None, help="AutoencoderKL directory: also store latents")
    aligned(s)

    i = sub.add_parser("images", help="folders or webdataset .tar files of captioned images")
    i.add_argument("sources", nargs="*", metavar="SOURCE")
    common(i)
    i.add_argument("--size", type=int, default=256)
    i.add_argument("--vae", default=None, help="AutoencoderKL directory: also store latents")
    i.add_argument("--image-format", choices=("auto", "png", "jpeg"), default="auto")
    aligned(i)

    t = sub.add_parser("text", help="jsonl files with a `text` field")
    t.add_argument("sources", nargs="*", metavar="SOURCE")
    common(t)
    return p


def _convert(args, root: str) -> list[tuple[Summary, str]]:
    """Write the command's output under `root`: [(summary, sub-path of root)], each
    summary also written to its directory."""
    done = []
    align = dict(align_encoder=getattr(args, "align_encoder", None),
                 align_feature_layer=getattr(args, "align_feature_layer", None))
    if args.command == "synthetic":
        done.append((write_synthetic(root, args.n, args.size, args.seed, "train", args.vae, args.shard_size,
                                     **align), ""))
        val_n = min(max(args.n // 10, 1), 1000) if args.val_n is None else args.val_n
        if val_n > 0:
            done.append((write_synthetic(join_out(root, "val"), val_n, args.size, args.seed, "val", args.vae,
                                         args.shard_size, **align), "val"))
    elif args.command == "images":
        done.append((write_images(args.sources, root, args.size, args.vae, args.image_format, args.shard_size,
                                  **align), ""))
    else:
        done.append((write_text(args.sources, root, args.shard_size), ""))
    for summary, sub in done:
        write_summary(join_out(root, sub) if sub else root, summary)
    return done


def main(argv: list[str] | None = None, prog: str = "prepare_data.py") -> int:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.error("missing subcommand: synthetic, images or text")
    stage = None
    try:
        # Every input is checked, and the models load, before anything at --out changes.
        if getattr(args, "size", 1) < 1:
            raise PrepareError(f"--size {args.size}: must be >= 1")
        if args.command == "synthetic" and args.n < 1:
            raise PrepareError(f"--n {args.n}: must be >= 1")
        if args.command == "images":
            check_image_sources(args.sources)
        if args.command == "text":
            check_text_sources(args.sources)
        if getattr(args, "align_feature_layer", None) is not None and not args.align_encoder:
            raise PrepareError(f"--align-feature-layer {args.align_feature_layer} is for --align-encoder (not given)")
        replacing = check_out(args.out, args.overwrite)
        stage = None if is_url(args.out) else Staging(args.out)
        try:
            done = _convert(args, args.out if stage is None else str(stage.path))
        except BaseException:
            if stage is not None:
                stage.discard()
            raise
        written = done[0][0].written
        if stage is not None:
            if written == 0 and replacing:
                stage.discard()
                skipped = ", ".join(f"{k}={v}" for k, v in sorted(done[0][0].skipped.items())) or "none"
                print(f"{prog}: error: nothing written (every input row was skipped: {skipped}); "
                      f"{args.out} left as it was", file=sys.stderr)
                return 1
            stage.install()
        for summary, sub in done:
            print(summary.line(join_out(args.out, sub) if sub else args.out), flush=True)
    except PrepareError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # reading a source or writing the output
        where = str(e.filename) if e.filename else args.out
        if stage is not None and where.startswith(str(stage.path)):
            where = f"--out {args.out}"
        print(f"{prog}: error: {where}: {e.strerror or e}", file=sys.stderr)
        return 2
    if written == 0:
        print(f"{prog}: error: nothing written to {args.out} (every input row was skipped)", file=sys.stderr)
        return 1
    return 0
