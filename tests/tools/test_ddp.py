"""Scale-out: one DDP step (2 gloo processes on CPU) gives the gradients of one process on the same
global batch; and `torchrun --nproc_per_node 2 tools/train_det.py` trains and evaluates."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

# Every sampled set is "all candidates" so the step is deterministic whatever the RNG; both images of
# the global batch are the same picture, so per-rank BatchNorm statistics and loss normalisers equal
# the single-process ones -- what remains to differ is exactly what DDP must get right (sharding,
# gradient averaging, buffers).
KW = dict(fpn_channels=32, representation_size=64, rpn_pre_nms_top_n_train=60, rpn_post_nms_top_n_train=30,
          rpn_batch_size_per_image=100_000, box_batch_size_per_image=100_000, box_positive_fraction=1.0,
          anchor_sizes=((8,), (16,), (32,), (64,), (128,)))


def _batch():
    g = torch.Generator().manual_seed(0)
    img = torch.randn(1, 3, 64, 64, generator=g)
    images = torch.cat([img, img])
    target = {"boxes": torch.tensor([[8.0, 10.0, 40.0, 50.0], [30.0, 5.0, 60.0, 30.0]]), "labels": torch.tensor([1, 2])}
    return images, [(64, 64), (64, 64)], [target, {k: v.clone() for k, v in target.items()}]


def _model():
    from heads import build_detector

    torch.manual_seed(0)
    return build_detector("resnet18", num_classes=3, **KW)


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    model = _model()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    images, sizes, targets = _batch()
    losses = ddp(images[rank : rank + 1], sizes[rank : rank + 1], targets[rank : rank + 1])
    sum(losses.values()).backward()
    if rank == 0:
        torch.save(_grads(model), out)
    dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_step_equals_single_process_step(tmp_path):
    model = _model()
    images, sizes, targets = _batch()
    sum(model(images, sizes, targets).values()).backward()
    ref = _grads(model)
    out = tmp_path / "ddp_grads.pt"
    mp.spawn(_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    got = torch.load(out, weights_only=True)
    assert set(got) == set(ref) and len(ref) > 50
    for name, g in ref.items():
        # float summation order differs between one process and two: tolerate rounding, not errors
        torch.testing.assert_close(got[name], g, rtol=1e-4, atol=1e-4 * float(g.abs().max()) + 1e-8, msg=name)


def test_torchrun_two_cpu_processes_train_and_evaluate(tmp_path):
    from test_train_det import TINY

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           str(ROOT / "tools" / "train_det.py"), *TINY, "--max-iters", "4", "--data-dir", str(tmp_path / "data"),
           "--output", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    logs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r for r in logs if r.get("event") == "start"][0]["world_size"] == 2
    assert max(r["iteration"] for r in logs if "loss" in r) == 4
    metrics = json.loads((out / "metrics.json").read_text())
    assert "AP" in metrics
    # evaluation gathered from both ranks covers every val image once
    dets = json.loads((out / "detections.json").read_text())
    assert {d["image_id"] for d in dets} <= set(range(1, 5)) | set(range(0, 100))
