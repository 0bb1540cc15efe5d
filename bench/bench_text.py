"""Text models, ours vs transformers, same process, same weights (random, converted with from_hf).

1. GPT-2 124M greedy generation: 64 new tokens after a 16-token prompt, batch 1 -> tokens/s; on CPU ours after
   ``vf.native.optimize`` (the native decoding kernel), and two copies of ours: plain (no optimize) and
   ``optimize(kernels=False)`` (the layouts only: what a machine without the kernel gets), to show what each adds.
2. T5-small greedy generation: 32 new tokens after a 32-token input, batch 1 -> tokens/s (the same variants).
3. BERT-base forward: batch 8, length 128 -> sequences/s.
Median of --repeats interleaved runs after a warm-up; the ratio (> 1: ours is faster) is the median of the
per-round ratios, with its quartiles.

    python bench/bench_text.py [--device cuda] [--threads N] [--repeats 5]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import interleaved_times, ratio_text  # noqa: E402

from visionformers.native import kernel_available, optimize  # noqa: E402


def compare_generation(title: str, device: str, repeats: int, run_ref, ours: torch.nn.Module, generate,
                       new_tokens_of) -> tuple[float, float]:
    """Time transformers' ``run_ref()`` against ``generate(ours)`` in interleaved rounds; on CPU ``ours`` is
    optimized (``vf.native.optimize``) and two copies run beside it: plain, and with the layouts only.
    ``title`` gets {tokens} (``new_tokens_of`` the reference's first row) and {same} (every output equal)."""
    candidates = {"transformers": run_ref, "ours": lambda: generate(ours)}
    if device == "cpu":
        copies = {}
        for name in ("ours, plain", "ours, layouts only"):
            copies[name] = type(ours)(ours.config).eval()
            copies[name].load_state_dict(ours.state_dict())
        optimize(copies["ours, layouts only"], kernels=False)
        optimize(ours)
        for name, model in copies.items():
            candidates[name] = lambda model=model: generate(model)
    expected = run_ref()[0].tolist()
    same = all(run()[0].tolist() == expected for name, run in candidates.items() if name != "transformers")
    tokens = new_tokens_of(expected)
    times = interleaved_times(candidates, runs=repeats, warmup=1, device=device)
    rate = {name: tokens / statistics.median(t) for name, t in times.items()}
    print(title.format(tokens=tokens, same=same))
    print(f"  transformers {rate['transformers']:8.1f} tokens/s   ours {rate['ours']:8.1f} tokens/s   "
          f"ratio {ratio_text(times, 'transformers', 'ours')}")
    if device == "cpu":
        print(f"  native kernel built: {kernel_available()}")
        for name in ("ours, plain", "ours, layouts only"):
            print(f"  {name} {rate[name]:8.1f} tokens/s: {ratio_text(times, 'transformers', name)}; "
                  f"optimize over it: {ratio_text(times, name, 'ours')}")
    return statistics.median(times["transformers"]), statistics.median(times["ours"])


def bench_gpt2(device: str, repeats: int, prompt_len: int = 16, new_tokens: int = 64) -> tuple[float, float]:
    import transformers as hf

    from visionformers.convert.from_hf import config_from_hf, from_hf
    from visionformers.hub import load_into
    from visionformers.text import GPT

    cfg = hf.GPT2Config()  # 124M
    ref = hf.GPT2LMHeadModel(cfg).eval().to(device)
    ours = GPT(config_from_hf(cfg)).eval()
    load_into(ours, from_hf({k: v.cpu() for k, v in ref.state_dict().items()}))
    ours.to(device)
    ids = torch.randint(0, cfg.vocab_size, (1, prompt_len), device=device)

    def run_ref():
        # eos_token_id=None: no end-of-text stopping, exactly as ours (eos None). Forcing the length with
        # min_new_tokens instead would add two logits processors (a 50k-vocab isin + where per step) and an
        # EOS stopping check that only the reference pays.
        with torch.inference_mode():
            return ref.generate(
                ids, do_sample=False, max_new_tokens=new_tokens, eos_token_id=None, pad_token_id=cfg.eos_token_id
            )

    return compare_generation(
        f"GPT-2 124M greedy, {prompt_len}-token prompt + {{tokens}} new, batch 1 (same tokens: {{same}})",
        device, repeats, run_ref, ours, lambda model: model.generate(ids, new_tokens),
        lambda row: len(row) - prompt_len,
    )


def bench_t5(device: str, repeats: int, input_len: int = 32, new_tokens: int = 32) -> tuple[float, float]:
    import transformers as hf

    from visionformers.convert.from_hf import config_from_hf, from_hf
    from visionformers.hub import load_into
    from visionformers.text import T5

    cfg = hf.T5Config(decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)  # t5-small, 60M
    ref = hf.T5ForConditionalGeneration(cfg).eval().to(device)
    ours = T5(config_from_hf(cfg)).eval()
    load_into(ours, from_hf({k: v.cpu() for k, v in ref.state_dict().items()}))
    ours.to(device)
    ids = torch.randint(2, cfg.vocab_size, (1, input_len), device=device)

    def run_ref():  # both stop at the same EOS, if the random weights emit one: tokens/s counts what was made
        with torch.inference_mode():
            return ref.generate(ids, do_sample=False, max_new_tokens=new_tokens)

    return compare_generation(
        f"T5-small greedy, {input_len}-token input, {{tokens}} new tokens, batch 1 (same tokens: {{same}})",
        device, repeats, run_ref, ours, lambda model: model.generate(ids, new_tokens),
        lambda row: len(row) - 1,  # T5's output starts with the decoder start token
    )


def bench_bert(device: str, repeats: int, batch: int = 8, length: int = 128) -> tuple[float, float]:
    import transformers as hf

    from visionformers.convert.from_hf import config_from_hf, from_hf
    from visionformers.hub import load_into
    from visionformers.text import Bert

    cfg = hf.BertConfig()  # base
    ref = hf.BertModel(cfg).eval().to(device)
    ours = Bert(config_from_hf(cfg)).eval()
    load_into(ours, from_hf({k: v.cpu() for k, v in ref.state_dict().items()}))
    ours.to(device)
    ids = torch.randint(0, cfg.vocab_size, (batch, length), device=device)
    mask = torch.ones(batch, length, dtype=torch.long, device=device)

    def run_ref():
        with torch.inference_mode():
            return ref(ids, attention_mask=mask).last_hidden_state

    def run_ours():
        with torch.inference_mode():
            return ours(ids, mask)[0]

    diff = (run_ref() - run_ours()).abs().max().item()
    times = interleaved_times({"transformers": run_ref, "ours": run_ours}, runs=repeats, warmup=1, device=device)
    t_ref, t_ours = (statistics.median(times[k]) for k in ("transformers", "ours"))
    print(f"BERT-base forward, batch {batch} x {length} tokens (max abs diff {diff:.1e})")
    print(f"  transformers {batch / t_ref:8.1f} seq/s      ours {batch / t_ours:8.1f} seq/s      "
          f"ratio {ratio_text(times, 'transformers', 'ours')}")
    return t_ref, t_ours


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}, fp32")
    bench_gpt2(args.device, args.repeats)
    bench_t5(args.device, args.repeats)
    bench_bert(args.device, args.repeats)


if __name__ == "__main__":
    main()
