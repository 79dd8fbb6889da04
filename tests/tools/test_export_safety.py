"""tools/convert_to_hf.py and tools/generate.py when things go wrong, and what they read:
a failed --overwrite keeps the previous export, OUT_DIR may not touch what the export
reads, sizes and errors are one line, a run trained with apex's RMSNorm exports without
apex, a bf16 stage-0 run exports its fp32 master weights, and the run's guidance scale
travels with the export.

One real run (the trainer, one rank, DeepSpeed stage 0, bf16) on a private copy of the
tiny base, shared by the module: nothing a test here deletes by mistake is shared with
other tests. References are read from the files directly (the checkpoint's optimizer
entry, the previous export's bytes), never through the exporter."""
import errno
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_convert_to_hf import convert_here, refused, train

GUIDANCE, STEPS = 5.5, 7


@pytest.fixture(scope="module")
def base_copy(tmp_path_factory, tiny_llama):
    out = tmp_path_factory.mktemp("base") / "tiny-llama"
    shutil.copytree(tiny_llama, out)
    return out


@pytest.fixture(scope="module")
def bf16_run(tmp_path_factory, base_copy, synthetic_shards):
    """Two steps of the real trainer: stage 0, bf16 (DeepSpeed keeps the fp32 masters in
    the optimizer entry of mp_rank_00_model_states.pt), the X-Fusion configs' guidance."""
    return train(tmp_path_factory.mktemp("bf16z0") / "run", synthetic_shards, f"model.base={base_copy}",
                 "parallel.zero_stage=0", "train.dtype=bf16", f"log.sample_guidance={GUIDANCE}",
                 f"log.sample_diffusion_steps={STEPS}", ranks=1)


