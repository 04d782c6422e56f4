"""Which Qwen2.5 fits one GPU for this training, by count: train.py's memory estimate for each size.

    python bench/memory.py                      # the paper batch (16 x 512), bf16 backbone, both recipes
    python bench/memory.py --gib 141 --batch-size 16 --max-len 512

Builds each model on the meta device (no memory, no download) from its public shapes, wraps it as
train.py does, and prints backbone, trainable state and activations in GiB, with and without
--checkpoint-blocks, and whether the total fits in --gib. The activation count is train.py's rough
one (an upper bound: the LM head counted at every token); bench/gpu_speed.py measures the real peak.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import qwen  # noqa: E402
import train  # noqa: E402

# Qwen2.5 (Instruct) shapes from their config.json: hidden, intermediate, layers, heads, kv heads, vocab, tied
SIZES = {"0.5B": (896, 4864, 24, 14, 2, 151936, True), "1.5B": (1536, 8960, 28, 12, 2, 151936, True),
         "3B": (2048, 11008, 36, 16, 2, 151936, True), "7B": (3584, 18944, 28, 28, 4, 152064, False),
         "14B": (5120, 13824, 48, 40, 8, 152064, False), "32B": (5120, 27648, 64, 40, 8, 152064, False),
         "72B": (8192, 29568, 80, 64, 8, 152064, False)}


def config(size: str) -> qwen.QwenConfig:
    d, f, L, h, kv, vocab, tied = SIZES[size]
    return qwen.QwenConfig(hidden_size=d, intermediate_size=f, num_hidden_layers=L, num_attention_heads=h,
                           num_key_value_heads=kv, vocab_size=vocab, tie_word_embeddings=tied, rope_theta=1e6)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gib", type=float, default=141.0, help="GPU memory (H200: 141 GiB; H100: 80)")
    p.add_argument("--batch-size", default="16")
    p.add_argument("--max-len", default="512")
    args = p.parse_args()
    print(f"rows {args.batch_size} x {args.max_len} tokens, bf16 backbone, float32 LoRA and routers + AdamW; GiB")
    print(f"{'model':6} {'recipe':10} {'params':>8} {'backbone':>9} {'trainable':>10} {'activations':>12} "
          f"{'total':>8} {'checkpointed':>13}  fits {args.gib:g} GiB")
    for size in SIZES:
        for recipe in ("layerroute", "paper"):
            row = {}
            for ckpt in (False, True):
                a = train.parse_args(["--recipe", recipe, "--batch-size", args.batch_size, "--max-len", args.max_len,
                                      "--device", "cuda"] + (["--checkpoint-blocks"] if ckpt else []))
                with torch.device("meta"):  # LayerRoute wraps its base in place: a fresh one each time
                    base = qwen.Qwen2(config(size)).to(torch.bfloat16)
                    model = train.wrap(base, a)
                row[ckpt] = train.memory_use(model, a, torch.bfloat16)
            gib = {k: row[False][k] / 2 ** 30 for k in ("backbone", "trainable", "activations", "total")}
            fits = ("yes" if row[False]["total"] / 2 ** 30 <= args.gib else
                    "checkpointed" if row[True]["total"] / 2 ** 30 <= args.gib else "no")
            n = sum(q.numel() for q in base.parameters() if not q.requires_grad) / 1e9  # the backbone
            print(f"{size:6} {recipe:10} {n:7.2f}B {gib['backbone']:9.1f} {gib['trainable']:10.1f} "
                  f"{gib['activations']:12.1f} {gib['total']:8.1f} {row[True]['total'] / 2 ** 30:13.1f}  {fits}")


if __name__ == "__main__":
    main()
