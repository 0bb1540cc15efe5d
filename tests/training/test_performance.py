"""Regional compilation (one graph per repeated block shape, no recompiles across steps or after a resume),
training speed settings, and the GPU-only paths (skipped without CUDA). Compiles use the eager backend:
dynamo's tracing and guards without inductor's code generation."""
import sys
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters

import visionformers as vf
from visionformers.training import optim, performance

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from _unet_script_helpers import TRAIN, assert_same_files, load_script  # noqa: E402

DIT = dict(in_channels=4, sample_size=8, num_classes=3)


def compiled_graphs() -> int:
    return counters["stats"]["unique_graphs"]


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()
    counters.clear()


def test_blocks_compile_once_and_never_again(fresh_dynamo):
    model = vf.create_model("dit_tiny", **DIT).train()
    reference = vf.create_model("dit_tiny", **DIT).train()
    reference.load_state_dict(model.state_dict())
    assert performance.compile_blocks(model, backend="eager") == len(model.blocks)
    assert list(model.state_dict()) == list(reference.state_dict())  # no _orig_mod. prefix: checkpoints stay plain
    assert vf.hub.unwrap_model(model) is model
    opt = torch.optim.AdamW(model.parameters())

    def step(seed: int) -> None:
        torch.manual_seed(seed)
        x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 700]), torch.tensor([0, 2])
        out = model(x, t, class_labels=y)
        torch.testing.assert_close(out, reference(x, t, class_labels=y), rtol=0, atol=0)  # eager backend: same ops
        out.square().mean().backward()
        opt.step()
        opt.zero_grad()
        reference.load_state_dict(model.state_dict())

    step(0)
    assert compiled_graphs() == 1  # every DiT block shares one graph
    with torch._dynamo.config.patch(error_on_recompile=True):  # any recompile from here on raises
        step(1)
        step(2)
    assert compiled_graphs() == 1


@torch._dynamo.config.patch(recompile_limit=8)  # dynamo's default, restored after the test
def test_every_block_runs_compiled_in_training_and_eval(fresh_dynamo):
    """unet_tiny's 17 residual blocks (7 widths), run in training and in eval mode (sampling during training), need
    more graphs than dynamo's 8 per function, past which it would run them eagerly."""
    model = vf.create_model("unet_tiny", sample_size=8, context_dim=16)
    performance.compile_blocks(model, backend="eager")
    assert torch._dynamo.config.recompile_limit == 17 * performance.GRAPHS_PER_BLOCK
    for training in (True, False):
        model.train(training)
        with torch.no_grad():
            model(torch.randn(2, 1, 8, 8), torch.tensor([3.0, 700.0]), context=torch.randn(2, 5, 16))
    assert compiled_graphs() == 18  # 9 block variants in each mode
    assert not any("recompile limit" in reason for reason in counters["unimplemented"])
    # Swin-T's blocks differ in shift and stochastic-depth rate: each of the 12 may need its graphs
    with torch.device("meta"):
        swin = vf.create_model("swin_tiny_patch4_window7_224")
    with torch._dynamo.config.patch(recompile_limit=8):
        performance.compile_blocks(swin, backend="eager")
        assert torch._dynamo.config.recompile_limit == 12 * performance.GRAPHS_PER_BLOCK


def test_compile_needs_blocks_and_a_known_backend():
    with pytest.raises(ValueError, match="model"):
        performance.compile_blocks(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="compile_backend"):
        performance.configure_training(vf.create_model("dit_tiny", **DIT), "cpu", compile=True, compile_backend="nope")


def test_repeated_blocks_of_the_unet_and_text_models():
    unet = vf.create_model("unet_tiny", in_channels=1, base_channels=8, channel_mults=(1, 2), num_res_blocks=1,
                           attention_resolutions=(4,), attention_head_dim=8, norm_groups=4, sample_size=8)
    kinds = {type(b).__name__ for b in performance.repeated_blocks(unet)}
    assert kinds == {"ResBlock", "SpatialAttention"} and len(performance.repeated_blocks(unet)) == 12
    t5 = vf.create_model("t5_tiny")
    assert len(performance.repeated_blocks(t5)) == len(t5.encoder.blocks) + len(t5.decoder.blocks)


def test_cpu_settings_leave_the_model_alone():
    model = vf.create_model("unet_tiny", in_channels=1, base_channels=8, channel_mults=(1, 2), num_res_blocks=1,
                            attention_resolutions=(4,), attention_head_dim=8, norm_groups=4, sample_size=8)
    assert performance.is_convolutional(model) and not performance.is_convolutional(vf.create_model("dit_tiny", **DIT))
    assert performance.channels_last_format(model, "cpu") == torch.contiguous_format
    fmt = performance.configure_training(model, "cpu", gradient_checkpointing=True)
    assert fmt == torch.contiguous_format and model.grad_checkpointing
    if not torch.cuda.is_available():
        assert not performance.use_tf32() and not optim.use_fused()
        assert not optim.build_optimizer(model).defaults["fused"]


def test_train_unet_compiled_run_does_not_recompile_across_steps_or_after_resume(tmp_path, fresh_dynamo):
    train = load_script(TRAIN)
    common = ["--model", "dit_tiny", "--model_overrides", '{"depth": 2}', "--resolution", "8", "--train_batch_size", "4",
              "--max_train_steps", "10", "--checkpointing_steps", "1", "--lr_warmup_steps", "2", "--compile",
              "--compile_backend", "eager", "--gradient_checkpointing"]
    graphs = []
    for out, extra in (("a", ["--stop_after_steps", "1"]), ("b", ["--stop_after_steps", "3"]),
                       ("a", ["--stop_after_steps", "2", "--resume_from_checkpoint", "latest"])):
        torch._dynamo.reset()  # each run as in a new process
        counters.clear()
        train.main([*common, "--output_dir", str(tmp_path / out), *extra])
        graphs.append(compiled_graphs())
    assert graphs[0] >= 1 and graphs == [graphs[0]] * 3  # 3 steps compile what 1 step does; so does a resumed run
    assert_same_files(tmp_path / "a" / "checkpoint-3", tmp_path / "b" / "checkpoint-3")
    saved = vf.hub.load_state_dict(tmp_path / "a" / "checkpoint-3" / "model.safetensors")
    assert not any("_orig_mod" in k for k in saved)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_settings():
    model = vf.create_model("unet_tiny", in_channels=1, base_channels=32, sample_size=16).cuda()
    assert performance.use_tf32() and torch.backends.cuda.matmul.allow_tf32
    opt = optim.build_optimizer(model)
    assert opt.defaults["fused"]
    assert performance.channels_last_format(model, "cuda") == torch.channels_last
    ema = vf.training.EMA(model)
    x = torch.randn(4, 1, 16, 16, device="cuda").contiguous(memory_format=torch.channels_last)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(x, torch.tensor([1, 2, 3, 4], device="cuda")).float().square().mean()
    loss.backward()
    opt.step()
    ema.update(model)
    states = [s for st in opt.state.values() for s in st.values() if torch.is_tensor(s) and s.is_floating_point()]
    assert all(s.dtype == torch.float32 for s in states) and all(s.dtype == torch.float32 for s in ema.shadow)
