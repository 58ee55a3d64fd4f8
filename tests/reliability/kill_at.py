"""Run the real ``logitcache`` CLI in forked processes that SIGKILL themselves at chosen moments.

Usage: ``python -m tests.reliability.kill_at PLAN.json RESULT.json``.

Why a fork server: importing torch and transformers costs seconds per process, so this script
imports them once (it runs no torch op itself, which keeps forking safe) and forks one child per
step of the plan. Each child is a real process with its own pid, so a kill here is the kill a
scheduler or the OOM killer deals: no ``finally``, no ``atexit``, a lock file naming a dead pid.

A plan is ``{"seed": int, "steps": [step, ...]}``; every step runs ``logitcache ARGV`` in a fresh
child, and may add one of:

- ``"count": [[target, match], ...]``: count the calls of each target (a reference run), only
  those whose arguments' repr contains ``match`` unless it is null; later kills of that target
  and match with ``"n": null`` draw their N uniformly from 1..count with the plan's seed;
- ``"kill": {"target": "module:Class.attr", "n": N or null, "when": "before" | "after" | "torn"}``:
  the child SIGKILLs itself at the N-th call of target, before the call runs or after it
  returned (``torn`` is for ``train_students:_log`` only: half the row is written, then the kill);
  ``"match"`` (optional) counts only calls whose arguments' repr contains that text;
- ``"kill_after_seconds": t``: the parent SIGKILLs the child t seconds after forking it (``null``:
  a moment drawn with the plan's seed between 30% and 95% of the last counted run's duration);
- ``"snapshot": CACHE_DIR``: after the step, record the cache's committed units and lock file.

The result lists, per step, how the child ended (``signal`` or ``exit_code``), its stdout and
stderr tails, the N drawn, the counts, and the snapshot.
"""

from __future__ import annotations

import importlib
import json
import os
import random
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# imported once, before forking, so that no child pays for them
import matplotlib.font_manager  # noqa: F401
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: F401
from matplotlib.figure import Figure  # noqa: F401
from transformers import (  # noqa: F401
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
)

import logitcache.cli
import logitcache.pipeline.distill.report  # noqa: F401
import logitcache.stages.build_cache  # noqa: F401
import logitcache.stages.train_students  # noqa: F401


def _resolve(target: str) -> tuple[Any, str]:
    """The object holding the attribute named by ``module:Qual.name``, and the attribute's name."""
    module_name, _, qualname = target.partition(":")
    owner: Any = importlib.import_module(module_name)
    *path, attr = qualname.split(".")
    for part in path:
        owner = getattr(owner, part)
    return owner, attr


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _key(target: str, match: str | None) -> str:
    return target if match is None else f"{target}[{match}]"


def _patch(target: str, *, when: str, n: int | None, match: str | None, counts: dict[str, int]) -> None:
    key = _key(target, match)
    owner, attr = _resolve(target)
    original = getattr(owner, attr)
    is_static = isinstance(owner, type) and isinstance(owner.__dict__.get(attr), staticmethod)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if match is not None and match not in repr((args, kwargs)):
            return original(*args, **kwargs)
        counts[key] = counts.get(key, 0) + 1
        hit = n is not None and counts[key] == n
        if hit and when == "before":
            _die()
        if hit and when == "torn":  # _log(stream, row): half a JSON line reaches the file
            stream, row = args[0], args[1]
            text = json.dumps(row)
            stream.write(text[: len(text) // 2])
            stream.flush()
            _die()
        result = original(*args, **kwargs)
        if hit:
            _die()
        return result

    setattr(owner, attr, staticmethod(wrapper) if is_static else wrapper)


def _run_child(step: dict[str, Any], *, n: int | None, out: Path) -> None:
    """In the forked child: patch, run the CLI, write the counts, exit with the CLI's status."""
    counts: dict[str, int] = {}
    for target, match in step.get("count", []):
        _patch(target, when="never", n=None, match=match, counts=counts)
    kill = step.get("kill")
    if kill:
        _patch(kill["target"], when=kill.get("when", "before"), n=n, match=kill.get("match"), counts=counts)
    for fd, name in ((1, "stdout"), (2, "stderr")):
        handle = os.open(out / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(handle, fd)
    code = 0
    try:
        logitcache.cli.main(step["argv"], prog_name="logitcache", standalone_mode=True)
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    except BaseException:  # noqa: BLE001  (report and fail like the CLI would)
        import traceback

        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    (out / "counts.json").write_text(json.dumps(counts))
    os._exit(code)


def _snapshot(cache: str) -> dict[str, Any]:
    root = Path(cache)
    try:
        units = [s["unit_id"] for s in json.loads((root / "manifest.json").read_text())["shards"]]
    except (OSError, ValueError, KeyError):
        units = None
    lock = root / "_lock"
    return {"units": units, "lock": json.loads(lock.read_text()) if lock.exists() else None,
            "files": sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())}


def run_plan(plan: dict[str, Any]) -> list[dict[str, Any]]:
    rng = random.Random(plan.get("seed", 0))
    reference: dict[str, int] = {}
    reference_seconds = 1.0
    results = []
    for step in plan["steps"]:
        kill = step.get("kill") or {}
        n = kill.get("n")
        if kill and n is None:
            n = rng.randint(1, max(1, reference.get(_key(kill["target"], kill.get("match")), 1)))
        out = Path(tempfile.mkdtemp(prefix="kill_at-"))
        started = time.perf_counter()
        pid = os.fork()
        if pid == 0:
            _run_child(step, n=n, out=out)
        reaped = (0, 0)
        if "kill_after_seconds" in step:
            after = step["kill_after_seconds"]
            if after is None:
                after = step["kill_after_seconds"] = round(rng.uniform(0.3, 0.95) * reference_seconds, 3)
            deadline = started + float(after)
            while time.perf_counter() < deadline and (reaped := os.waitpid(pid, os.WNOHANG)) == (0, 0):
                time.sleep(0.005)
            if reaped == (0, 0):
                os.kill(pid, signal.SIGKILL)
        if reaped == (0, 0):
            reaped = os.waitpid(pid, 0)  # reaped: the pid in a lock file is now dead
        status = reaped[1]
        counts_file = out / "counts.json"
        counts = json.loads(counts_file.read_text()) if counts_file.exists() else {}
        if step.get("count"):
            reference.update(counts)
            reference_seconds = time.perf_counter() - started
        result = {
            "name": step.get("name"), "n": n, "kill_after_seconds": step.get("kill_after_seconds"), "counts": counts,
            "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
            "exit_code": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
            "stdout": (out / "stdout").read_text(errors="replace"),
            "stderr": (out / "stderr").read_text(errors="replace")[-4000:],
            "seconds": round(time.perf_counter() - started, 3),
        }
        if step.get("snapshot"):
            result["snapshot"] = _snapshot(step["snapshot"])
        results.append(result)
    return results


def main() -> None:
    plan_path, result_path = sys.argv[1:3]
    plan = json.loads(Path(plan_path).read_text())
    Path(result_path).write_text(json.dumps(run_plan(plan), indent=1))


if __name__ == "__main__":
    main()
