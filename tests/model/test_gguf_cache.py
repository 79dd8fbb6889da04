"""A GGUF base is converted once per content: the same file installed again (a fresh
virtual environment gives it a new mtime) reuses the converted directory, and a file with
other bytes gets its own."""
import os
import shutil
import sys
from pathlib import Path

import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from megafusion.model import loading  # noqa: E402


class StubModel:
    config = transformers.LlamaConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, vocab_size=32)

    def save_pretrained(self, out, **kw):
        self.config.save_pretrained(out)


class StubTokenizer:
    def save_pretrained(self, out, **kw):
        (Path(out) / "tokenizer.json").write_text("{}")


def test_same_bytes_with_a_new_mtime_reuse_the_conversion(tmp_path, monkeypatch):
    conversions = []

    def convert(directory, gguf_file, **kw):
        conversions.append(Path(directory) / gguf_file)
        return StubModel()

    monkeypatch.setenv("MEGAFUSION_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", convert)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **kw: StubTokenizer())

    first = tmp_path / "venv1" / "model.gguf"
    first.parent.mkdir()
    first.write_bytes(b"GGUF" + bytes(range(256)) * 64)
    os.utime(first, (1_700_000_000, 1_700_000_000))
    reinstalled = tmp_path / "venv2" / "model.gguf"
    reinstalled.parent.mkdir()
    shutil.copyfile(first, reinstalled)  # the same bytes, written later: another mtime
    os.utime(reinstalled, (1_800_000_000, 1_800_000_000))

    a = loading.resolve_base(str(first))
    b = loading.resolve_base(str(reinstalled))
    assert a == b and (a / "config.json").is_file()
    assert conversions == [first]
    assert [p.name for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")] == [a.name]

    other = tmp_path / "venv3" / "model.gguf"
    other.parent.mkdir()
    other.write_bytes(first.read_bytes()[:-1] + b"\x00")  # same size, one byte differs
    os.utime(other, (1_700_000_000, 1_700_000_000))  # and the first file's mtime
    c = loading.resolve_base(str(other))
    assert c != a and conversions == [first, other]


def test_concurrent_ranks_convert_once(tmp_path, monkeypatch):
    """The ranks of a run resolve the base at the same moment: one converts, the others
    wait for its directory instead of converting it again."""
    import threading
    import time

    conversions = []

    def convert(directory, gguf_file, **kw):
        conversions.append(threading.current_thread().name)
        time.sleep(0.5)  # a conversion takes a while: the others arrive during it
        return StubModel()

    monkeypatch.setenv("MEGAFUSION_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", convert)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **kw: StubTokenizer())
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF" + bytes(1000))
    verbosity = transformers.logging.get_verbosity()

    start = threading.Barrier(3)
    results = {}

    def rank(i):
        start.wait()
        results[i] = loading.resolve_base(str(gguf))

    threads = [threading.Thread(target=rank, args=(i,), name=f"rank{i}") for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(conversions) == 1, conversions
    assert len(set(results.values())) == 1 and (results[0] / "config.json").is_file()
    assert transformers.logging.get_verbosity() == verbosity  # quieted for the conversion only


def test_a_file_system_without_flock_still_converts(tmp_path, monkeypatch):
    """Lustre mounted without -o flock answers flock with ENOSYS: the base is converted
    without the lock rather than the run failing to start."""
    import errno
    import fcntl

    def no_flock(fd, op):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setenv("MEGAFUSION_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(fcntl, "flock", no_flock)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **kw: StubModel())
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **kw: StubTokenizer())
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF" + bytes(100))
    assert (loading.resolve_base(str(gguf)) / "config.json").is_file()
