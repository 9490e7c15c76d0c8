"""Shared pieces of the benchmark scripts: building BLIP from a spec dict, timing, memory, tables, machine info.

Not a library module: the scripts in this folder import it by path (``sys.path`` holds the script's folder).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

RESULTS = Path(__file__).with_name("results")
PAPER_TARGETS = ["vision.attn.[qkv]", "text.attn.[qkv]", "fusion.attn.[qkv]"]
TEXT_FUSION_TARGETS = ["text.attn.[qkv]", "fusion.attn.[qkv]"]
# Twelve-word captions (BLIP retrieval captions are ~10-20 tokens; truncation is at 35).
CAPTIONS = [
    "a man in a red shirt is riding a bike down the street today",
    "two dogs are playing with a ball on the green grass in the park",
    "a woman is sitting on a bench and reading a book near the water",
    "a group of people stand in front of a large white building at night",
    "a little girl in a blue dress is running on the beach with her dog",
    "a black cat sleeps on a wooden table next to an open window",
    "three men are working on the roof of a small house in the sun",
    "a boy jumps into the pool while his friends watch from the side",
]


def cut_layers(preset: str, layers: int | None) -> None:
    """Make ``preset`` build with ``layers`` transformer layers in each branch (vision and text), in this process."""
    if layers is None:
        return
    from unitrans_blip import backbone as blip

    blip.PRESETS[preset] = dict(blip.PRESETS[preset], vl=layers, tl=layers)


def spec_dict(preset="base", image_size=224, freeze=True, adapters=(), side=None, alignment="itc.v1",
              k_test=16, itm_batch=128) -> dict:
    """A retrieval spec on a random-init BLIP preset, as a user would write it in TOML."""
    return {
        "backbone": {"name": "blip.v1", "preset": preset, "image_size": image_size, "freeze": freeze},
        "adapters": [dict(a) for a in adapters],
        "side_network": {"name": side} if side else {"name": "none"},
        "alignment_loss": {"name": alignment} if alignment else {"name": "none"},
        "task": {"name": "retrieval.v1", "k_test": k_test, "itm_batch": itm_batch},
        "data": {"name": "shapes_retrieval.v1"},
    }


def build_from_dict(data: dict, device="cpu"):
    """Validate and build (no data module): the path ``unitrans run`` takes."""
    from unitrans.engine.build import build
    from unitrans.spec import validate_dict

    spec = validate_dict(data)
    return spec, build(spec, device=device, with_data=False)


def synthetic_batch(batch_size: int, image_size: int, device="cpu", seed=0) -> dict:
    import torch

    g = torch.Generator().manual_seed(seed)
    return {
        "image": torch.randn(batch_size, 3, image_size, image_size, generator=g).to(device),
        "caption": [CAPTIONS[i % len(CAPTIONS)] for i in range(batch_size)],
        "image_id": torch.arange(batch_size),
    }


# ---- memory --------------------------------------------------------------------------------------------------
def rss_bytes() -> int:
    """Resident set size of this process, from ``/proc/self/statm``."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class RssPeak:
    """Peak RSS of this process, sampled every ``interval`` s by a thread (torch kernels release the GIL)."""

    def __init__(self, interval: float = 0.002):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval)

    def __enter__(self):
        self.peak = rss_bytes()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def sync(device: str) -> None:
    if str(device).startswith("cuda"):
        import torch

        torch.cuda.synchronize()


# ---- subprocess workers ----------------------------------------------------------------------------------------
class WorkerDied(RuntimeError):
    """A worker interpreter ended without answering; the message names it and the cause (signal, OOM killer)."""


def oom_kills() -> int | None:
    """The kernel OOM killer's kill count for this machine's memory cgroup (v2 ``memory.events`` or v1
    ``memory.oom_control``), or ``None`` where neither is readable."""
    for path in ("/sys/fs/cgroup/memory.events", "/sys/fs/cgroup/memory/memory.oom_control"):
        try:
            for line in Path(path).read_text().splitlines():
                if line.startswith("oom_kill "):
                    return int(line.split()[1])
        except (OSError, ValueError):
            continue
    return None


