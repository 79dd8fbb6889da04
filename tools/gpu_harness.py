"""How tools/gpu_check.py runs a check: progress lines on stderr (stdout carries the
JSON report alone), and a check that raises becomes a failed result with its exception,
so that the other checks still run."""
from __future__ import annotations

import contextlib
import sys
import time
import traceback


def log(msg: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run_check(name: str, fn, *args) -> dict:
    """fn(*args) -> dict with "ok"; an exception becomes ok False with its text."""
    log(f"{name}: start")
    t0 = time.time()
    try:
        with contextlib.redirect_stdout(sys.stderr):  # stdout carries the JSON alone
            result = fn(*args)
    except (Exception, SystemExit) as e:  # library code may exit; the other checks go on
        result = {"ok": False, "error": f"{type(e).__name__}: {e}".strip()[:2000],
                  "traceback": traceback.format_exc()[-4000:]}
    result["seconds"] = round(time.time() - t0, 1)
    log(f"{name}: {'passed' if result.get('ok') else 'FAILED'} in {result['seconds']} s"
        + (f" ({result['error'].splitlines()[0][:200]})" if "error" in result else ""))
    return result

