"""ZeRO-3 start-up (issue 13, "Start-up"): with parallel.zero_init on two CPU ranks, only
rank 0 reads the base's safetensors files, the image tower is copied from each rank's
own partitions with no collective, and the model assembled that way equals the one
built whole, in fp32 and bf16. One two-rank run of zero_init_startup_worker.py measures
all of it (see its docstring) for a single-file tied base and a sharded untied one."""
import re
import subprocess
from pathlib import Path

import pytest
from launchers import launcher_cmd, launcher_env

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def startup_checks(tiny_llama, tiny_llama_untied, tmp_path_factory) -> dict:
    """{(check, rank): [(PASS|FAIL, detail), ...]} from one two-rank run."""
    import torch
    from transformers import LlamaForCausalLM

    sharded = tmp_path_factory.mktemp("sharded") / "tiny-llama-untied-sharded"
    model = LlamaForCausalLM.from_pretrained(tiny_llama_untied, dtype=torch.float32)
    model.save_pretrained(sharded, max_shard_size="5MB")
    assert (sharded / "model.safetensors.index.json").is_file() and len(list(sharded.glob("*.safetensors"))) >= 3

    cmd = [*launcher_cmd(2), str(REPO / "tests/parallel/zero_init_startup_worker.py"),
           str(REPO / "configs/tiny.yaml"), tiny_llama, str(sharded)]
    out = subprocess.run(cmd, cwd=REPO, env=launcher_env(2), capture_output=True, text=True, timeout=1500)
    text = out.stdout + out.stderr
    assert out.returncode == 0 and text.count("STARTUP_WORKER_DONE") == 2, text[-4000:]
    # Two ranks print at once: a line may hold both ranks' checks.
    found = re.findall(r"CHECK (\w+) rank (\d) (PASS|FAIL) (.*?)(?=CHECK \w+ rank \d |\n|$)", text)
    print("\n".join(" ".join(row) for row in found))
    print("\n".join(re.findall(r"INFO build_collectives .*?(?=CHECK |INFO build_collectives |\n|$)", text)))
    checks: dict = {}
    for name, rank, verdict, detail in found:
        checks.setdefault((name, int(rank)), []).append((verdict, detail))
    return checks


def _assert_check(checks: dict, name: str) -> None:
    results = [(rank, verdict, detail) for (n, rank), rows in sorted(checks.items()) if n == name
               for verdict, detail in rows]
    # 2 bases x 2 dtypes on each of the 2 ranks.
    assert len(results) == 8, results
    failed = [r for r in results if r[1] != "PASS"]
    assert not failed, "\n".join(f"rank {rank}: {detail}" for rank, _, detail in failed)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_only_rank0_reads_the_base(startup_checks):
    """Rank 0 reads each tensor of every shard once; rank 1 opens no shard."""
    _assert_check(startup_checks, "reads")


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_image_tower_copy_runs_no_collective(startup_checks):
    """No all-gather (nor broadcast) while the image tower is copied."""
    _assert_check(startup_checks, "copy_collectives")


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_partitioned_build_equals_whole_build(startup_checks):
    """Both towers, the new modules and the buffers, gathered, equal the model built
    whole (cast to bf16 for bf16), bitwise."""
    _assert_check(startup_checks, "equal")


def test_reader_names_a_missing_or_misshapen_tensor(tiny_llama, tmp_path):
    """What rank 0 checks from the files' headers before any weight moves (and then
    raises on every rank): a missing tensor and a wrong shape, each named in one line."""
    import shutil

    from safetensors.torch import load_file, save_file

    from megafusion.parallel.base_weights import BaseWeights

    tensors = load_file(str(Path(tiny_llama) / "model.safetensors"))
    wanted = [(k, tuple(v.shape)) for k, v in tensors.items()]
    assert BaseWeights(tiny_llama).check_shapes(wanted) is None

    broken = tmp_path / "broken"
    shutil.copytree(tiny_llama, broken)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    tensors["model.norm.weight"] = tensors["model.norm.weight"][:-1].clone()
    save_file(tensors, str(broken / "model.safetensors"), metadata={"format": "pt"})
    weights = BaseWeights(str(broken))
    missing = weights.check_shapes(wanted)
    assert missing is not None and "'model.layers.1.mlp.up_proj.weight'" in missing and "\n" not in missing
    wrong = weights.check_shapes([w for w in wanted if w[0] != "model.layers.1.mlp.up_proj.weight"])
    assert wrong is not None and "model.norm.weight has shape (63,)" in wrong and "(64,)" in wrong, wrong
    assert weights.reads == []  # headers only