def exit_cause(returncode: int | None, oom_before: int | None) -> str:
    """Why a worker ended, in words: its exit status or signal, and whether the OOM killer acted meanwhile."""
    import signal

    if returncode is None:
        return "still running"
    if returncode >= 0:
        text = f"exit status {returncode}"
    else:
        try:
            text = f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            text = f"killed by signal {-returncode}"
    after = oom_kills()
    if oom_before is not None and after is not None and after > oom_before:
        text += f" (out of memory: the kernel's OOM killer killed {after - oom_before} process(es) meanwhile)"
    elif returncode == -9:
        text += " (SIGKILL: most often the kernel's OOM killer; no cgroup OOM count was readable to confirm)"
    return text


def run_worker(script: Path, job: dict, timeout: float = 1800) -> dict:
    """Run ``script --worker JSON`` in a fresh interpreter (clean RSS, no allocator reuse between configs)."""
    before = oom_kills()
    try:
        proc = subprocess.run([sys.executable, str(script), "--worker", json.dumps(job)], capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise WorkerDied(f"worker {job.get('name', job)} timed out after {timeout:.0f} s and was killed") from None
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise WorkerDied(f"worker {job.get('name', job)} failed: {exit_cause(proc.returncode, before)}\n"
                         f"{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])


class Worker:
    """A live ``script --worker JSON`` interpreter that answers one ``RESULT`` line per command line.

    A worker that dies raises :class:`WorkerDied` naming the configuration and the cause (exit status, signal,
    the OOM killer); :meth:`close` always ends the interpreter (so none is left holding memory)."""

    def __init__(self, script: Path, job: dict):
        import tempfile

        self.job, self.name = job, job.get("name", "?")
        self.oom_before = oom_kills()
        self.err = tempfile.TemporaryFile(mode="w+")  # a file, not a pipe: warnings can never fill it and block
        self.proc = subprocess.Popen([sys.executable, str(script), "--worker", json.dumps(job)], text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.err)
        self.ready = self._read()

    def _died(self) -> WorkerDied:
        self.proc.wait()
        self.err.seek(0)
        tail = self.err.read()[-3000:]
        return WorkerDied(f"worker {self.name} died: {exit_cause(self.proc.returncode, self.oom_before)}"
                          + (f"\n{tail}" if tail.strip() else ""))

    def _read(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith("RESULT "):
                return json.loads(line[len("RESULT "):])
        raise self._died()

    def ask(self, command: str) -> dict:
        if self.proc.poll() is not None:
            raise self._died()
        try:
            self.proc.stdin.write(command + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            raise self._died() from None
        return self._read()

    def close(self) -> None:
        """End the interpreter: close its stdin and wait, then terminate, then kill."""
        try:
            if self.proc.stdin and not self.proc.stdin.closed:
                self.proc.stdin.close()
        except (BrokenPipeError, OSError):
            pass
        for stop in (None, self.proc.terminate, self.proc.kill):
            if stop is not None:
                stop()
            try:
                self.proc.wait(timeout=30)
                break
            except subprocess.TimeoutExpired:
                continue
        self.err.close()


def emit(result: dict) -> None:
    print("RESULT " + json.dumps(result), flush=True)


# ---- reporting -------------------------------------------------------------------------------------------------
def median(xs):
    return statistics.median(xs) if xs else float("nan")


def machine() -> dict:
    import torch

    model = platform.processor() or "?"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    info = {"cpu": model, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(),
            "loadavg_at_start": list(os.getloadavg())}
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    try:
        import peft

        info["peft"] = peft.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def table(rows: list[dict], cols: list[tuple[str, str, str]]) -> str:
    """Markdown table; ``cols`` is ``(key, header, format)``."""
    head = "| " + " | ".join(h for _, h, _ in cols) + " |"
    sep = "|" + "|".join("---" for _ in cols) + "|"
    body = []
    for r in rows:
        cells = []
        for key, _, fmt in cols:
            v = r.get(key)
            cells.append("-" if v is None else (format(v, fmt) if fmt else str(v)))
        body.append("| " + " | ".join(cells) + " |")
    return "\n".join([head, sep, *body])


def write_json(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path
