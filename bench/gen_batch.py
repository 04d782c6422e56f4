"""eval.py's greedy answers, batched over prompts of different lengths (left-padded) against one at a time.

The same prompts (GSM8K test questions from --data-dir, as eval.py renders them) go through
eval.greedy_answers at --batch and at 1, stop tokens included, interleaved in one process so that
machine noise hits both alike: seconds for all the prompts each way (median over repeats), the
ratio, and how many of the answers are the same text. --model: the checkpoint with every block on;
--run: a trained run, routed (its gates decided per prompt at prefill).

    python bench/gen_batch.py --model DIR --data-dir DATA --n 32 --new-tokens 64 --threads 1
"""
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import data  # noqa: E402
import eval as eval_  # noqa: E402
import layerroute as lr  # noqa: E402
import qwen  # noqa: E402


def load(args):
    """(model in the mode measured, tokenizer): --run routed, --model every block on, LoRA off."""
    if args.run:
        model, tok, _ = lr.load_run(args.run)
        return model, tok, "routed"
    return lr.LayerRoute(qwen.load_model(args.model)).eval(), qwen.load_tokenizer(args.model), "base"


def main():
    p = qwen.Parser(description=__doc__.split("\n")[0])
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", help="checkpoint folder: every block on")
    which.add_argument("--run", help="a run folder written by train.py: routed")
    p.add_argument("--data-dir", required=True, help="a folder with GSM8K's test.jsonl")
    p.add_argument("--n", type=qwen.number(int, lo=1), default=32, help="prompts")
    p.add_argument("--new-tokens", type=qwen.number(int, lo=1), default=64, help="max new tokens per prompt")
    p.add_argument("--batch", type=qwen.number(int, lo=2), default=eval_.GEN_BATCH, help="prompts per batch")
    p.add_argument("--repeats", type=qwen.number(int, lo=1), default=2, help="timed rounds of both")
    p.add_argument("--threads", type=qwen.number(int, lo=1), help="CPU threads for torch (default: torch's)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok, name = load(args)
    steps = eval_.pick(data.load_steps(args.data_dir)[0], "test", args.n, seed=0).get("planning", [])
    items = [(data.encode(s, tok)[0], "planning", s.answer) for s in steps]
    lengths = sorted(len(p) for p, _, _ in items)
    print(f"{len(items)} prompts of {lengths[0]}-{lengths[-1]} tokens, {args.new_tokens} new at most, "
          f"{name}, {torch.get_num_threads()} threads", flush=True)
    seconds, texts = {1: [], args.batch: []}, {}
    with torch.no_grad(), eval_.mode(model, name):
        for r in range(args.repeats):
            for b in ((1, args.batch) if r % 2 == 0 else (args.batch, 1)):
                t = time.perf_counter()
                texts[b] = eval_.greedy_answers(model, tok, items, args.new_tokens, gen_batch=b)[1]
                seconds[b].append(time.perf_counter() - t)
                print(f"  round {r}, batch {b}: {seconds[b][-1]:.1f} s", flush=True)
    one, many = statistics.median(seconds[1]), statistics.median(seconds[args.batch])
    same = sum(a == b for a, b in zip(texts[1], texts[args.batch]))
    print(f"batch 1 {one:.1f} s, batch {args.batch} {many:.1f} s: {one / many:.2f}x faster; "
          f"{same} of {len(items)} answers the same text")


if __name__ == "__main__":
    qwen.cli(main)
