"""tools/prepare_data.py: synthetic, folder, webdataset and text conversions, bad input,
the skip summary, latents, and the command line's errors."""
from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from megafusion.data.prepare_cli import main as prepare_main
from megafusion.data.shm import construction_window
from megafusion.data.synthetic import COLOURS, SHAPES, make_sample

REPO = Path(__file__).resolve().parents[2]
TOOL = REPO / "tools" / "prepare_data.py"


def read_shards(path):
    """Every row of an MDS directory, read back by streaming (local, no remote). Built
    inside the machine-wide construction window, as the loader builds its datasets: a
    dataset built outside it can pick the shared-memory prefix another test's training
    run is taking at the same moment (FileExistsError: '/000NNN_locals')."""
    from streaming import StreamingDataset

    with construction_window(is_local_leader=True):
        ds = StreamingDataset(local=str(path), shuffle=False, batch_size=1)
    return [ds[i] for i in range(ds.size)]


def run_tool(*args):
    return subprocess.run([sys.executable, str(TOOL), *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, timeout=120)


def summary(path):
    return json.loads((Path(path) / "prepare_summary.json").read_text())


def png(img, **kw):
    buf = io.BytesIO()
    img.save(buf, format="PNG", **kw)
    return buf.getvalue()


def jpeg(img):
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def photo(w=40, h=30, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


# ------------------------------------------------------------------------ synthetic

def test_synthetic_round_trip_via_command_line(tmp_path):
    out = tmp_path / "syn"
    r = run_tool("synthetic", "--out", out, "--n", 40, "--size", 24, "--seed", 3)
    assert r.returncode == 0, r.stderr
    assert "wrote 40 samples" in r.stdout
    assert summary(out) == {"written": 40, "skipped": {}}
    index = json.loads((out / "index.json").read_text())
    shard = index["shards"][0]
    assert shard["compression"] == "zstd" and shard["hashes"] == ["xxh64"]
    assert set(shard["column_names"]) == {"image", "caption", "id", "meta"}
    rows = read_shards(out)
    assert len(rows) == 40
    for i, row in enumerate(rows):
        ref = make_sample(3, i, 24)
        img = Image.open(io.BytesIO(row["image"]))
        assert img.format == "PNG" and img.size == (24, 24) and img.mode == "RGB"
        assert np.array_equal(np.asarray(img), np.asarray(ref.image))
        assert row["caption"] == ref.caption and row["id"] == ref.id and row["meta"] == ref.meta
    # Held-out split beside it, from another random range.
    val = read_shards(out / "val")
    assert len(val) == 4 and summary(out / "val")["written"] == 4
    assert not {r["id"] for r in val} & {r["id"] for r in rows}


def test_synthetic_vocabulary_and_reproducibility():
    samples = [make_sample(0, i) for i in range(600)]
    text = " ".join(s.caption for s in samples)
    assert all(c in text for c in COLOURS) and all(s in text for s in SHAPES)
    for phrase in ("above", "below", "left of", "right of", "small", "large", "in the center", "in the top left"):
        assert phrase in text
    assert {s.meta["kind"] for s in samples} == {"one", "two"}
    again = make_sample(0, 17)
    assert again.caption == samples[17].caption and again.image.tobytes() == samples[17].image.tobytes()
    other_seed = [make_sample(1, i).caption for i in range(20)]
    assert other_seed != [s.caption for s in samples[:20]]


def test_synthetic_refuses_non_empty_out_unless_overwrite(tmp_path, capsys):
    out = tmp_path / "syn"
    assert prepare_main(["synthetic", "--out", str(out), "--n", "5", "--val-n", "0"]) == 0
    capsys.readouterr()
    assert prepare_main(["synthetic", "--out", str(out), "--n", "5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not empty" in err[0]
    assert len(read_shards(out)) == 5  # nothing already written was lost
    assert prepare_main(["synthetic", "--out", str(out), "--n", "6", "--overwrite", "--val-n", "0"]) == 0


# ------------------------------------------------------------------------- folders

def make_messy_folder(root: Path):
    root.mkdir(parents=True)
    good = photo(64, 48)
    files = {
        "good.jpg": jpeg(good),
        "corrupt.jpg": jpeg(good)[:20] + bytes(np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8)),
        "truncated.png": png(photo(64, 64, seed=1))[:300],
        "cmyk.jpg": jpeg(good.convert("CMYK")),
        "tiny.png": png(Image.new("RGB", (1, 1), (10, 200, 30))),
        "nocaption.png": png(photo(20, 20)),
        "badcaption.png": png(photo(20, 20)),
        "emptycaption.png": png(photo(20, 20)),
        "empty.png": b"",
        "rgba.png": png(Image.new("RGBA", (20, 20), (255, 0, 0, 0))),
    }
    pal = Image.new("P", (20, 20), 1)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    files["palette.png"] = png(pal, transparency=1)
    gray = Image.fromarray(np.full((20, 20), 32768, dtype=np.uint16))
    files["gray16.png"] = png(gray)
    for name, data in files.items():
        (root / name).write_bytes(data)
        stem = name.rsplit(".", 1)[0]
        if stem == "nocaption":
            continue
        caption = {"badcaption": b"caf\xe9 \xff\xfe", "emptycaption": b"   \n"}.get(stem, f"an image called {stem}".encode())
        (root / f"{stem}.txt").write_bytes(caption)
    (root / "good.png").write_bytes(png(good))  # same id as good.jpg: a duplicate
    return root


def test_messy_folder_converts_and_counts(tmp_path):
    src = make_messy_folder(tmp_path / "messy")
    out = tmp_path / "out"
    assert prepare_main(["images", str(src), "--out", str(out), "--size", "16"]) == 0
    s = summary(out)
    assert s["skipped"] == {
        "unreadable_image": 1, "truncated_image": 1, "missing_caption": 1, "caption_not_utf8": 1,
        "empty_caption": 1, "empty_file": 1, "duplicate_id": 1,
    }
    written = {"good", "cmyk", "tiny", "rgba", "palette", "gray16"}
    assert s["written"] == len(written)
    assert s["converted"] == {"CMYK": 1, "I;16": 1, "P": 1, "RGBA": 1}
    rows = {r["id"].split("/", 1)[1]: r for r in read_shards(out)}
    assert set(rows) == written
    for name, r in rows.items():
        img = Image.open(io.BytesIO(r["image"]))
        assert img.mode == "RGB" and img.size == (16, 16)
        assert r["caption"] == f"an image called {name}"
    px = lambda n: np.asarray(Image.open(io.BytesIO(rows[n]["image"])))  # noqa: E731
    assert abs(int(px("gray16")[8, 8, 0]) - 128) <= 2  # 16-bit scaled, not clipped to white
    assert px("rgba")[8, 8].tolist() == [255, 255, 255]  # transparent -> white
    assert px("palette")[8, 8].tolist() == [255, 255, 255]
    assert px("tiny")[8, 8].tolist() == [10, 200, 30]


def test_caption_files_jsonl_and_csv(tmp_path):
    a = tmp_path / "a"
    a.mkdir()
    (a / "x.png").write_bytes(png(photo(20, 20)))
    (a / "y.png").write_bytes(png(photo(20, 20, 1)))
    with open(a / "captions.jsonl", "wb") as f:
        f.write(json.dumps({"file": "x.png", "caption": "first"}).encode() + b"\n")
        f.write(b'{"file": "y.png", "caption": "bad \xff"}\n')
        f.write(json.dumps({"file": "missing.png", "caption": "gone"}).encode() + b"\n")
        f.write(b"{not json\n")
        f.write(json.dumps({"file": "x.png", "caption": "again"}).encode() + b"\n")
    b = tmp_path / "b"
    b.mkdir()
    (b / "z.jpg").write_bytes(jpeg(photo(30, 20)))
    (b / "w.jpg").write_bytes(jpeg(photo(30, 20)))
    (b / "captions.csv").write_text('file,caption\nz.jpg,"a caption, with a comma"\nw.jpg,\n')
    out = tmp_path / "out"
    assert prepare_main(["images", str(a), str(b), "--out", str(out), "--size", "8"]) == 0
    s = summary(out)
    assert s["written"] == 2
    assert s["skipped"] == {"caption_not_utf8": 1, "missing_image": 1, "bad_record": 1, "duplicate_id": 1,
                            "empty_caption": 1}
    assert sorted(r["caption"] for r in read_shards(out)) == ["a caption, with a comma", "first"]


def test_webdataset_tar(tmp_path):
    tar_path = tmp_path / "shard-000.tar"
    members = [
        ("000.jpg", jpeg(photo(32, 32))), ("000.txt", b"a jpeg with a txt caption"),
        ("001.png", png(photo(32, 32, 1))), ("001.json", json.dumps({"caption": "a png with json"}).encode()),
        ("002.jpg", jpeg(photo(32, 32, 2))),  # no caption
        ("003.txt", b"a caption without image"),
        ("sub/004.webp", b"garbage"), ("sub/004.txt", b"broken image"),
    ]
    with tarfile.open(tar_path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    out = tmp_path / "out"
    assert prepare_main(["images", str(tar_path), "--out", str(out), "--size", "16"]) == 0
    s = summary(out)
    assert s["written"] == 2
    assert s["skipped"] == {"missing_caption": 1, "missing_image": 1, "unreadable_image": 1}
    rows = read_shards(out)
    assert {r["id"] for r in rows} == {"shard-000/000", "shard-000/001"}
    assert {r["caption"] for r in rows} == {"a jpeg with a txt caption", "a png with json"}

    # A truncated archive: what precedes the damage is kept, the damage is counted.
    cut = tmp_path / "cut.tar"
    cut.write_bytes(tar_path.read_bytes()[:3000])
    out2 = tmp_path / "out2"
    assert prepare_main(["images", str(cut), "--out", str(out2), "--size", "16"]) in (0, 1)
    assert "unreadable_archive" in summary(out2)["skipped"]


def test_text_jsonl(tmp_path):
    src = tmp_path / "corpus.jsonl"
    with open(src, "wb") as f:
        f.write(json.dumps({"text": "hello world"}).encode() + b"\n")
        f.write(json.dumps({"text": "with an id", "id": "doc-7"}).encode() + b"\n")
        f.write(json.dumps({"text": "   "}).encode() + b"\n")
        f.write(json.dumps({"other": 1}).encode() + b"\n")
        f.write(b'{"text": "caf\xe9"}\n')
        f.write(b"not json\n")
        f.write(json.dumps({"text": "same id", "id": "doc-7"}).encode() + b"\n")
        f.write(b"\n")
    out = tmp_path / "out"
    assert prepare_main(["text", str(src), "--out", str(out)]) == 0
    s = summary(out)
    assert s == {"written": 2, "skipped": {"empty_text": 1, "missing_text": 1, "text_not_utf8": 1,
                                           "bad_record": 1, "duplicate_id": 1}}
    rows = read_shards(out)
    assert [(r["id"], r["text"]) for r in rows] == [("corpus/1", "hello world"), ("doc-7", "with an id")]


def write_jsonl(path: Path, records) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return len(records)


def test_text_sources_sharing_a_stem_keep_every_row(tmp_path):
    """C4's file names (c4-train.00000-of-01024.json, ...) share everything up to the first
    dot: records without an id must still all be written, each once."""
    sources, texts = [], []
    for shard in range(3):
        src = tmp_path / f"c4-train.{shard:05d}-of-01024.json"
        records = [{"text": f"shard {shard} document {i}"} for i in range(7)]
        write_jsonl(src, records)
        sources.append(str(src))
        texts += [r["text"] for r in records]
    out = tmp_path / "out"
    assert prepare_main(["text", *sources, "--out", str(out)]) == 0
    rows = read_shards(out)
    assert summary(out) == {"written": len(texts), "skipped": {}}
    assert sorted(r["text"] for r in rows) == sorted(texts)
    assert len({r["id"] for r in rows}) == len(texts)
    assert not any(str(tmp_path) in r["id"] for r in rows)  # no absolute paths in ids


def test_same_named_text_files_in_two_folders_and_explicit_ids(tmp_path):
    a = write_jsonl(tmp_path / "a" / "data.jsonl", [{"text": "a1"}, {"text": "a2"}, {"text": "mine", "id": "x"}])
    b = write_jsonl(tmp_path / "b" / "data.jsonl", [{"text": "b1"}, {"text": "b2"}, {"text": "again", "id": "x"}])
    out = tmp_path / "out"
    assert prepare_main(["text", str(tmp_path / "a" / "data.jsonl"), str(tmp_path / "b" / "data.jsonl"),
                         "--out", str(out)]) == 0
    # The record repeating an explicit id is still a duplicate; every other row is kept.
    assert summary(out) == {"written": a + b - 1, "skipped": {"duplicate_id": 1}}
    assert sorted(r["text"] for r in read_shards(out)) == ["a1", "a2", "b1", "b2", "mine"]


def test_image_sources_sharing_a_name_keep_every_row(tmp_path):
    """Two folders both named train, and two tars whose names share the part before the
    first dot, each with the same file names inside."""
    sources, captions = [], []
    for i, parent in enumerate(("a", "b")):
        folder = tmp_path / parent / "train"
        folder.mkdir(parents=True)
        for j in range(3):
            (folder / f"{j:03d}.png").write_bytes(png(photo(12, 12, seed=10 * i + j)))
            (folder / f"{j:03d}.txt").write_text(f"folder {parent} image {j}")
            captions.append(f"folder {parent} image {j}")
        sources.append(str(folder))
    for shard in range(2):
        tar_path = tmp_path / f"cc3m.{shard:05d}.tar"
        with tarfile.open(tar_path, "w") as tf:
            for j in range(2):
                caption = f"tar {shard} image {j}"
                captions.append(caption)
                for name, data in ((f"{j:03d}.png", png(photo(12, 12, seed=100 + 10 * shard + j))),
                                   (f"{j:03d}.txt", caption.encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
        sources.append(str(tar_path))
    out = tmp_path / "out"
    assert prepare_main(["images", *sources, "--out", str(out), "--size", "8"]) == 0
    rows = read_shards(out)
    assert summary(out) == {"written": len(captions), "skipped": {}}
    assert sorted(r["caption"] for r in rows) == sorted(captions)
    assert len({r["id"] for r in rows}) == len(captions)
    assert not any(str(tmp_path) in r["id"] for r in rows)


# ------------------------------------------------------------------------ --overwrite

def old_output(tmp_path, n=4):
    src = tmp_path / "old.jsonl"
    write_jsonl(src, [{"text": f"old {i}"} for i in range(n)])
    out = tmp_path / "out"
    assert prepare_main(["text", str(src), "--out", str(out)]) == 0
    return out, sorted(f"old {i}" for i in range(n))


def assert_left_as_it_was(out, texts):
    assert sorted(r["text"] for r in read_shards(out)) == texts
    assert summary(out)["written"] == len(texts)
    assert sorted(p.name for p in out.parent.iterdir() if p.name.startswith(".")) == []  # no leftovers


def test_overwrite_with_a_bad_source_or_vae_keeps_the_old_output(tmp_path, capsys):
    out, texts = old_output(tmp_path)
    capsys.readouterr()
    assert prepare_main(["text", str(tmp_path / "typo.jsonl"), "--out", str(out), "--overwrite"]) == 2
    assert_left_as_it_was(out, texts)
    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "x.png").write_bytes(png(photo(12, 12)))
    (folder / "x.txt").write_text("a caption")
    assert prepare_main(["images", str(folder), "--out", str(out), "--overwrite", "--size", "8",
                         "--vae", str(tmp_path / "no_such_vae")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "typo.jsonl" in err[0] and "no_such_vae" in err[1]
    assert_left_as_it_was(out, texts)


def test_overwrite_failing_midway_keeps_the_old_output(tmp_path, capsys, monkeypatch):
    import errno

    from megafusion.data import prepare

    out, texts = old_output(tmp_path)
    new = tmp_path / "new.jsonl"
    write_jsonl(new, [{"text": f"new {i}"} for i in range(10)])

    class FullDisk:
        calls = 0

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def update(self, n):
            FullDisk.calls += 1
            if FullDisk.calls == 5:
                raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(prepare, "_progress", lambda *a, **k: FullDisk())
    capsys.readouterr()
    assert prepare_main(["text", str(new), "--out", str(out), "--overwrite"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No space left on device" in err[0] and str(out) in err[0]
    assert_left_as_it_was(out, texts)


def test_overwrite_replaces_and_nothing_written_keeps_the_old_output(tmp_path, capsys):
    out, texts = old_output(tmp_path)
    (out / "stray.txt").write_text("from before")
    junk = tmp_path / "junk.jsonl"
    junk.write_text("not json\n")
    assert prepare_main(["text", str(junk), "--out", str(out), "--overwrite"]) == 1
    assert (out / "stray.txt").read_text() == "from before"
    assert_left_as_it_was(out, texts)
    new = tmp_path / "new.jsonl"
    write_jsonl(new, [{"text": f"new {i}"} for i in range(6)])
    assert prepare_main(["text", str(new), "--out", str(out), "--overwrite"]) == 0
    assert_left_as_it_was(out, sorted(f"new {i}" for i in range(6)))
    assert not (out / "stray.txt").exists()  # the old directory's contents are gone


# ----------------------------------------------------------------------------- VAE

@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
                        layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=16)
    path = tmp_path_factory.mktemp("vae") / "vae"
    vae.save_pretrained(path)
    return str(path)


def test_vae_latents_are_stored(tmp_path, tiny_vae):
    import torch
    from diffusers import AutoencoderKL

    from megafusion.data.images import to_tensor

    out = tmp_path / "syn"
    assert prepare_main(["synthetic", "--out", str(out), "--n", "5", "--size", "16", "--val-n", "0",
                         "--vae", tiny_vae]) == 0
    rows = read_shards(out)
    vae = AutoencoderKL.from_pretrained(tiny_vae).eval()
    x = torch.stack([to_tensor(Image.open(io.BytesIO(r["image"])).convert("RGB")) for r in rows])
    with torch.no_grad():
        expect = (vae.encode(x).latent_dist.mean * vae.config.scaling_factor).numpy().astype(np.float16)
    for r, e in zip(rows, expect):
        assert r["latents"].dtype == np.float16 and r["latents"].shape == (4, 8, 8)
        np.testing.assert_allclose(r["latents"].astype(np.float32), e.astype(np.float32), atol=2e-3)


def test_vae_latents_are_the_models_own_encoding(tmp_path):
    """An SD3-like VAE (shift_factor 0.0609, scaling_factor 1.5305): the stored latents are
    what the model's ImageTokenizer computes from the same image, shift included."""
    import torch
    from diffusers import AutoencoderKL

    from megafusion.data.images import to_tensor
    from megafusion.model.config import FusionConfig
    from megafusion.model.image_io import ImageTokenizer

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
                        layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=16,
                        shift_factor=0.0609, scaling_factor=1.5305)
    vae.save_pretrained(tmp_path / "sd3_vae")
    out = tmp_path / "syn"
    assert prepare_main(["synthetic", "--out", str(out), "--n", "5", "--size", "16", "--val-n", "0",
                         "--vae", str(tmp_path / "sd3_vae")]) == 0
    rows = read_shards(out)
    tok = ImageTokenizer(FusionConfig(image_mode="vae", vae_path=str(tmp_path / "sd3_vae"), image_size=16,
                                      patch_size=2, patcher="linear"), hidden_size=8)
    x = torch.stack([to_tensor(Image.open(io.BytesIO(r["image"])).convert("RGB")) for r in rows])
    expect = tok.encode_images(x)
    assert expect.abs().max() > 0.5  # not degenerate: the shift (0.09 after scaling) would show
    got = torch.stack([torch.from_numpy(r["latents"].astype(np.float32)) for r in rows])
    # Shards store float16: equal to the model's fp32 encoding rounded to float16 (same
    # batch, same device, so the same fp32 numbers before rounding).
    assert (got - expect.half().float()).abs().max().item() <= 1e-5


# ---------------------------------------------------------------------------- errors

def test_command_line_errors_are_one_line(tmp_path):
    r = run_tool("bogus")
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1 and "bogus" in r.stderr
    r = run_tool("images", tmp_path / "nope", "--out", tmp_path / "o")
    assert r.returncode != 0 and r.stderr.strip().splitlines() == [
        f"prepare_data.py: error: source {tmp_path / 'nope'}: no such file or directory"]
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("where", ["proc", "under_a_file"])
def test_unwritable_out_is_a_one_line_error(tmp_path, where):
    src = tmp_path / "t.jsonl"
    write_jsonl(src, [{"text": "hello"}])
    if where == "proc":
        if not Path("/proc/self").is_dir():
            pytest.skip("no /proc here")
        out = "/proc/megafusion-test-out"
    else:
        (tmp_path / "a_file").write_text("x")
        out = str(tmp_path / "a_file" / "out")
    r = run_tool("text", src, "--out", out)
    assert r.returncode != 0
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("prepare_data.py: error: ") and out in err[0], r.stderr
    if where == "under_a_file":
        assert (tmp_path / "a_file").read_text() == "x"


def test_missing_text_source_and_no_subcommand(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        prepare_main([])
    assert e.value.code != 0
    assert prepare_main(["text", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "missing.jsonl" in err[1]


def test_nothing_written_exits_non_zero_with_summary(tmp_path, capsys):
    src = tmp_path / "bad"
    src.mkdir()
    (src / "a.png").write_bytes(b"junk")
    (src / "a.txt").write_text("caption")
    out = tmp_path / "out"
    assert prepare_main(["images", str(src), "--out", str(out)]) == 1
    assert summary(out) == {"written": 0, "skipped": {"unreadable_image": 1}}
    assert "nothing written" in capsys.readouterr().err
