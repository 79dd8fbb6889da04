"""Run under `deepspeed --num_gpus 2` (tests/parallel/test_zero_init_startup.py):
ZeRO-3 start-up with parallel.zero_init, measured on every rank, for each base given on
the command line (a single-file tied one, a sharded untied one) in fp32 and in bf16.

Three properties, each printed as `CHECK <name> rank <r> PASS|FAIL <detail>`:
- reads: while the fused model is built, rank 0 reads every tensor of the base's
  safetensors files exactly once and the other rank opens none of them. Counted by
  wrapping safetensors' safe_open everywhere it was imported (every tensor fetched
  through it) and by an audit hook on Python-level opens of *.safetensors files; the
  expected byte count comes from the files' own headers (safetensors format: 8-byte
  little-endian header length, JSON header, then the data), not from the loader.
- copy_collectives: while the image tower is copied (every call of the `clone` hook
  model_setup passes to LMFusionModel), no collective runs at all: no all-gather, no
  broadcast. Counted by wrapping every collective of deepspeed.comm's backend and of
  torch.distributed.
- equal: every parameter and buffer of the model built partitioned, gathered, equals
  bitwise the one of the same model built whole without zero_init (same seed), cast to
  the training dtype for bf16 (what deepspeed.initialize does to a model built whole);
  both towers, the new modules, and the base config. The one exception is the BOI/EOI
  rows in bf16 (MEAN_ROWS, see there).

Usage: zero_init_startup_worker.py CONFIG BASE [BASE ...]
"""
import contextlib
import json
import struct
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from megafusion.config import load_config  # noqa: E402
from megafusion.parallel.ds_config import deepspeed_config  # noqa: E402
from megafusion.parallel.launch import init_distributed, setup_environment  # noqa: E402

# The BOI/EOI rows start at the mean of the embedding (head) rows. Built partitioned in
# bf16 that mean is taken over the bf16-rounded rows, built whole over the fp32 ones, so
# with a base stored in fp32 (the tiny test bases) they differ: the embedding's mean is
# ~1e-4 against rows of ~0.02, and the rows' rounding errors do not cancel to the last
# bit of so small a mean. Those two are held to the error bound of "the mean of the
# rows, computed from bf16 rows and rounded to bf16" around the exact (float64) mean of
# the whole-built fp32 rows; every other parameter must be bitwise equal.
MEAN_ROWS = {"image_token_embed": lambda m: m.embed_tokens.weight, "image_token_head": lambda m: m.lm_head.weight}
BF16_UNIT_ROUNDOFF = 2.0 ** -8


def within_mean_bound(got: torch.Tensor, rows: torch.Tensor) -> bool:
    exact = rows.detach().double().mean(0)
    # rounding each row: at most u * mean |row|; rounding the mean: at most u * |result|.
    bound = BF16_UNIT_ROUNDOFF * (rows.detach().double().abs().mean(0) + got.double().abs()) + 1e-12
    return bool(((got.double() - exact).abs() <= bound).all())


COLLECTIVES = ("all_gather_into_tensor", "all_gather", "all_gather_base", "allgather_fn", "all_gather_coalesced",
               "broadcast", "broadcast_object_list", "all_reduce", "all_reduce_coalesced", "reduce",
               "reduce_scatter", "reduce_scatter_tensor", "reduce_scatter_fn", "scatter", "gather", "all_to_all_single",
               "all_gather_object", "_all_gather_base", "_reduce_scatter_base")


