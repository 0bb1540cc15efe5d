"""Train a small GPT on a text file: `python train_scripts/train_lm.py corpus.txt` or `accelerate launch ...`.

The text is tokenized once (byte-level by default; --tokenizer bpe learns a BPE from the file), random
windows of --block_size tokens are the training examples, and the model, its config and the tokenizer
are saved to --output_dir for sample_scripts/generate_text.py.
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
from accelerate import Accelerator

import visionformers as vf
from visionformers._validate import check_args, script_errors
from visionformers.text import BPETokenizer, ByteTokenizer
from visionformers.training import callbacks as cb
from visionformers.training import build_lr_scheduler, build_optimizer, make_generator, seed_everything
from visionformers.training.pipeline import default_mixed_precision, force_cpu, json_config_fields
from visionformers.training.run_dir import open_run

METRICS = {"val_loss": "min"}  # what each evaluation reports (early stopping's choices)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("text_file", help="a UTF-8 text file to learn from")
    a("--output_dir", default="outputs/lm", help="model, config and tokenizer (locked while the run uses it)")
    a("--overwrite_output_dir", action="store_true", help="start a new run in an --output_dir holding another run")
    a("--model", default="gpt_tiny", help="a GPT preset (vf.list_models('gpt*'))")
    a("--model_overrides", type=json_config_fields, default={}, help='JSON of config fields, e.g. \'{"depth": 4}\'')
    a("--tokenizer", default="byte", choices=["byte", "bpe"], help="byte-level, or a BPE learned from text_file")
    a("--vocab_size", type=int, default=2048, help="BPE vocabulary size (--tokenizer bpe)")
    a("--block_size", type=int, default=128, help="tokens per training window")
    a("--train_batch_size", type=int, default=32, help="per process")
    a("--max_train_steps", type=int, default=2000, help="optimizer steps (sets the lr schedule)")
    a("--learning_rate", type=float, default=1e-3, help="peak AdamW learning rate")
    a("--lr_warmup_steps", type=int, default=100, help="linear warm-up steps")
    a("--weight_decay", type=float, default=0.1, help="AdamW weight decay")
    a("--max_grad_norm", type=float, default=1.0, help="gradient clipping norm (0: off)")
    a("--val_fraction", type=float, default=0.05, help="the end of the file, held out for validation loss")
    a("--eval_steps", type=int, default=200, help="validation loss every N steps")
    a("--mixed_precision", default=None, choices=["no", "fp16", "bf16"], help="default: bf16 if supported")
    a("--seed", type=int, default=0, help="seed of weights and training windows")
    a("--sample_prompt", default="\n", help="prompt of the sample printed at the end")
    a("--sample_tokens", type=int, default=200, help="length of the sample printed at the end")
    cb.add_early_stopping_arguments(p, METRICS, default="val_loss")
    args = p.parse_args(argv)
    check_args(args, [(name, lambda v: v >= 1, "an int >= 1") for name in (
        "block_size", "train_batch_size", "max_train_steps", "eval_steps")] + [
        ("learning_rate", lambda v: v > 0, "a number > 0"),
        ("val_fraction", lambda v: 0 <= v < 1, "a fraction in [0, 1)"),
        ("sample_tokens", lambda v: v >= 0, "an int >= 0"),
        ("model", lambda v: v in vf.list_models("gpt*"), f"a GPT preset: {vf.list_models('gpt*')}"),
        ("output_dir", lambda v: not Path(v).is_file(), "a directory (this path is an existing file)")])
    return args


def random_windows(data: torch.Tensor, block_size: int, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """(batch_size, block_size) windows starting at random offsets of the token stream."""
    starts = torch.randint(0, len(data) - block_size + 1, (batch_size,), generator=generator)
    return torch.stack([data[s : s + block_size] for s in starts.tolist()])


@torch.no_grad()
def validation_loss(model, data: torch.Tensor, block_size: int, device, max_windows: int = 64) -> float:
    """Mean loss over up to ``max_windows`` consecutive windows of the held-out tokens."""
    n = min(max_windows, len(data) // block_size)
    if n == 0:
        return float("nan")
    windows = data[: n * block_size].view(n, block_size).to(device)  # (n, block_size)
    model.eval()
    loss = sum(model(w[None], labels=w[None]).loss.item() for w in windows) / n
    model.train()
    return loss


def main(argv=None) -> Path:
    args = parse_args(argv)
    accelerator = Accelerator(cpu=force_cpu(), mixed_precision=args.mixed_precision or default_mixed_precision())
    seed_everything(args.seed)  # the same initial weights on every process
    path = Path(args.text_file)
    if not path.is_file():
        raise FileNotFoundError(f"text_file={str(path)!r} does not exist")
    run = open_run(args.output_dir, vars(args), overwrite=args.overwrite_output_dir, accelerator=accelerator)
    text = path.read_text(encoding="utf-8")
    tok = BPETokenizer.train(path, vocab_size=args.vocab_size) if args.tokenizer == "bpe" else ByteTokenizer()
    data = torch.tensor(tok.encode(text, add_special_tokens=False), dtype=torch.long)
    n_val = int(len(data) * args.val_fraction)
    train_data, val_data = data[: len(data) - n_val], data[len(data) - n_val :]
    if len(train_data) < args.block_size + 1:
        raise ValueError(f"text_file={str(path)!r} holds {len(train_data)} training tokens; --block_size={args.block_size} needs more")

    overrides = {"vocab_size": tok.vocab_size, "eos_token_id": tok.eos_token_id, **args.model_overrides}
    stopper = cb.early_stopping_from_args(args, METRICS)
    model = vf.create_model(args.model, **overrides)
    if args.block_size > model.config.max_len:
        raise ValueError(f"--block_size={args.block_size} exceeds the model's max_len={model.config.max_len}")
    optimizer = build_optimizer(model, "adamw", args.learning_rate, args.weight_decay, betas=(0.9, 0.95))
    scheduler = build_lr_scheduler(optimizer, "cosine", args.lr_warmup_steps, args.max_train_steps, min_ratio=0.1)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    generator = make_generator(args.seed, accelerator.process_index)  # each process draws its own windows
    accelerator.print(f"{len(train_data)} training tokens, {len(val_data)} held out; "
                      f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters; {accelerator.num_processes} process(es)")

    callbacks = cb.CallbackList([stopper, cb.LrThroughputLogger(samples_per_step=args.train_batch_size
                                                                * accelerator.num_processes)])
    state = cb.LoopState(model=model, accelerator=accelerator)
    callbacks.on_train_begin(state)
    start = time.perf_counter()
    for step in range(1, args.max_train_steps + 1):
        batch = random_windows(train_data, args.block_size, args.train_batch_size, generator).to(accelerator.device)
        with accelerator.autocast():
            loss = model(batch, labels=batch).loss  # next-token cross-entropy
        accelerator.backward(loss)
        if args.max_grad_norm > 0:
            accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state.step = step
        callbacks.on_step_end(state, {"loss": loss.detach(), "lr": scheduler.get_last_lr()[0]})
        if step % args.eval_steps == 0 or step == args.max_train_steps:
            val = validation_loss(accelerator.unwrap_model(model), val_data, args.block_size, accelerator.device)
            accelerator.print(f"step {step:6d}  train loss {loss.item():.4f}  val loss {val:.4f} "
                              f"(ppl {math.exp(min(val, 20)):.1f})  {time.perf_counter() - start:.0f}s")
            callbacks.on_evaluate(state, {"val_loss": val})
        if state.should_stop:
            accelerator.print(state.stop_reason)
            break
    callbacks.on_train_end(state)

    accelerator.wait_for_everyone()
    out = Path(args.output_dir)
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model).eval()
        vf.save_pretrained(unwrapped, out)
        tok.save(out)
        prompt = torch.tensor([tok.encode(args.sample_prompt, add_special_tokens=False) or [tok.bos_token_id]],
                              device=accelerator.device)
        room = unwrapped.config.max_len - prompt.shape[1]
        sample = unwrapped.generate(prompt, min(args.sample_tokens, room), do_sample=True, temperature=0.8, top_k=50,
                                    generator=torch.Generator(accelerator.device).manual_seed(args.seed))
        print(f"saved to {out}\n--- sample ---\n{tok.decode(sample[0])}")
    accelerator.end_training()
    run.close()
    return out


if __name__ == "__main__":
    script_errors(main)()  # main returns a value for Python callers; not an exit status
