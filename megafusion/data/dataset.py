"""StreamingDataset whose items are ready-made documents (see sequence.py).

Decoding, tokenising and the per-sample random choices happen here, in the DataLoader
workers. A row that cannot be decoded becomes {"skip": reason} instead of raising: it
still counts as consumed (so each step consumes a fixed number of rows) and the collate
counts it in TrainBatch.stats.
"""
from __future__ import annotations

import time

import numpy as np
import streaming.base.dataset
import torch
from streaming import StreamingDataset

from megafusion.model.batch import VLMImageSegment

from .images import ImageSkip, decode_image, load_rgb, to_rgb, to_tensor
from .sequence import (image_caption_document, image_token_ids, plan_sample, sample_timestep,
                       text_documents, vlm_understanding_document)

# Streaming's per-epoch threads (shard preparation, readiness) sleep TICK = 7 ms between
# checks while they are `predownload` samples ahead of the consumer, which is nearly all
# of a run: on the CPU demo each DataLoader worker burned ~0.09 s of CPU per 4-s step on
# that polling (2% of a core, taken from the ranks'), against 0.02 s of real loading.
# Waking every 50 ms costs a seventh of that, and a thread that is behind does not sleep
# at all, so throughput is unchanged: a step consumes a batch in seconds, and predownload
# (8 steps' samples by default) is the slack the threads keep ahead of it. The constant
# is streaming's module global, read at each sleep, in every process that imports this.
STREAMING_POLL_S = 0.05
streaming.base.dataset.TICK = max(streaming.base.dataset.TICK, STREAMING_POLL_S)