def disk_tensors(base_dir: Path) -> dict[tuple[str, str], int]:
    """(file name, key) -> bytes of data, read from each safetensors file's header."""
    out = {}
    for path in sorted(base_dir.glob("*.safetensors")):
        with open(path, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            header = json.loads(f.read(n))
        for key, info in header.items():
            if key != "__metadata__":
                start, end = info["data_offsets"]
                out[(path.name, key)] = end - start
    return out


class ReadCounter:
    """Counts, per (file name, key), the bytes of every tensor fetched through
    safetensors.safe_open, and the shard files opened, while `active`."""

    def __init__(self):
        import safetensors

        self.active = False
        self.bytes = Counter()
        self.opened = set()
        self.python_opens = set()
        original = safetensors.safe_open
        counter = self

        class Slice:
            def __init__(self, inner, where):
                self.inner, self.where = inner, where

            def __getitem__(self, index):
                t = self.inner[index]
                counter.count(self.where, t)
                return t

            def __getattr__(self, name):
                return getattr(self.inner, name)

        class Handle:
            def __init__(self, filename, *args, **kwargs):
                self.name = Path(str(filename)).name
                if counter.active:
                    counter.opened.add(self.name)
                self.inner = original(filename, *args, **kwargs)

            def __enter__(self):
                self.inner.__enter__()
                return self

            def __exit__(self, *exc):
                return self.inner.__exit__(*exc)

            def get_tensor(self, key):
                t = self.inner.get_tensor(key)
                counter.count((self.name, key), t)
                return t

            def get_slice(self, key):
                return Slice(self.inner.get_slice(key), (self.name, key))

            def __getattr__(self, name):
                return getattr(self.inner, name)

        # Every module that imported safe_open by name gets the counting one.
        for module in list(sys.modules.values()):
            if getattr(module, "safe_open", None) is original:
                module.safe_open = Handle

        def audit(event, args):
            if counter.active and event == "open" and str(args[0]).endswith(".safetensors"):
                counter.python_opens.add(Path(str(args[0])).name)

        sys.addaudithook(audit)

    def count(self, where, t):
        if self.active:
            self.bytes[where] += t.numel() * t.element_size()

    def reset(self):
        self.bytes.clear()
        self.opened.clear()
        self.python_opens.clear()


class CollectiveCounter:
    """Counts collectives of deepspeed.comm's backend and of torch.distributed (calls, and
    elements of the largest tensor handed to each: the whole tensor of an all-gather or
    a broadcast) under the innermost phase entered with `phase(name)`."""

    def __init__(self):
        import torch.distributed as tdist
        from deepspeed.comm import comm as dscomm

        self.phases = []
        self.calls = Counter()
        self.elements = Counter()
        for level, owner in (("deepspeed", dscomm.cdb), ("torch", tdist)):
            for name in COLLECTIVES:
                fn = getattr(owner, name, None)
                if callable(fn):
                    setattr(owner, name, self._wrap(f"{level}.{name}", fn))

    def _wrap(self, label, fn):
        def counted(*args, **kwargs):
            if self.phases:
                key = (self.phases[-1], label)
                self.calls[key] += 1
                self.elements[key] += max((a.numel() for a in list(args) + list(kwargs.values())
                                           if isinstance(a, torch.Tensor)), default=0)
            return fn(*args, **kwargs)

        return counted

    @contextlib.contextmanager
    def phase(self, name):
        self.phases.append(name)
        try:
            yield
        finally:
            self.phases.pop()

    def summary(self, phase):
        calls = {k[1]: v for k, v in self.calls.items() if k[0] == phase}
        elements = {k[1]: v for k, v in self.elements.items() if k[0] == phase}
        return sum(calls.values()), {k: f"{calls[k]} calls, {elements[k]} elements" for k in sorted(calls)}


def count_clone_collectives(counter: CollectiveCounter):
    """Wrap the clone hook model_setup hands to LMFusionModel so that the collectives
    inside it are counted in the phase "copy"."""
    import megafusion.parallel.model_setup as model_setup

    real = model_setup.LMFusionModel

    def fused(base, cfg, clone=None, gather=None, **kw):
        def counted_clone(module):
            with counter.phase("copy"):
                return clone(module)

        return real(base, cfg, clone=counted_clone if clone is not None else None, gather=gather, **kw)

    model_setup.LMFusionModel = fused


def build(config: str, base: str, dtype: str, zero_init: bool, world_size: int):
    from megafusion.parallel.model_setup import build_model

    cfg = load_config(config, [f"model.base={base}", f"train.dtype={dtype}",
                               f"parallel.zero_init={str(zero_init).lower()}"])
    torch.manual_seed(0)
    return build_model(cfg, deepspeed_config(cfg, world_size))


def main():
    config, *bases = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    env = setup_environment()
    init_distributed(env)
    import torch.distributed as dist

    import transformers.modeling_utils  # noqa: F401 (imported before safe_open is wrapped)

    import megafusion.parallel.base_weights  # noqa: F401 (it and what it imports loaded before safe_open is wrapped)
    from megafusion.model.loading import resolve_base
    from megafusion.parallel.gather import gathered

    rank = dist.get_rank()
    reads = ReadCounter()
    collectives = CollectiveCounter()
    count_clone_collectives(collectives)

    def check(name, ok, detail):
        print(f"CHECK {name} rank {rank} {'PASS' if ok else 'FAIL'} {detail}", flush=True)

    for base in bases:
        on_disk = disk_tensors(resolve_base(base))
        for dtype in ("fp32", "bf16"):
            tag = f"{Path(base).name}/{dtype}"
            reads.reset()
            collectives.calls.clear()
            collectives.elements.clear()
            reads.active = True
            with collectives.phase("build"):
                model = build(config, base, dtype, zero_init=True, world_size=dist.get_world_size())
            reads.active = False
            dist.barrier()

            # reads
            files = sorted({f for f, _ in on_disk})
            read_bytes = sum(reads.bytes.values())
            if rank == 0:
                want = {k: v for k, v in on_disk.items()}
                ok = dict(reads.bytes) == want
                detail = (f"{tag}: read {read_bytes} bytes of {sum(on_disk.values())} in {len(files)} files, "
                          f"{len(reads.bytes)} of {len(on_disk)} tensors")
                if not ok:
                    wrong = sorted(k for k in set(want) | set(reads.bytes) if reads.bytes.get(k) != want.get(k))
                    detail += f"; differing (file, key): {wrong[:4]}"
            else:
                ok = read_bytes == 0 and not reads.opened and not reads.python_opens
                detail = (f"{tag}: read {read_bytes} bytes, opened {sorted(reads.opened | reads.python_opens)} "
                          f"(base: {sum(on_disk.values())} bytes in {len(files)} files)")
            check("reads", ok, detail)

            # copy_collectives
            total, kinds = collectives.summary("copy")
            check("copy_collectives", total == 0, f"{tag}: {total} collectives during the image-tower copy {kinds}")
            # For the record: the rest of the build (base loading, partitioning the new modules).
            print(f"INFO build_collectives rank {rank} {tag}: {collectives.summary('build')}", flush=True)

            # equal
            whole = build(config, base, "fp32", zero_init=False, world_size=dist.get_world_size())
            want_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
            got_params = dict(model.named_parameters())
            want_params = dict(whole.named_parameters())
            problems, notes = [], []
            if got_params.keys() != want_params.keys():
                problems.append(f"names differ: {sorted(set(got_params) ^ set(want_params))[:4]}")
            for name in sorted(set(got_params) & set(want_params)):
                p = got_params[name]
                with gathered([p]):
                    got = p.detach().clone()
                want = want_params[name].detach().to(want_dtype)
                if got.dtype != want.dtype or got.shape != want.shape:
                    problems.append(f"param {name}: {got.dtype} {tuple(got.shape)}")
                elif not torch.equal(got, want):
                    n = int((got != want).sum())
                    if name in MEAN_ROWS and dtype == "bf16" and within_mean_bound(got, MEAN_ROWS[name](whole)):
                        notes.append(f"{name}: {n} of {got.numel()} elements differ, within the bf16 bound")
                    else:
                        problems.append(f"param {name}: {n} of {got.numel()} elements differ")
            got_buffers, want_buffers = dict(model.named_buffers()), dict(whole.named_buffers())
            if got_buffers.keys() != want_buffers.keys():
                problems.append(f"buffer names differ: {sorted(set(got_buffers) ^ set(want_buffers))[:4]}")
            for name in sorted(set(got_buffers) & set(want_buffers)):
                g, w = got_buffers[name], want_buffers[name]
                if g.dtype != w.dtype or not torch.equal(g, w):
                    problems.append(f"buffer {name}: {g.dtype} vs {w.dtype}")
            if model.llama_config.to_dict() != whole.llama_config.to_dict():
                a, b = model.llama_config.to_dict(), whole.llama_config.to_dict()
                problems.append(f"base config differs: {sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))}")
            n_text = sum(1 for n in got_params if ".text." in n)
            n_image = sum(1 for n in got_params if ".image." in n)
            check("equal", not problems,
                  f"{tag}: {len(got_params)} parameters ({n_text} text-tower, {n_image} image-tower), "
                  f"{len(got_buffers)} buffers; {len(problems)} differ {problems[:6]}; {notes}")
            del model, whole
            dist.barrier()
    print(f"STARTUP_WORKER_DONE rank {rank}", flush=True)


if __name__ == "__main__":
    main()
