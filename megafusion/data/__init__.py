"""Reading MDS shards into packed, interleaved text+image batches.

    rows (MDS shards, one or more streams mixed by proportion through streaming's Stream)
      -> FusionDataset (a StreamingDataset): decode image / take latents, tokenise, choose
         generation (caption, image) or understanding (image, caption), caption drop and
         timestep: one document per image-caption row, BOS text EOS chunks per text row
      -> FusionLoader (a StreamingDataLoader) with batch_size = samples_per_step
      -> PackCollate: next-fit packing into batch_size rows of seq_len -> TrainBatch
         (a PackedBatch, plus num_samples and stats)

Exact resume. streaming's state is a count of rows consumed in the epoch (StreamingDataLoader
counts what it yields; FusionLoader counts TrainBatch.num_samples, the rows behind a batch,
not its packed rows). Packing therefore happens inside the loader, over a fixed number of
rows per rank per step (data.samples_per_step, which is also StreamingDataset's
batch_size): a step always consumes exactly that many rows, whatever they pack into, so
"k steps done" is the row count k * samples_per_step * world_size that
StreamingDataLoader.state_dict() records and load_state_dict() skips. Rows that do not fit
in the step's batch_size x seq_len are dropped, deterministically, and counted
(stats["dropped_overflow"]); rows that fail to decode are counted too (stats["skipped"])
and never raise. Every random choice (order, caption drop, timestep) is drawn from a
generator seeded by (data.seed, epoch, global row index), never from global RNG state, so
the resumed run, whatever its worker count, reproduces the uninterrupted one bit for bit.
As with streaming itself, resuming needs the same world size x samples_per_step and
num_canonical_nodes.

Launchers: init_dist_env() fills in LOCAL_WORLD_SIZE & co. (deepspeed launcher, srun);
every stream is cached in <cache_root>/<run_id>/node<N>/<stream>, bounded by
data.cache_limit; the local leader holds a lock on its node directory for the job's life
and removes those of this host's finished jobs (cache.py); stale shared memory is
cleaned once per process before the first dataset is built.

The trainer's side:

    env = init_dist_env()
    loader = build_train_loader(cfg.data, cfg.model, tokenizer, tokens_per_image, env,
                                vocab_size=base_config.vocab_size)
    for batch in loader:            # TrainBatch
        log(batch.stats); loss = model(batch.to(device))
    checkpoint["data"] = loader.state_dict()   # later: loader.load_state_dict(...)
"""
import importlib

# Imported on first use (PEP 562), so that tools/prepare_data.py, which needs none of
# the reading path, starts without importing streaming, transformers and torch.
_EXPORTS = {
    "DataConfig": ".config", "StreamSpec": ".config",
    "DistEnv": ".dist_env", "DistEnvError": ".dist_env", "init_dist_env": ".dist_env",
    "FusionLoader": ".loader", "build_train_loader": ".loader", "build_val_loader": ".loader",
    "TrainBatch": ".packing", "pack_documents": ".packing",
    "image_token_ids": ".sequence", "text_special_ids": ".sequence",
}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
