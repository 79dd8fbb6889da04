"""Reading MDS shards into packed, interleaved text+image batches.

    rows (MDS shards, one or more streams mixed by proportion through streaming's Stream)
      -> FusionDataset (a StreamingDataset): decode image / take latents, tokenise, choose
         generation (caption, image) or understanding (image, caption), caption drop and
         timestep: one document per image-caption row, BOS text EOS chunks per text row
      -> FusionLoader (a StreamingDataLoader) with batch_size = samples per step
      -> Packer (main process): the step's documents, after what the last steps carried
         over, into batch_size rows of seq_len -> TrainBatch (a PackedBatch, plus
         num_samples and stats)

Exact resume. streaming's state is a count of rows consumed in the epoch (StreamingDataLoader
counts what it yields; FusionLoader counts the rows behind a batch, TrainBatch.num_samples,
not its packed rows). Each step therefore consumes a fixed number of rows per rank (also
StreamingDataset's batch_size): data.samples_per_step, or by default as many as the step's
token budget (batch_size x seq_len) holds at the mean size of a sample of the mix, which is
measured from the shards at start-up. Documents that do not fit in the step are carried to
the next one (up to data.overflow_carry_steps steps' worth of tokens, then dropped and
counted in stats), text-only documents are split to fill rows, images never are
(packing.py). "k steps done" is then the row count k * samples_per_step * world_size that
StreamingDataLoader.state_dict() records, plus the carried pieces, named by (epoch, row
index, document, offset), which load_state_dict() rebuilds. Rows that fail to decode are
counted (stats["skipped"]) and never raise. Every random choice (order, caption drop,
timestep) is drawn from a generator seeded by (data.seed, epoch, global row index), never
from global RNG state, so the resumed run, whatever its worker count, reproduces the
uninterrupted one bit for bit. As with streaming itself, resuming exactly needs the same
world size x samples_per_step; the sample order is a function of data.num_canonical_nodes
(fixed in the config, 64 by default) and the seed, not of the node count.

Disk and shared memory (a node may run several jobs): every stream is cached in
<cache_root>/<run_id>/node<N>/<stream>, bounded by data.cache_limit; the local leader
holds a lock on its node directory for the job's life and removes those of this host's
finished jobs (cache.py); datasets are built inside a machine-wide lock so that two jobs
never pick the same streaming shared-memory prefix (shm.py). Launchers: init_dist_env()
fills in LOCAL_WORLD_SIZE & co. (deepspeed launcher, srun).

The trainer's side:

    env = init_dist_env()
    loader = build_train_loader(cfg.data, cfg.model, tokenizer, tokens_per_image, env,
                                vocab_size=base_config.vocab_size)
    for batch in loader:            # TrainBatch
        log(batch.stats); loss = model(batch.to(device))
    checkpoint["data"] = loader.state_dict()   # each rank its own; later: loader.load_state_dict(...)
"""
import importlib

# Imported on first use (PEP 562), so that tools/prepare_data.py, which needs none of
# the reading path, starts without importing streaming, transformers and torch.
_EXPORTS = {
    "DataConfig": ".config", "StreamSpec": ".config",
    "DistEnv": ".dist_env", "DistEnvError": ".dist_env", "init_dist_env": ".dist_env",
    "FusionLoader": ".loader", "build_train_loader": ".loader", "build_val_loader": ".loader",
    "Packer": ".packing", "TrainBatch": ".packing", "pack_documents": ".packing",
    "image_token_ids": ".sequence", "text_special_ids": ".sequence",
}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
