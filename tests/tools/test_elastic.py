"""Elastic scale-out on CPU (gloo): `torchrun --max-restarts` survives a killed worker, and no rank waits
forever for a dead or failing peer."""
import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

from res_backbone.engine.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).parent))
from test_train_det import TINY  # noqa: E402

MAX_ITERS = 16  # 8 images, 2 ranks x batch 2: an epoch is 2 iterations


def _children(pid: int):
    """Processes whose parent is ``pid`` (from /proc, no psutil needed)."""
    kids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                kids.append(int(entry.name))
    return kids


def _env_of(pid: int) -> dict:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


def _logs(out: Path):
    path = out / "log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def test_torchrun_restarts_after_a_worker_is_killed_and_finishes(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "--max-restarts", "2", "--monitor-interval", "0.2", str(ROOT / "tools" / "train_det.py"), *TINY,
           "--synthetic-train", "8", "--max-iters", str(MAX_ITERS), "--checkpoint-every", "2", "--eval-every", "100",
           "--dist-timeout", "60", "--resume", "auto", "--data-dir", str(tmp_path / "data"), "--output", str(out)]
    console = tmp_path / "torchrun.txt"
    with open(console, "w") as sink:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
    killed = None
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            train = [r["iteration"] for r in _logs(out) if "loss" in r]
            if train and max(train) >= 3 and (out / "checkpoint_last.pt").is_file():
                rank1 = [p for p in _children(proc.pid) if _env_of(p).get("RANK") == "1"]
                if rank1:
                    killed = (max(train), rank1[0])
                    os.kill(rank1[0], signal.SIGKILL)
                    break
            time.sleep(0.05)
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    output = console.read_text()
    assert killed is not None, "no worker to kill before the run ended"
    assert killed[0] < MAX_ITERS, "the worker was killed after training ended"
    assert proc.returncode == 0, output[-5000:]
    starts = [r for r in _logs(out) if r.get("event") == "start"]
    # One restart exactly: the restarted group forms at the first try (init_distributed's per-attempt
    # store prefix keeps it from dialling the dead worker's old address).
    assert [s["restart"] for s in starts] == [0, 1] and starts[-1]["world_size"] == 2, output[-6000:]
    assert starts[-1]["resumed_from"].endswith("checkpoint_last.pt") and 2 <= starts[-1]["iteration"] <= killed[0]
    train = [r["iteration"] for r in _logs(out) if "loss" in r]
    resumed_at = starts[-1]["iteration"]
    assert train[-(MAX_ITERS - resumed_at):] == list(range(resumed_at + 1, MAX_ITERS + 1))
    final = load_checkpoint(out / "checkpoint_last.pt")
    assert final["iteration"] == MAX_ITERS
    assert "AP" in json.loads((out / "metrics.json").read_text())
    assert "rank 0 of 2" in output  # the survivor said what happened to it, naming its rank


def _worker(rank, port, fault, out_dir):
    """One rank of a 2-process gloo group with a 3 s collective timeout; rank 1 misbehaves per ``fault``."""
    import datetime

    import torch.distributed as dist

    from res_backbone.engine.distributed import describe_failure

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=3))
    try:
        dist.barrier()
        if rank == 1 and fault == "raise":
            raise ValueError("bad batch on this rank")
        if rank == 1 and fault == "hang":
            time.sleep(120)
        dist.all_reduce(torch.ones(4))
        Path(out_dir, f"{rank}.txt").write_text("finished")
    except Exception as e:
        Path(out_dir, f"{rank}.txt").write_text(describe_failure(e))
        os._exit(1)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_pair(tmp_path, fault):
    ctx = multiprocessing.get_context("fork")  # torch is already imported here: no interpreter start-up
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, fault, str(tmp_path))) for r in (0, 1)]
    t0 = time.time()
    for p in procs:
        p.start()
    procs[0].join(60)
    elapsed = time.time() - t0
    for p in procs:
        if p.is_alive():
            p.kill()
        p.join(10)
    return (tmp_path / "0.txt").read_text(), elapsed


def test_a_rank_that_raises_ends_the_others_with_its_rank_named(tmp_path):
    msg, elapsed = _run_pair(tmp_path, "raise")
    assert elapsed < 30
    assert msg.startswith("rank 0 of 2 stopped because rank 1 of 2"), msg
    assert "ValueError: bad batch on this rank" in msg
    assert (tmp_path / "1.txt").read_text().startswith("rank 1 of 2 (pid")


def test_a_hanging_rank_times_the_others_out(tmp_path):
    msg, elapsed = _run_pair(tmp_path, "hang")
    assert elapsed < 40, "the collective timeout did not end the waiting rank"
    assert msg.startswith("rank 0 of 2") and "timed out" in msg.lower(), msg