@pytest.fixture(scope="module")
def export_fp32(bf16_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("exports") / "fp32"
    p = convert_here(bf16_run, out, "--dtype", "fp32")
    assert p.returncode == 0, p.stderr[-3000:]
    return out, p


def tree(d: Path) -> dict[str, str]:
    """Every file under d (relative path -> SHA-256 of its bytes)."""
    return {str(f.relative_to(d)): hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(d.rglob("*")) if f.is_file()}


def weights(d: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(d).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def checkpoint(run: Path) -> dict:
    tag = (run / "checkpoints" / "latest").read_text().strip()
    return torch.load(run / "checkpoints" / tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)


def masters_by_value(saved: dict) -> dict[str, list[torch.Tensor]]:
    """Each trained weight's fp32 master, found by value: the fp32 tensors of the
    optimizer entry that round to the module's bf16 weight (one, but for tensors that
    training left alike)."""
    masters = [t for group in saved["optimizer"]["fp32_groups"] for t in group]
    out = {}
    for name, w in saved["module"].items():
        if name != "lm_head.weight":  # the tied base's frozen head: no master
            out[name] = [m for m in masters if m.shape == w.shape and torch.equal(m.to(w.dtype), w)]
            assert out[name], name
    assert len(out) == len(masters)
    return out


def is_one_of(t: torch.Tensor, candidates: list[torch.Tensor]) -> bool:
    return any(torch.equal(t, c) for c in candidates)


# ------------------------------------------------------------- a failed overwrite

def test_failed_overwrite_keeps_the_previous_export(bf16_run, monkeypatch):
    # An export inside the run directory (where tools/demo.py writes it) is allowed.
    out = bf16_run / "hf"
    p = convert_here(bf16_run, out, "--dtype", "fp32", "--max-shard-size", "1MB")
    assert p.returncode == 0, p.stderr[-3000:]
    before, beside = tree(out), sorted(x.name for x in bf16_run.iterdir())
    assert len([f for f in before if f.endswith(".safetensors")]) >= 2

    # The disk fills up while the second shard of the new export is written.
    import safetensors.torch

    real, calls = safetensors.torch.save_file, []

    def full_disk(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    refused(convert_here(bf16_run, out, "--overwrite", "--dtype", "bf16", "--max-shard-size", "1MB"),
            str(out), "No space left on device")
    assert len(calls) == 2
    monkeypatch.undo()
    assert tree(out) == before  # the previous export, byte for byte
    assert sorted(x.name for x in bf16_run.iterdir()) == beside  # no half-written directory beside it

    # A shard size the writer cannot read is refused before anything is touched.
    refused(convert_here(bf16_run, out, "--overwrite", "--max-shard-size", "1GiB"), "--max-shard-size 1GiB")
    assert tree(out) == before

    # A successful --overwrite replaces it (bf16 now), leaving nothing beside it.
    p = convert_here(bf16_run, out, "--overwrite", "--dtype", "bf16", "--max-shard-size", "1.5MB")
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert sorted(x.name for x in bf16_run.iterdir()) == beside


def test_failed_export_to_a_new_directory_leaves_nothing(bf16_run, tmp_path, monkeypatch):
    import safetensors.torch

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    refused(convert_here(bf16_run, tmp_path / "new" / "deeper" / "out"), "No space left on device")
    assert list(tmp_path.iterdir()) == []  # not even the parents it made


def test_max_shard_size_is_read_as_the_writer_reads_it(bf16_run, export_fp32, tmp_path):
    # huggingface_hub's parser (what cuts the shards): 1.5MB is 1.5e6 bytes, gb is GB.
    out = tmp_path / "out"
    p = convert_here(bf16_run, out, "--dtype", "fp32", "--max-shard-size", "1.5MB")
    assert p.returncode == 0, p.stderr[-3000:]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = [load_file(out / f) for f in set(index["weight_map"].values())]
    assert len(shards) >= 2  # a tensor over the limit (the embedding) has a shard of its own
    assert all(sum(t.nbytes for t in shard.values()) <= 1_500_000 for shard in shards if len(shard) > 1)
    p = convert_here(bf16_run, tmp_path / "gb", "--dtype", "fp32", "--max-shard-size", "5gb")
    assert p.returncode == 0, p.stderr[-3000:]
    assert tree(tmp_path / "gb")["model.safetensors"] == tree(export_fp32[0])["model.safetensors"]  # one shard
    for bad in ("1GiB", "lots", "0MB", "-1MB"):
        refused(convert_here(bf16_run, tmp_path / "bad", f"--max-shard-size={bad}"), f"--max-shard-size {bad}")
    assert not (tmp_path / "bad").exists()


# ------------------------------------------------------ what OUT_DIR may not touch

def test_refuses_an_out_dir_that_holds_or_lies_in_what_the_export_reads(bf16_run, base_copy, tmp_path):
    ckpt = bf16_run / "checkpoints"
    tag = ckpt / (ckpt / "latest").read_text().strip()
    run_before, base_before = tree(ckpt), tree(base_copy)
    cases = [(bf16_run, "is the run directory"), (bf16_run.parent, "contains the run directory"),
             (ckpt, "is the checkpoints directory"), (tag, "is the checkpoint"),
             (tag / "hf", "lies inside the checkpoint"), (ckpt / "hf", "lies inside the checkpoints directory"),
             (base_copy, "is the base model"), (base_copy / "hf", "lies inside the base model"),
             (base_copy.parent, "contains the base model")]
    for out, why in cases:
        refused(convert_here(bf16_run, out, "--overwrite"), str(out), why)
    assert tree(ckpt) == run_before and tree(base_copy) == base_before
    assert not (tag / "hf").exists() and not (ckpt / "hf").exists() and not (base_copy / "hf").exists()

    # The VAE a VAE-space run names (refused before it is read, so a stand-in will do).
    vae = tmp_path / "vae"
    vae.mkdir()
    (vae / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    run = tmp_path / "vae_run"
    shutil.copytree(bf16_run, run, ignore=shutil.ignore_patterns("hf"))
    cfg = (run / "config.yaml").read_text()
    cfg = cfg.replace("image_mode: pixel", "image_mode: vae").replace("vae_path: null", f"vae_path: {vae}")
    assert f"vae_path: {vae}" in cfg
    (run / "config.yaml").write_text(cfg)
    vae_before = tree(vae)
    for out, why in ((vae, "is the VAE"), (vae / "x", "lies inside the VAE"), (tmp_path, "contains the run directory")):
        refused(convert_here(run, out, "--overwrite"), str(out), why)
    assert tree(vae) == vae_before


def test_out_dir_under_a_file_is_refused_before_any_work(bf16_run, tmp_path, monkeypatch):
    import megafusion.export_stream as S

    (tmp_path / "afile").write_text("x")

    def not_reached(*args, **kwargs):
        raise AssertionError("the export started")

    monkeypatch.setattr(S, "stream_export", not_reached)
    refused(convert_here(bf16_run, tmp_path / "afile" / "out"), "afile", "is not a directory")
    assert (tmp_path / "afile").read_text() == "x"


# ------------------------------------------------------------- what the export reads

def test_fp32_export_of_a_bf16_stage0_run_holds_the_fp32_masters(bf16_run, export_fp32, tmp_path):
    out, p = export_fp32
    assert "warning" not in p.stderr.lower(), p.stderr[-2000:]
    saved = checkpoint(bf16_run)
    masters = masters_by_value(saved)
    got = weights(out)
    rounded_apart = 0
    for name, candidates in masters.items():
        assert got["model." + name].dtype == torch.float32 and is_one_of(got["model." + name], candidates), name
        rounded_apart += not torch.equal(got["model." + name], saved["module"][name].float())
    assert rounded_apart > len(masters) // 2  # bf16 rounding would have shown
    # bf16: the weights the engine ran, exactly.
    p = convert_here(bf16_run, tmp_path / "bf16", "--dtype", "bf16")
    assert p.returncode == 0, p.stderr[-3000:]
    got16 = weights(tmp_path / "bf16")
    assert all(torch.equal(got16["model." + n], saved["module"][n]) for n in masters)
    # Sampling from the run directory reads the masters too.
    from megafusion import generate as G

    params = dict(G.load(bf16_run).model.named_parameters())
    assert all(is_one_of(params[n], m) for n, m in masters.items())


@pytest.mark.slow
def test_fp32_export_of_a_bf16_pipeline_run_holds_the_fp32_masters(tmp_path, base_copy, synthetic_shards):
    """Two stages x two replicas, bf16 (DeepSpeed's BF16_Optimizer: each stage's fp32
    masters partitioned over its replicas in the optimizer files). The fp32 export holds
    them, each equal to what DeepSpeed's own ds_to_universal extracts for that parameter
    (before, the bf16 weights of the layer files, rounded, with a warning); the bf16
    export holds the weights the engine ran; sampling from the run reads the masters."""
    import subprocess
    import sys

    run = train(tmp_path / "run", synthetic_shards, f"model.base={base_copy}", "train.dtype=bf16",
                "parallel.pipeline_stages=2", "parallel.zero_stage=1", "parallel.ds_config=ds_configs/pipeline_zero1.json",
                ranks=4)
    tag = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    universal = tmp_path / "universal"
    done = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(tag),
                           "--output_folder", str(universal), "--num_extract_workers", "1", "--num_merge_workers", "1",
                           "--inject_missing_state"], capture_output=True, text=True, env=dict(os.environ, DS_ACCELERATOR="cpu"))
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    # PipelineModule names: "<layer index>.<key>"; layer files hold the bf16 weights.
    reference = {d.name: torch.load(d / "fp32.pt", weights_only=False)["param"]
                 for d in (universal / "zero").iterdir() if (d / "fp32.pt").is_file()}
    ran = {}
    for d in reference:
        idx, _, key = d.partition(".")
        ran[d] = torch.load(tag / f"layer_{int(idx):02d}-model_states.pt", weights_only=False)[key]
    assert len(reference) > 20 and all(w.dtype == torch.bfloat16 for w in ran.values())

    p = convert_here(run, tmp_path / "fp32", "--dtype", "fp32", "--max-shard-size", "1MB")  # several shards
    assert p.returncode == 0 and "warning" not in p.stderr.lower(), p.stderr[-3000:]
    assert len(list((tmp_path / "fp32").glob("*.safetensors"))) > 1
    got = list(weights(tmp_path / "fp32").values())
    p = convert_here(run, tmp_path / "bf16", "--dtype", "bf16")
    assert p.returncode == 0, p.stderr[-3000:]
    got16 = list(weights(tmp_path / "bf16").values())
    apart = 0
    for name, master in reference.items():
        assert is_one_of(master.view(ran[name].shape), got), name  # the export holds the master itself
        assert any(w.shape == ran[name].shape and torch.equal(w, ran[name]) for w in got16), name
        apart += not torch.equal(master, ran[name].float().view(master.shape))
    assert apart > len(reference) // 2  # bf16 rounding would have shown
    from megafusion import generate as G

    params = list(G.load(run).model.parameters())
    assert all(is_one_of(m.view(ran[n].shape), params) for n, m in reference.items())


def test_fused_fp16_optimizer_layout_is_read_too(bf16_run, tmp_path):
    """DeepSpeed's FP16_Optimizer (with a fused Adam, on a GPU) saves each group's
    masters as one flat tensor (fp32_groups_flat): the same run, so laid out."""
    run = tmp_path / "run"
    shutil.copytree(bf16_run, run, ignore=shutil.ignore_patterns("hf"))
    tag = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    saved = checkpoint(run)
    masters = masters_by_value(saved)
    groups = saved["optimizer"].pop("fp32_groups")
    saved["optimizer"]["fp32_groups_flat"] = [torch.cat([t.reshape(-1) for t in g]) for g in groups]
    torch.save(saved, tag / "mp_rank_00_model_states.pt")
    p = convert_here(run, tmp_path / "out", "--dtype", "fp32")
    assert p.returncode == 0 and "warning" not in p.stderr.lower(), p.stderr[-3000:]
    got = weights(tmp_path / "out")
    assert all(is_one_of(got["model." + n], m) for n, m in masters.items())
    assert not torch.equal(got["model.layers.0.image.q_proj.weight"],
                           saved["module"]["layers.0.image.q_proj.weight"].float())


def test_fp32_export_without_masters_says_the_weights_are_rounded(bf16_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(bf16_run, run, ignore=shutil.ignore_patterns("hf"))
    tag = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    saved = checkpoint(run)
    del saved["optimizer"]
    torch.save(saved, tag / "mp_rank_00_model_states.pt")
    p = convert_here(run, tmp_path / "out", "--dtype", "fp32")
    assert p.returncode == 0, p.stderr[-3000:]
    warnings = [x for x in p.stderr.splitlines() if "fp32" in x and "rounded" in x]
    assert len(warnings) == 1 and str(tag) in warnings[0], p.stderr[-2000:]
    got = weights(tmp_path / "out")
    assert torch.equal(got["model.layers.0.image.q_proj.weight"], saved["module"]["layers.0.image.q_proj.weight"].float())
    p = convert_here(run, tmp_path / "out16", "--dtype", "bf16")  # nothing was asked that is missing
    assert p.returncode == 0 and "rounded" not in p.stderr, p.stderr[-2000:]


def test_a_run_trained_with_apex_rmsnorm_exports_and_loads_without_apex(bf16_run, export_fp32, tmp_path):
    import importlib.util

    if importlib.util.find_spec("apex") is not None:
        pytest.skip("apex is installed here: the run would build either way")
    run = tmp_path / "run"
    shutil.copytree(bf16_run, run, ignore=shutil.ignore_patterns("hf"))
    cfg = (run / "config.yaml").read_text()
    assert "fused_rmsnorm: none" in cfg
    (run / "config.yaml").write_text(cfg.replace("fused_rmsnorm: none", "fused_rmsnorm: apex"))
    p = convert_here(run, tmp_path / "out", "--dtype", "fp32")
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads((tmp_path / "out" / "config.json").read_text())["fusion"]["fused_rmsnorm"] == "none"
    assert tree(tmp_path / "out")["model.safetensors"] == tree(export_fp32[0])["model.safetensors"]
    from megafusion import generate as G

    params = dict(G.load(run).model.named_parameters())
    assert all(torch.equal(params[n], t) for n, t in G.load(bf16_run).model.named_parameters())


# ---------------------------------------------------------- generation defaults

def test_the_runs_guidance_scale_travels_with_the_export(bf16_run, export_fp32):
    from megafusion import generate as G

    out = export_fp32[0]
    gen_cfg = json.loads((out / "generation_config.json").read_text())
    assert (gen_cfg["image_guidance_scale"], gen_cfg["image_num_inference_steps"]) == (GUIDANCE, STEPS)
    for source in (out, bf16_run):
        gen = G.load(source)
        assert (gen.guidance_scale, gen.steps) == (GUIDANCE, STEPS), source


# ------------------------------------------------------- damaged files: one line

@pytest.mark.parametrize("damage", ["truncated", "missing shard"])
def test_generate_on_a_damaged_export_is_one_line(damage, bf16_run, export_fp32, tmp_path, capsys):
    from megafusion import generate as G

    out = tmp_path / "export"
    p = convert_here(bf16_run, out, "--dtype", "fp32", "--max-shard-size", "2MB")
    assert p.returncode == 0, p.stderr[-3000:]
    shard = sorted(out.glob("model-*.safetensors"))[1]
    if damage == "truncated":
        shard.write_bytes(shard.read_bytes()[:1000])
    else:
        shard.unlink()
    code = G.main(["--model", str(out), "text", "--prompt", "x", "--max-new-tokens", "2"])
    err = capsys.readouterr().err
    errors = [x for x in err.splitlines() if x.startswith("error:")]
    assert code == 2 and len(errors) == 1 and str(out) in errors[0], err[-2000:]


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_a_damaged_zero_checkpoint_is_one_line_naming_the_file(damage, bf16_run, tmp_path, capsys):
    """A ZeRO checkpoint laid out as DeepSpeed writes it, one of its files cut short (a
    copy that ran out of space) or overwritten: consolidating it (generate from a run
    directory) and streaming it (the export) name that file."""
    from megafusion import generate as G

    run = tmp_path / "run"
    shutil.copytree(bf16_run, run, ignore=shutil.ignore_patterns("hf", "checkpoints"))
    tag = run / "checkpoints" / "global_step2"
    tag.mkdir(parents=True)
    (run / "checkpoints" / "latest").write_text("global_step2")
    whole = (bf16_run / "checkpoints" / "global_step2" / "mp_rank_00_model_states.pt").read_bytes()
    (tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(whole)
    bad = tag / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    bad.write_bytes(whole[:len(whole) // 2] if damage == "truncated" else b"\x80\x02garbage" * 100)
    code = G.main(["--model", str(run), "text", "--prompt", "x"])
    err = capsys.readouterr().err
    errors = [x for x in err.splitlines() if x.startswith("error:")]
    assert code == 2 and len(errors) == 1 and str(bad) in errors[0], err[-2000:]
    refused(convert_here(run, tmp_path / "out"), str(bad))
