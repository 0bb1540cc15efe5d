"""Teach the encoder-decoder Transformer to write numbers in English: "1204" -> "one thousand two hundred four".

Numbers 0..9999 are split at random into training and held-out sets; the model never sees a held-out
number, so exact match on them measures whether it learned the rules (digits, teens, tens, zeros).
A byte-level BPE trained on the target sentences turns words into a few tokens each (digits stay
single bytes); ``--tokenizer byte`` spells everything character by character instead (slower).

    python examples/seq2seq_numbers.py                          # >= 95% exact match on held-out numbers (100% measured), ~45 s on 2 cores
    python examples/seq2seq_numbers.py --pos_embedding alibi    # any positional scheme of the model
"""
from __future__ import annotations

import argparse
import random
import time

import torch
import torch.nn.functional as F

from visionformers.registry import create_model
from visionformers.text.seq2seq import POSITIONAL_SCHEMES
from visionformers.text import BPETokenizer, ByteTokenizer, Tokenizer
from visionformers.training import build_lr_scheduler, build_optimizer

ONES = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen seventeen eighteen nineteen".split()
TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def number_to_words(n: int) -> str:
    """0 <= n < 1e6 in American English without "and": 1204 -> "one thousand two hundred four"."""
    if n < 20:
        return ONES[n]
    if n < 100:
        return TENS[n // 10] + ("" if n % 10 == 0 else " " + ONES[n % 10])
    if n < 1000:
        return ONES[n // 100] + " hundred" + ("" if n % 100 == 0 else " " + number_to_words(n % 100))
    return number_to_words(n // 1000) + " thousand" + ("" if n % 1000 == 0 else " " + number_to_words(n % 1000))


def make_splits(max_number: int, num_test: int, seed: int) -> tuple[list[int], list[int]]:
    numbers = list(range(max_number))
    random.Random(seed).shuffle(numbers)
    return numbers[num_test:], numbers[:num_test]


def batch_tensors(tok: Tokenizer, numbers: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> source ids (B, M), source mask (B, M), target ids (B, N) as <bos> words <eos> <pad>..."""
    src = tok([str(n) for n in numbers])
    tgt = tok([number_to_words(n) for n in numbers])
    return src["input_ids"], src["attention_mask"], tgt["input_ids"]


@torch.no_grad()
def exact_match(model, tok: Tokenizer, numbers: list[int], batch_size: int = 500, max_new_tokens: int = 64) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(numbers), batch_size):
        chunk = numbers[i : i + batch_size]
        src, mask, _ = batch_tensors(tok, chunk)
        out = model.generate(src, max_new_tokens, attention_mask=mask, eos_token_id=tok.eos_token_id)
        correct += sum(tok.decode(row).strip() == number_to_words(n) for row, n in zip(out, chunk))
    model.train()
    return correct / len(numbers)


def run(args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    train_numbers, test_numbers = make_splits(args.max_number, args.num_test, args.seed)
    if args.tokenizer == "bpe":  # learned from the training targets only
        tok = BPETokenizer.train([number_to_words(n) for n in train_numbers], vocab_size=args.vocab_size, min_frequency=1)
    else:
        tok = ByteTokenizer()
    model = create_model(
        "transformer_tiny", vocab_size=tok.vocab_size, dim=args.dim, num_heads=args.heads, encoder_depth=args.depth,
        decoder_depth=args.depth, mlp_hidden_dim=4 * args.dim, pos_embedding=args.pos_embedding, pre_norm=True,
        # N(0, 0.02) embeddings would drown under a sinusoidal table of norm ~sqrt(dim/2): scale them (sec. 3.4)
        init="normal_0.02", scale_embeddings=args.pos_embedding == "sinusoidal", dropout=0.0, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )
    optimizer = build_optimizer(model, "adamw", args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    scheduler = build_lr_scheduler(optimizer, "cosine", warmup_steps=min(100, args.steps // 10), total_steps=args.steps)
    rng = random.Random(args.seed)
    start = time.perf_counter()
    first_loss = None
    for step in range(args.steps):
        src, mask, tgt = batch_tensors(tok, rng.sample(train_numbers, args.batch_size))
        logits = model(src, tgt[:, :-1], attention_mask=mask)  # teacher forcing: predict token t + 1 from <= t
        labels = tgt[:, 1:].masked_fill(tgt[:, 1:] == tok.pad_token_id, -100)
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
        first_loss = loss.item() if first_loss is None else first_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        if args.log_every and (step % args.log_every == 0 or step == args.steps - 1):
            print(f"step {step:5d}  loss {loss.item():.4f}  {time.perf_counter() - start:6.1f}s", flush=True)
    train_seconds = time.perf_counter() - start
    accuracy = exact_match(model, tok, test_numbers)
    src, mask, _ = batch_tensors(tok, test_numbers[:5])
    samples = [tok.decode(r).strip() for r in model.generate(src, 64, attention_mask=mask, eos_token_id=tok.eos_token_id)]
    for n, s in zip(test_numbers[:5], samples):
        print(f"  {n:>5} -> {s}")
    print(f"held-out exact match {accuracy:.2%} on {len(test_numbers)} numbers; training {train_seconds:.0f}s "
          f"({args.steps} steps, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters)")
    return {"accuracy": accuracy, "train_seconds": train_seconds, "first_loss": first_loss, "loss": loss.item(), "samples": samples}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--max_number", type=int, default=10000, help="numbers 0..max_number-1")
    p.add_argument("--num_test", type=int, default=1000, help="held-out numbers")
    p.add_argument("--tokenizer", choices=["bpe", "byte"], default="bpe", help="tokenizer learned from the data, or bytes")
    p.add_argument("--vocab_size", type=int, default=320, help="BPE vocabulary (bytes + specials + merges)")
    p.add_argument("--pos_embedding", default="rope", choices=POSITIONAL_SCHEMES, help="position encoding")
    p.add_argument("--dim", type=int, default=128, help="model width")
    p.add_argument("--heads", type=int, default=4, help="attention heads")
    p.add_argument("--depth", type=int, default=2, help="encoder and decoder layers each")
    p.add_argument("--steps", type=int, default=600, help="training steps")
    p.add_argument("--batch_size", type=int, default=64, help="sequences per step")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    p.add_argument("--seed", type=int, default=0, help="seed of data and weights")
    p.add_argument("--log_every", type=int, default=100, help="print the loss every N steps (0: never)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    return run(parse_args(argv))


if __name__ == "__main__":
    main()
