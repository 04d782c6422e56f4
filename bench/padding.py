"""Padding waste over one training epoch: our length-grouped batches vs everything padded to 512.

Walks one epoch of exactly the batches train.py consumes (data.batches, paper settings: batch 4,
max_len 512, tool_fraction 0.5, seed 0) and counts, over all computed positions (B x T per batch):
padding, real tokens, and target tokens (the only positions whose logits the loss uses). data.py's
own summary (`python data.py --data-dir ...`) prints the same padding figure from its epoch plan;
this counts it from the collated batches themselves.

DATA: a folder of data files; TOKENIZER.json: Qwen2.5's tokenizer.json.

    python bench/padding.py --data-dir DATA --tokenizer TOKENIZER.json
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import data  # noqa: E402
import qwen  # noqa: E402


def main():
    p = argparse.ArgumentParser(description="Fraction of computed tokens that are padding, one training epoch.")
    p.add_argument("--data-dir", required=True, help="local data folder (data.py reads every file under it)")
    p.add_argument("--tokenizer", required=True, help="Qwen tokenizer.json")
    p.add_argument("--batch-size", type=int, default=4, help="sequences per micro-batch (paper: 4)")
    p.add_argument("--max-len", type=int, default=512, help="tokens per sequence at most (paper: 512)")
    p.add_argument("--tool-fraction", type=float, default=0.5, help="as train.py's flag (<0: natural mix)")
    p.add_argument("--seed", type=int, default=0, help="data-order seed")
    args = p.parse_args()
    tok = qwen.load_tokenizer(args.tokenizer)
    steps = data.fitting(data.load_steps(args.data_dir)[0], tok, args.max_len)[0]  # as train.py drops
    train = [s for s in steps if s.split == "train"]
    encoded = data.encode_all(train, tok)
    pad = data.pad_id(tok)
    frac = None if args.tool_fraction < 0 else args.tool_fraction
    stream = data.batches(encoded, args.batch_size, args.max_len, pad, args.seed, frac)
    n_batches = -(-len(encoded) // args.batch_size)  # one epoch, as data.batches defines it
    rows = computed = real = target = 0
    for _ in range(n_batches):
        b = next(stream)
        B, T = b.ids.shape
        rows, computed = rows + B, computed + B * T
        real += int(b.prompt_lens.sum()) + b.n_target  # a row is prompt + target, then padding
        target += b.n_target
    fixed = rows * args.max_len
    print(f"one epoch: {n_batches} batches of {args.batch_size} ({rows} rows), max_len {args.max_len}, "
          f"tool_fraction {args.tool_fraction}, seed {args.seed}")
    print(f"real tokens {real:,}, of which target (scored) {target:,} ({target / real:.1%})")
    print(f"length-grouped, padded to each batch's longest: {computed:,} computed, "
          f"padding {1 - real / computed:.1%}")
    print(f"everything padded to {args.max_len} (the reference): {fixed:,} computed, padding {1 - real / fixed:.1%}")
    print(f"computed tokens, grouped / padded-to-{args.max_len}: {computed / fixed:.3f}")
    print(f"LM-head positions the loss uses: {target / computed:.1%} of grouped computed positions")


if __name__ == "__main__":
    main()
