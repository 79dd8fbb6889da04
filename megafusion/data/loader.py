"""Building the train / val loaders (see megafusion/data/__init__.py for the design)."""
from __future__ import annotations

import hashlib
import os
import re
import signal
import sys
from pathlib import Path

from streaming import Stream
from streaming.base import StreamingDataLoader

from . import shm
from .cache import claim_node_cache, holds_node_cache
from .config import DataConfig, StreamSpec, parse_size
from .dataset import FusionDataset, SampleBuilder
from .dist_env import DistEnv, init_dist_env
from .packing import Packer, TrainBatch, plan_samples_per_step
from .sequence import text_special_ids


def _samples(batch: list) -> list:
    """The DataLoader's collate: a step's built samples as they are; the loader packs them."""
    return batch


def _worker_leaves_stop_signals_to_the_rank(worker_id: int) -> None:
    """A stop signal sent to a whole process group or cgroup (`kill -TERM -PGID`, a
    container or systemd stop) reaches the DataLoader workers as well as the rank. The
    rank handles it (parallel/trainer.py's StopSignal: finish the step, checkpoint, exit
    0) and shuts its workers down itself; a worker that died of the signal first would
    fail the rank instead ("DataLoader worker ... is killed by signal: Terminated") and
    lose the steps since the last checkpoint. A SIGKILL'd rank still takes its workers
    with it (torch's workers watch their parent)."""
    for s in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(s, signal.SIG_IGN)


class FusionLoader(StreamingDataLoader):
    """StreamingDataLoader of TrainBatch.

    Workers build samples; the main process packs each step's samples (Packer), because
    what one step cannot fit is carried into the next. The sample count that state_dict()
    records is the rows consumed (TrainBatch.num_samples), not the packed rows, and the
    state also names the carried pieces ("carry"), which load_state_dict() rebuilds.
    keep_carry=False (validation): every pass starts with an empty carry, so every pass
    yields the same batches.
    """

    def __init__(self, dataset: FusionDataset, *, packer: Packer, keep_carry: bool = True, **kwargs):
        if kwargs.get("num_workers"):
            kwargs.setdefault("worker_init_fn", _worker_leaves_stop_signals_to_the_rank)
        super().__init__(dataset, collate_fn=_samples, **kwargs)
        self.packer = packer
        self.keep_carry = keep_carry
        self._carry_to_restore: list | None = None

    def _get_batch_size(self, batch) -> int:
        if isinstance(batch, list):
            return len(batch)
        if isinstance(batch, TrainBatch):
            return batch.num_samples
        return super()._get_batch_size(batch)

    def __iter__(self):
        if self._carry_to_restore is not None:
            dataset = self.dataset
            self.packer.restore_carry(self._carry_to_restore,
                                      lambda epoch, i: dataset.builder(dataset.get_item(i), i, epoch))
            self._carry_to_restore = None
        elif not self.keep_carry:
            self.packer.carry = []
        for samples in super().__iter__():
            yield self.packer(samples)

    def state_dict(self):
        state = super().state_dict()
        if state is not None:
            pending = self._carry_to_restore
            state["carry"] = list(pending) if pending is not None else self.packer.carry_state()
        return state

    def load_state_dict(self, obj) -> None:
        obj = dict(obj)
        self._carry_to_restore = list(obj.pop("carry", []))
        super().load_state_dict(obj)


def _check_process_group(env: DistEnv) -> None:
    import torch.distributed as dist

    if env.world_size > 1 and not (dist.is_available() and dist.is_initialized()):
        raise ValueError(f"WORLD_SIZE={env.world_size} but torch.distributed is not initialised: call "
                         "deepspeed.init_distributed() or torch.distributed.init_process_group() before building "
                         "the loader (left alone, streaming creates and destroys its own gloo group twice on "
                         "MASTER_PORT, and a rank that joins the first one as it closes waits forever)")


def resolve_run_id(cfg: DataConfig) -> str:
    run_id = cfg.run_id or os.environ.get("MEGAFUSION_RUN_ID") or os.environ.get("SLURM_JOB_ID") or "default"
    return re.sub(r"[^A-Za-z0-9_.-]", "_", str(run_id))


