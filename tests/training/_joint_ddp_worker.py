"""Worker for test_text_denoiser.py, run by torch.distributed.run on 2 CPU processes (gloo): a JointTextDenoiser
under DDP, each rank with its own captions, gets the encoder's gradients averaged over the ranks, exactly those of
the same module outside DDP averaged by hand, for two steps (a parameter left without a gradient would make DDP
fail at the second)."""
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import visionformers as vf
from visionformers.text.conditioning import TextConditioner
from visionformers.training.text_denoiser import JointTextDenoiser


def build():
    torch.manual_seed(0)
    text = TextConditioner("t5_tiny", freeze=False)  # the full T5: its decoder is never run, so it stays frozen
    unet = vf.create_model("unet_tiny", sample_size=8, in_channels=1, base_channels=8, channel_mults=(1, 2),
                           num_res_blocks=1, attention_resolutions=(4,), attention_head_dim=8, norm_groups=4,
                           context_dim=text.context_dim)
    with torch.no_grad():  # away from the zero-initialised output projections, which pass no gradient to the text
        for q in unet.parameters():
            q.add_(0.05 * torch.randn_like(q))
    return JointTextDenoiser(unet, text)


def main():
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    ddp, local = DDP(build().eval()), build().eval()  # eval: no dropout, so the two copies compute the same
    for step in range(2):
        g = torch.Generator().manual_seed(10 * step + rank)  # each rank its own batch and captions
        x, t = torch.randn(2, 1, 8, 8, generator=g), torch.rand(2, generator=g) * 999
        captions = [["a zero", "seven"], ["a red one", ""]][rank]
        ddp(x, t, captions=captions).pow(2).mean().backward()
        local(x, t, captions=captions).pow(2).mean().backward()
        for (name, p), q in zip(ddp.module.named_parameters(), local.parameters()):
            if not p.requires_grad:
                assert p.grad is None and name.startswith("text_encoder.encoder.decoder."), name
                continue
            mean = q.grad.clone()
            dist.all_reduce(mean)
            mean /= world
            torch.testing.assert_close(p.grad, mean, rtol=1e-4, atol=1e-6, msg=name)
            if name.startswith("text_encoder."):
                assert p.grad.abs().sum() > 0, name
        for m in (ddp, local):
            for p in m.parameters():
                p.grad = None
    if rank == 0:
        print("JOINT DDP OK")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
