"""tests/conftest.py's hooks under pytest-xdist, as `make test` runs them: a small suite
laid out like this one runs with three workers, beside the real conftest.py."""
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# Leaves a buffer as a DeepSpeed launch does, and says which worker ran it.
LEAVES_BUFFER = '''
import os
from pathlib import Path

def test_leaves_a_buffer():
    Path(os.environ["MF_BUFFER"]).write_bytes(b"x")
'''

# Marks, in every worker, the end of its session: after its fixtures' teardown and the
# other hooks' (trylast), i.e. after anything that cleans up at a worker's end.
MARKS_FINISH = '''
import os
from pathlib import Path

import pytest

@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session):
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker:
        Path(os.environ["MF_FINISHED"], worker).write_text("")
'''

# Waits, on a worker of its own, until both other workers have finished their sessions
# (test_a's among them), then looks for the buffer: a worker that cleaned up at its own
# end would have removed it.
OUTLIVES = '''
import os
import time
from pathlib import Path

def test_the_buffer_outlives_the_worker_that_made_it():
    buffer, finished = Path(os.environ["MF_BUFFER"]), Path(os.environ["MF_FINISHED"])
    deadline = time.monotonic() + 120
    while len(list(finished.iterdir())) < 2:
        assert time.monotonic() < deadline, "the other workers did not finish"
        time.sleep(0.05)
    assert buffer.exists(), "a worker removed a buffer while another worker was still running"
'''

SAYS_WORKER = '''
import os
from pathlib import Path

def test_says_its_worker():
    Path(os.environ["MF_WORKERS"], __name__).write_text(os.environ["PYTEST_XDIST_WORKER"])
'''


def test_shm_cleanup_waits_for_every_worker_and_slurm_files_share_one(tmp_path):
    suite = tmp_path / "suite"
    (suite / "tests" / "slurm").mkdir(parents=True)
    shutil.copy(REPO / "tests" / "conftest.py", suite / "tests" / "conftest.py")
    (suite / "pytest.ini").write_text("[pytest]\ntestpaths = tests\n")
    (suite / "conftest.py").write_text(MARKS_FINISH)
    (suite / "tests" / "test_a.py").write_text(LEAVES_BUFFER)
    (suite / "tests" / "test_b.py").write_text(OUTLIVES)
    (suite / "tests" / "slurm" / "test_one.py").write_text(SAYS_WORKER)
    (suite / "tests" / "slurm" / "test_two.py").write_text(SAYS_WORKER)
    workers, finished = tmp_path / "workers", tmp_path / "finished"
    workers.mkdir()
    finished.mkdir()
    buffer = Path("/dev/shm") / f"deepspeed_mf_xdist_test_{uuid.uuid4().hex}"
    env = dict(os.environ, MF_BUFFER=str(buffer), MF_WORKERS=str(workers), MF_FINISHED=str(finished))
    try:
        # Three groups (test_a, test_b, tests/slurm) for three workers: each gets one.
        res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "3"], cwd=suite, env=env, capture_output=True, text=True,
                             timeout=300)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        assert "4 passed" in res.stdout
        # The controller removed it once every worker was done.
        assert not buffer.exists()
        ran_on = {path.name: path.read_text() for path in workers.iterdir()}
        assert set(ran_on) == {"test_one", "test_two"} and len(set(ran_on.values())) == 1, ran_on
    finally:
        buffer.unlink(missing_ok=True)
