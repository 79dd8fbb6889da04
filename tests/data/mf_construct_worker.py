"""One job of the concurrent-construction test: builds ROUNDS loaders, each at the same
moment as the other job builds its own (a file barrier per round), and keeps them alive
until the other job has built all of its own.

    python mf_construct_worker.py DATA CACHE JOB SYNC_DIR ROUNDS OUT

streaming's prefix search is made to linger 1 s between finding a free prefix and
registering it, so that two jobs building together reliably look at the same moment;
without serialization both take the same prefix and one fails (FileExistsError
'/000NNN_locals'). Writes {"prefixes": [...]} or {"error": "..."} to OUT (JSON).
"""
import json
import os
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def wait_for_both(sync_dir: str, job: str, i: int) -> None:
    open(os.path.join(sync_dir, f"{job}.{i}"), "w").close()
    deadline = time.monotonic() + 600
    while len([f for f in os.listdir(sync_dir) if f.endswith(f".{i}")]) < 2:
        if any(f.endswith(".failed") for f in os.listdir(sync_dir)):
            raise RuntimeError(f"the other job failed before round {i}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"the other job never reached round {i}")
        time.sleep(0.005)


def main():
    data, cache, job, sync_dir, rounds, out = sys.argv[1:7]
    import streaming.base.shared.prefix as prefix

    found = prefix._check_and_find

    def lingering(streams_local, streams_remote, shm_name):
        result = found(streams_local, streams_remote, shm_name)
        if shm_name == "locals":
            time.sleep(1.0)
        return result

    prefix._check_and_find = lingering

    from megafusion.data import DataConfig, build_train_loader
    from megafusion.data.dist_env import DistEnv
    from megafusion.model.config import FusionConfig
    from megafusion.model.loading import load_tokenizer

    tokenizer = load_tokenizer("smollm2")
    loaders, result = [], {"prefixes": []}
    try:
        for i in range(int(rounds)):
            cfg = DataConfig(train=data, cache_root=cache, run_id=f"{job}-{i}", seq_len=256, batch_size=1,
                             samples_per_step=2, num_workers=0)
            wait_for_both(sync_dir, job, i)
            loaders.append(build_train_loader(cfg, FusionConfig(image_size=16), tokenizer, 64, DistEnv(0, 1, 0, 1)))
            result["prefixes"].append(int(loaders[-1].dataset._shm_prefix_int))
        # Both jobs stay alive until both have built everything: a job that exited first
        # would free its prefixes (streaming unlinks its shared memory at exit), and the
        # other's last round could then rightly take one of them again.
        wait_for_both(sync_dir, job, int(rounds))
    except Exception as e:
        result["error"] = f"{type(e).__name__}: {e}\n{traceback.format_exc()[-1500:]}"
        open(os.path.join(sync_dir, f"{job}.failed"), "w").close()
    with open(out, "w") as f:
        json.dump(result, f)
    sys.exit(1 if "error" in result else 0)


if __name__ == "__main__":
    main()
