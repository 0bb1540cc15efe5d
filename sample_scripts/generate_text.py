"""Generate text with a model saved by train_scripts/train_lm.py (config.json + model.safetensors + tokenizer.json).

    python sample_scripts/generate_text.py outputs/lm --prompt "Once upon a time" --max_new_tokens 200 --top_p 0.9
"""
from __future__ import annotations

import argparse
import os

import torch

import visionformers as vf
from visionformers._validate import HelpFormatter, check_args, check_device, script_errors
from visionformers.text import load_tokenizer

try:  # the optional CPU kernels (visionformers/native): without them sampling runs the plain models
    from visionformers.native import optimize
except ImportError:
    optimize = None


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    a = p.add_argument
    a("model_dir", help="a directory written by train_lm.py (or save_pretrained + tokenizer.save)")
    a("--prompt", default="\n", help="text the samples continue")
    a("--max_new_tokens", type=int, default=200, help="capped by the model's context length")
    a("--greedy", action="store_true", help="argmax decoding instead of sampling")
    a("--temperature", type=float, default=0.8, help="softmax temperature of sampling (> 0)")
    a("--top_k", type=int, default=None, help="sample from the k most likely tokens (default: all)")
    a("--top_p", type=float, default=None, help="nucleus sampling: the smallest set of tokens with this mass (default: off)")
    a("--num_samples", type=int, default=1, help="samples to print")
    a("--stop_at_eos", action="store_true", help="stop a sample at the tokenizer's <eos>")
    a("--seed", type=int, default=0, help="seed of the sampling generator")
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device to run on")
    args = p.parse_args(argv)
    check_args(args, [
        ("max_new_tokens", lambda v: v >= 0, "an int >= 0"),
        ("temperature", lambda v: v > 0 or args.greedy, "a number > 0 (or --greedy)"),
        ("top_k", lambda v: v is None or v >= 1, "an int >= 1"),
        ("top_p", lambda v: v is None or 0 < v <= 1, "a number in (0, 1]"),
        ("num_samples", lambda v: v >= 1, "an int >= 1")])
    check_device("--device", args.device)
    return args


def main(argv=None) -> list[str]:
    args = parse_args(argv)
    if not os.path.isdir(args.model_dir):
        raise FileNotFoundError(f"model_dir={args.model_dir!r} is not a directory; expected one written by train_lm.py")
    tok = load_tokenizer(args.model_dir)
    model = vf.from_pretrained(args.model_dir).to(args.device).eval()
    if args.device == "cpu" and optimize is not None:
        optimize(model)  # the decoding kernel and layouts; values unchanged up to rounding
    if not hasattr(model, "generate") or not hasattr(model.config, "max_len"):
        raise ValueError(f"model_dir={args.model_dir!r} holds a {type(model).__name__}; expected a GPT saved by train_lm.py")
    if not args.prompt:
        raise ValueError("--prompt='' is not accepted; expected at least one character to continue")
    ids = torch.tensor([tok.encode(args.prompt, add_special_tokens=False)] * args.num_samples, device=args.device)
    room = model.config.max_len - ids.shape[1]
    if room <= 0:
        raise ValueError(f"--prompt has {ids.shape[1]} tokens; expected fewer than the model's max_len={model.config.max_len}")
    out = model.generate(
        ids, min(args.max_new_tokens, room), temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        do_sample=not args.greedy, eos_token_id=tok.eos_token_id if args.stop_at_eos else None,
        generator=torch.Generator(args.device).manual_seed(args.seed),
    )
    texts = tok.batch_decode(out)
    for i, text in enumerate(texts):
        print(f"--- sample {i} ---\n{text}")
    return texts


if __name__ == "__main__":
    script_errors(main)()  # main returns a value for Python callers; not an exit status
