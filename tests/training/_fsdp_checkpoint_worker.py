"""Worker for test_checkpoint_fsdp.py, run by torch.distributed.run on 2 CPU processes (gloo): a DiT sharded with
FSDP2 saves a checkpoint, a freshly sharded copy loads it, and both continue identically."""
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import visionformers as vf
from visionformers.training import checkpoint as ckpt
from visionformers.training.ema import EMA
from visionformers.training.optim import build_lr_scheduler, build_optimizer


class Dist:
    """The slice of accelerate.Accelerator that the checkpoint code uses."""

    def __init__(self):
        self.process_index, self.num_processes = dist.get_rank(), dist.get_world_size()

    def wait_for_everyone(self):
        dist.barrier()


def build(mesh):
    torch.manual_seed(0)
    model = vf.create_model("dit_tiny", sample_size=8, depth=2, hidden_size=32, num_heads=2, num_classes=10)
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = build_optimizer(model, learning_rate=1e-3)
    return model, opt, build_lr_scheduler(opt, "cosine", 1, 10), EMA(model, decay=0.9)


def step(model, opt, sched, ema, i):
    g = torch.Generator().manual_seed(100 + i)  # the same batch on every rank: a pure bookkeeping test
    x, t = torch.randn(4, 1, 8, 8, generator=g), torch.rand(4, generator=g) * 999
    loss = (model(x, t, class_labels=torch.arange(4)) - x).pow(2).mean()
    loss.backward()
    opt.step(), opt.zero_grad(), sched.step(), ema.update(model)
    return loss.item()


def main(out: str) -> None:
    dist.init_process_group("gloo")
    mesh, acc = init_device_mesh("cpu", (dist.get_world_size(),)), Dist()
    a = build(mesh)
    for i in range(2):
        step(*a, i)
    path = ckpt.save_checkpoint(out, 2, model=a[0], optimizer=a[1], lr_scheduler=a[2], ema=a[3], accelerator=acc)
    ckpt.export_pretrained(a[0], f"{out}/model", ema=a[3], accelerator=acc)
    expected = [step(*a, i) for i in (2, 3)]
    b = build(mesh)
    ckpt.load_checkpoint(path, model=b[0], optimizer=b[1], lr_scheduler=b[2], ema=b[3], accelerator=acc)
    got = [step(*b, i) for i in (2, 3)]
    full = [ckpt.full_model_state_dict(m[0]) for m in (a, b)]  # collectives: every rank calls them
    emas = [ckpt.ema_state_dict(m[0], m[3]) for m in (a, b)]
    if dist.get_rank() == 0:
        assert got == expected, (got, expected)
        assert all(torch.equal(full[0][k], full[1][k]) for k in full[0]) and len(full[0]) > 10
        assert all(torch.equal(emas[0][k], emas[1][k]) for k in emas[0])
        assert type(vf.from_pretrained(f"{out}/model")).__name__ == "DiT"  # not FSDP2's FSDPDiT subclass
        print("FSDP2 CHECKPOINT OK")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