def stream_cache_name(split: str, i: int, spec: StreamSpec) -> str:
    """Cache subdirectory of a stream. It includes a hash of the location, and for local
    shards of their index.json, so rewritten shards never meet a stale cache."""
    if spec.name:
        return re.sub(r"[^A-Za-z0-9_.-]", "_", f"{split}-{spec.name}")
    h = hashlib.sha1(spec.remote.rstrip("/").encode())
    index = Path(spec.remote) / "index.json"
    if "://" not in spec.remote and index.is_file():
        h.update(index.read_bytes())
    base = re.sub(r"[^A-Za-z0-9_.-]", "_", os.path.basename(spec.remote.rstrip("/")) or "root")
    return f"{split}-{i}-{base}-{h.hexdigest()[:10]}"


def cache_dir(cfg: DataConfig, env: DistEnv, split: str, i: int, spec: StreamSpec) -> str:
    """<cache_root>/<run_id>/node<N>/<stream name>: one per node and run."""
    return os.path.join(cfg.cache_root, resolve_run_id(cfg), f"node{env.node}", stream_cache_name(split, i, spec))


def default_samples_per_step(cfg: DataConfig, tokens_per_image: int) -> int:
    """Samples per step as known before any shard is read: data.samples_per_step, else a
    guess for image-caption data (tokens_per_image + 3 + text_tokens_estimate tokens a
    sample). The loader itself derives its count from the shards (plan_samples_per_step)."""
    if cfg.samples_per_step is not None:
        return int(cfg.samples_per_step)
    return max(1, cfg.batch_size * cfg.seq_len // (tokens_per_image + 3 + cfg.text_tokens_estimate))


def canonical_nodes(configured: int | None, samples_per_stream) -> int | None:
    """data.num_canonical_nodes, or its largest divisor that is no larger than the smallest
    stream (streaming's shuffle needs a sample of every stream on each canonical node; only
    toy datasets are that small). A function of the data, never of the node count."""
    if configured is None:
        return None
    smallest = int(min(samples_per_stream))
    return max(d for d in range(1, configured + 1) if configured % d == 0 and d <= max(smallest, 1))


def _check_location(spec: StreamSpec, what: str) -> None:
    if "://" in spec.remote:
        return
    if not (Path(spec.remote) / "index.json").is_file():
        raise ValueError(f"data.{what}: {spec.remote} has no index.json (write shards with tools/prepare_data.py)")


def _latent_shape(encoding: str | None):
    m = re.fullmatch(r"ndarray:[a-z0-9]+:([\d,]+)", encoding or "")
    return tuple(int(x) for x in m.group(1).split(",")) if m else None


def _check_latent_shape(stored, fusion_cfg, specs, image_streams, split: str) -> None:
    """Latents encoded at another image size or by another VAE than the model's would
    give images of another token count than the packer reserves for them."""
    from megafusion.model.image_io import image_latent_shape

    expected = image_latent_shape(fusion_cfg)
    if stored is None or tuple(stored) == tuple(expected):
        return
    remedy = ("set data.use_latents=false to encode the stored images at model.image_size"
              if all("image" in c for c in image_streams) else
              f"prepare them again at --size {fusion_cfg.image_size} with model.vae_path's VAE")
    raise ValueError(f"data.{split}: {specs[0].remote if len(specs) == 1 else 'the image streams'} hold latents of "
                     f"shape {tuple(stored)}, but the model (model.image_size={fusion_cfg.image_size}, "
                     f"model.vae_path) reads {tuple(expected)}; {remedy}")


def _vlm_processor(fusion_cfg, specs, columns, data_cfg, split):
    """A LLaVA base's processor when understanding rows will take the VLM's own path
    (LLaVAFusion), else None; those rows need the stored pixels."""
    base = getattr(fusion_cfg, "base", None)
    if not base or data_cfg.generation_ratio >= 1.0:
        return None
    from megafusion.model.loading import is_vlm_base, resolve_base

    if not is_vlm_base(base):
        return None
    for spec, cols in zip(specs, columns):
        if "caption" in cols and "image" not in cols:
            raise ValueError(f"data.{split}: {spec.remote} has no image column, and a LLaVA base understands images "
                             "from their pixels (data.generation_ratio < 1)")
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(str(resolve_base(base)), use_fast=False)  # the saved (slow) processor, without its warning


def _build(split: str, specs: list[StreamSpec], data_cfg: DataConfig, fusion_cfg, tokenizer,
           tokens_per_image: int, env: DistEnv | None, vocab_size: int | None, shuffle: bool,
           replication: int = 1) -> FusionLoader:
    data_cfg.validate(require_train=(split == "train"))
    if not specs:
        raise ValueError(f"data.{split} is empty")
    env = env or init_dist_env()
    # The fork of DataLoader workers after the tokenizer ran in this process: keep the
    # Rust tokenizer single-threaded instead of letting it warn (or deadlock).
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for spec in specs:
        _check_location(spec, split)
    _check_process_group(env)

    run_id = resolve_run_id(data_cfg)
    if env.local_rank == 0:
        claim_node_cache(data_cfg.cache_root, run_id, env.node)
    locals_ = [cache_dir(data_cfg, env, split, i, s) for i, s in enumerate(specs)]
    streams = [Stream(remote=s.remote, local=local, proportion=s.proportion) for s, local in zip(specs, locals_)]
    cache_limit = parse_size(data_cfg.cache_limit) if data_cfg.cache_limit is not None else None
    held = env.local_rank == 0 and holds_node_cache(data_cfg.cache_root, run_id, env.node)
    with shm.construction_window(env.local_rank == 0, locals_ if held else []):
        try:
            dataset = FusionDataset(
                streams=streams,
                batch_size=None,  # set below, once the shards say how many samples a step holds
                shuffle=shuffle,
                shuffle_seed=data_cfg.seed,
                shuffle_algo=data_cfg.shuffle_algo,
                shuffle_block_size=data_cfg.shuffle_block_size,
                num_canonical_nodes=data_cfg.num_canonical_nodes,
                predownload=data_cfg.predownload,
                cache_limit=cache_limit,
                epoch_size=data_cfg.epoch_size,
                replication=replication if replication > 1 else None,
            )
        except ValueError as e:
            if "ache limit" in str(e) or "cache_limit" in str(e):
                raise ValueError(f"data.cache_limit={data_cfg.cache_limit!r} is too small for data.{split}: "
                                 f"{str(e).splitlines()[0]}") from None
            raise

    columns = dataset.stream_columns()
    image_streams = []
    for spec, cols in zip(specs, columns):
        if "caption" in cols and ("image" in cols or "latents" in cols):
            image_streams.append(cols)
        elif "text" not in cols:
            raise ValueError(f"data.{split}: {spec.remote} has columns {sorted(cols)}; expected image+caption or text")
    use_latents = bool(data_cfg.use_latents and fusion_cfg.image_mode == "vae" and image_streams
                       and all("latents" in c for c in image_streams))
    if not use_latents:
        for spec, cols in zip(specs, columns):
            if "caption" in cols and "image" not in cols:
                raise ValueError(f"data.{split}: {spec.remote} has latents but no image column, and "
                                 f"the model reads pixels (model.image_mode={fusion_cfg.image_mode})")
    if use_latents:
        shapes = {_latent_shape(c["latents"]) for c in image_streams}
        if len(shapes) != 1:
            raise ValueError(f"data.{split}: image streams have different latent shapes {sorted(map(str, shapes))}")
        latent_shape = shapes.pop()
        _check_latent_shape(latent_shape, fusion_cfg, specs, image_streams, split)
        image_shape = latent_shape or (0, 0, 0)
    else:
        latent_shape = None
        image_shape = (3, fusion_cfg.image_size, fusion_cfg.image_size)
    # Pre-encoded alignment targets (tools/prepare_data.py --align-encoder), used when the
    # model aligns features and every image stream has them; else the model encodes.
    feature_shape = None
    if getattr(fusion_cfg, "align_encoder", None) and image_streams and all("align_features" in c for c in image_streams):
        shapes = {_latent_shape(c["align_features"]) for c in image_streams}
        if len(shapes) != 1 or None in shapes:
            raise ValueError(f"data.{split}: image streams have different align_features shapes {sorted(map(str, shapes))}")
        feature_shape = shapes.pop()

    bos, eos = text_special_ids(tokenizer)
    if data_cfg.bos_token_id is not None:
        bos = data_cfg.bos_token_id
    if data_cfg.eos_token_id is not None:
        eos = data_cfg.eos_token_id
    dataset.builder = SampleBuilder(
        tokenizer=tokenizer, tokens_per_image=tokens_per_image,
        vocab_size=len(tokenizer) if vocab_size is None else vocab_size,
        bos=bos, eos=eos, seq_len=data_cfg.seq_len, image_size=fusion_cfg.image_size,
        use_latents=use_latents, latent_shape=latent_shape,
        generation_ratio=data_cfg.generation_ratio, caption_drop=data_cfg.caption_drop,
        max_caption_tokens=data_cfg.max_caption_tokens, condition_t_cap=fusion_cfg.condition_t_cap,
        fusion_cfg=fusion_cfg, seed=data_cfg.seed, vary_with_epoch=(split == "train"), feature_shape=feature_shape,
        vlm_processor=_vlm_processor(fusion_cfg, specs, columns, data_cfg, split),
    )
    # The step's sample count, from its token budget and what the mix's samples look
    # like; streaming reads batch_size and predownload first when iteration starts.
    carry_tokens = data_cfg.overflow_carry_steps * data_cfg.batch_size * data_cfg.seq_len
    samples_per_step = data_cfg.samples_per_step
    if samples_per_step is None:
        probe, shares = dataset.probe()
        planned: dict = {}
        samples_per_step = plan_samples_per_step(probe, shares, data_cfg.batch_size, data_cfg.seq_len,
                                                 tokens_per_image, carry_tokens, report=planned)
        if planned["drop"] > 0.02 and env.rank == 0:
            # Samples longer than a step and its carry: the step takes one, and the part
            # that neither fits nor can wait is dropped, step after step.
            print(f"warning: data.{split}: {100 * planned['drop']:.0f}% of the tokens would be dropped even at one "
                  f"sample per step: some samples hold more than a step's {data_cfg.batch_size} x {data_cfg.seq_len} "
                  f"tokens and the {carry_tokens} that data.overflow_carry_steps={data_cfg.overflow_carry_steps} "
                  f"lets wait; raise data.overflow_carry_steps or data.batch_size, or split long documents",
                  file=sys.stderr, flush=True)
    dataset.batch_size = samples_per_step
    dataset.predownload = data_cfg.predownload if data_cfg.predownload is not None else 8 * samples_per_step
    dataset.num_canonical_nodes = canonical_nodes(data_cfg.num_canonical_nodes, dataset.samples_per_stream)

    packer = Packer(data_cfg.batch_size, data_cfg.seq_len, tokens_per_image, image_shape, use_latents,
                    carry_tokens=carry_tokens, feature_shape=feature_shape)
    kwargs = {}
    if data_cfg.num_workers > 0 and data_cfg.prefetch_factor is not None:
        kwargs["prefetch_factor"] = data_cfg.prefetch_factor
    return FusionLoader(dataset, packer=packer, keep_carry=(split == "train"), batch_size=samples_per_step,
                        num_workers=data_cfg.num_workers, drop_last=False, **kwargs)


def build_train_loader(data_cfg: DataConfig, fusion_cfg, tokenizer, tokens_per_image: int,
                       dist_env: DistEnv | None = None, vocab_size: int | None = None,
                       replication: int = 1) -> FusionLoader:
    """Loader over data_cfg.train yielding TrainBatch (a PackedBatch) per step.

    With WORLD_SIZE > 1, torch.distributed must already be initialised (the trainer's
    deepspeed.init_distributed()): streaming's ranks of a node meet at its barriers.
    dist_env: from init_dist_env() (called here when None). vocab_size: the base model's
    vocabulary size, BOI/EOI are vocab_size and vocab_size + 1 (default len(tokenizer)).
    loader.state_dict() / load_state_dict() resume exactly (see the package docstring).
    replication: consecutive ranks that receive the same samples (streaming's own
    replication): the stages of one pipeline, which the trainer numbers consecutively.
    """
    return _build("train", data_cfg.train_streams(), data_cfg, fusion_cfg, tokenizer, tokens_per_image,
                  dist_env, vocab_size, data_cfg.shuffle, replication)


def build_val_loader(data_cfg: DataConfig, fusion_cfg, tokenizer, tokens_per_image: int,
                     dist_env: DistEnv | None = None, vocab_size: int | None = None) -> FusionLoader:
    """Same pipeline over data_cfg.val, unshuffled: the same batches on every call."""
    return _build("val", data_cfg.val_streams(), data_cfg, fusion_cfg, tokenizer, tokens_per_image,
                  dist_env, vocab_size, False)