class SampleBuilder:
    """Shard row (+ its global index and epoch) -> {"kind", "docs"} or {"skip"}."""

    def __init__(self, *, tokenizer, tokens_per_image: int, vocab_size: int, bos: int | None, eos: int,
                 seq_len: int, image_size: int, use_latents: bool, latent_shape: tuple | None,
                 generation_ratio: float, caption_drop: float, max_caption_tokens: int | None,
                 condition_t_cap: int, fusion_cfg, seed: int, vary_with_epoch: bool = True,
                 feature_shape: tuple | None = None, vlm_processor=None):
        self.tokenizer = tokenizer
        self.tokens_per_image = tokens_per_image
        self.boi, self.eoi = image_token_ids(vocab_size)
        self.bos, self.eos = bos, eos
        self.seq_len = seq_len
        self.image_size = image_size
        self.use_latents = use_latents
        self.latent_shape = latent_shape
        self.generation_ratio = generation_ratio
        self.caption_drop = caption_drop
        self.max_caption_tokens = max_caption_tokens
        self.cap = condition_t_cap
        self.fusion_cfg = fusion_cfg
        self.seed = seed
        # False (validation): every pass draws the same orders, drops and timesteps.
        self.vary_with_epoch = vary_with_epoch
        # (P, D): take each image's pre-encoded alignment features from the row.
        self.feature_shape = feature_shape
        # A LLaVA base's AutoProcessor: understanding rows then take the VLM's own path.
        self.vlm_processor = vlm_processor
        self._objective = None

    @property
    def objective(self):
        # Built lazily in each worker process rather than pickled.
        if self._objective is None:
            from megafusion.model.diffusion import make_objective

            self._objective = make_objective(self.fusion_cfg)
        return self._objective

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_objective"] = None
        return state

    def tokenize(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def image(self, row: dict) -> torch.Tensor:
        if self.use_latents:
            lat = np.asarray(row["latents"], dtype=np.float32)
            if self.latent_shape is not None and tuple(lat.shape) != tuple(self.latent_shape):
                raise ImageSkip("bad_latents", f"shape {lat.shape}")
            return torch.from_numpy(lat.copy())
        data = row.get("image")
        if not isinstance(data, (bytes, bytearray)):
            raise ImageSkip("missing_image")
        return to_tensor(load_rgb(bytes(data), self.image_size))

    def __call__(self, row: dict, index: int, epoch: int) -> dict:
        try:
            if "caption" in row and ("image" in row or "latents" in row):
                return self.image_caption(row, index, epoch)
            if "text" in row:
                text = row["text"]
                if not isinstance(text, str):
                    return {"skip": "bad_text"}
                return {"kind": "text", "docs": text_documents(self.tokenize(text), self.bos, self.eos, self.seq_len)}
            return {"skip": "unknown_columns"}
        except ImageSkip as e:
            return {"skip": f"image_{e.reason}"}
        except Exception as e:  # a bad row must never stop training
            return {"skip": f"error_{type(e).__name__}"}

    def image_caption(self, row: dict, index: int, epoch: int) -> dict:
        caption = row["caption"]
        if not isinstance(caption, str):
            return {"skip": "bad_caption"}
        image = self.image(row)
        plan = plan_sample(self.seed, epoch if self.vary_with_epoch else 0, index, self.generation_ratio, self.caption_drop)
        ids = [] if plan.drop_caption else self.tokenize(caption)
        if self.max_caption_tokens is not None:
            ids = ids[:self.max_caption_tokens]
        t = sample_timestep(self.objective, plan.understanding, self.cap, plan.timestep_seed)
        features = None
        if self.feature_shape is not None:
            features = np.asarray(row.get("align_features"), dtype=np.float32)
            if tuple(features.shape) != tuple(self.feature_shape):
                raise ImageSkip("bad_align_features", f"shape {features.shape}")
            features = torch.from_numpy(features.copy())
        if plan.understanding and self.vlm_processor is not None:
            doc = vlm_understanding_document(ids, self.vlm_image(row), self.tokenize("\n"), self.bos, self.eos)
        else:
            doc = image_caption_document(ids, image, plan, t, self.bos, self.eos, self.boi, self.eoi, features)
        return {"kind": "image", "docs": [doc]}

    def vlm_image(self, row: dict) -> VLMImageSegment:
        """The row's image as a LLaVA base's processor prepares it (its own resizing,
        crops and placeholder count), from the stored pixels."""
        data = row.get("image")
        if not isinstance(data, (bytes, bytearray)):
            raise ImageSkip("missing_image", "a LLaVA base understands images from their pixels")
        proc = self.vlm_processor
        out = proc(images=[to_rgb(decode_image(bytes(data)))], text=[proc.image_token], return_tensors="pt",
                   add_special_tokens=False)
        ids, token_id = out["input_ids"][0].tolist(), proc.image_token_id
        # One image: pixel_values[0] holds its own crops only (a batch pads to its most).
        size = tuple(int(x) for x in out["image_sizes"][0]) if "image_sizes" in out else None  # LLaVA-NeXT
        if ids != [token_id] * len(ids):
            raise ImageSkip("vlm_prompt", "the processor wrote more than the image's placeholders")
        return VLMImageSegment(out["pixel_values"][0], token_id, len(ids), size)


class FusionDataset(StreamingDataset):
    """StreamingDataset that yields built samples; `builder` turns rows into documents."""

    def __init__(self, *, builder: SampleBuilder | None = None, **kwargs):
        super().__init__(**kwargs)
        self.builder = builder
        self.epoch = 0

    def _resume_incr_epoch(self) -> tuple[int, int]:
        # The one place streaming decides which epoch an iteration belongs to; remembered
        # (per worker process) so per-sample randomness can depend on it.
        epoch, sample_in_epoch = super()._resume_incr_epoch()
        self.epoch = int(epoch)
        return epoch, sample_in_epoch

    def _ready_thread(self, it) -> None:
        """streaming 0.13's ready thread, which waits until each coming sample's shard is
        local, with one change: a shard evicted while the thread waits for it is prepared
        again. streaming re-prepares a shard it finds evicted only before it starts
        waiting; under a data.cache_limit the download thread, up to `predownload` samples
        ahead, can make that very shard the coldest and evict it between two of the
        thread's polls (streaming's own prepare_shard notes the window), and the thread
        then waited for ever (seen in tests/data/test_data_cache.py: a 4-shard cache and
        shards of 8 KB that download within one 50 ms poll)."""
        from streaming.base.dataset import _ShardState

        while not it.should_exit() and it.ready_index != it.total and not self._event.is_set():
            if self.predownload is not None and self.predownload < it.ready_index - it.yield_index:
                time.sleep(streaming.base.dataset.TICK)
                continue
            sample_id = it.sample_ids[it.ready_index]
            if sample_id != -1:
                shard_id, _ = self.spanner[sample_id]
                while self._shard_states[shard_id] != _ShardState.LOCAL and not self._event.is_set():
                    if self._shard_states[shard_id] == _ShardState.REMOTE:
                        self.prepare_shard(shard_id, False)  # evicted (again): download it (again)
                    else:
                        time.sleep(streaming.base.dataset.TICK)
            it.ready_index += 1
        it.on_exit()

    def stream_of(self, index: int) -> int:
        shard_id, _ = self.spanner[index]
        return int(self.stream_per_shard[shard_id])

    def stream_columns(self) -> list[dict[str, str]]:
        """Per stream: column name -> MDS encoding (from the first shard of the stream)."""
        out: dict[int, dict[str, str]] = {}
        for shard_id, stream_id in enumerate(self.stream_per_shard):
            if int(stream_id) not in out:
                shard = self.shards[shard_id]
                out[int(stream_id)] = dict(zip(getattr(shard, "column_names", []), getattr(shard, "column_encodings", [])))
        return [out.get(i, {}) for i in range(len(self.streams))]

    def probe(self, rows_per_stream: int = 64) -> tuple[list[list[list]], list[float]]:
        """What the mix's samples look like, for sizing a step (packing.plan_samples_per_step):
        per stream, the documents of up to rows_per_stream rows spread over its first shard,
        built as training builds them (a row that would be skipped has none), and each
        stream's share of the epoch's samples."""
        shares = [float(stream.choose) for stream in self.streams]
        docs = []
        for s in range(len(self.streams)):
            first_shard = int(self.shard_offset_per_stream[s])
            n = int(self.samples_per_shard[first_shard])
            picks = np.unique(np.linspace(0, n - 1, min(rows_per_stream, n)).round().astype(np.int64))
            built = []
            for k in picks:
                index = int(self.sample_offset_per_shard[first_shard] + k)
                built.append(self.builder(self.get_item(index), index, 0).get("docs", []))
            docs.append(built)
        return docs, shares

    def __getitem__(self, index: int) -> dict:
        row = super().__getitem__(index)
        sample = self.builder(row, int(index), self.epoch) if self.builder is not None else {"row": row}
        sample["index"] = int(index)
        sample["epoch"] = int(self.epoch)
        sample["stream"] = self.stream_of(int(index))
        return sample
