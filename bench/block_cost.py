"""What skipping one block costs, per step type: the floor under any skip differential.

For each block i of the frozen base model, the target-token NLL (nats per token) with block i
skipped minus the NLL with every block on, averaged over N training-split steps of each type
(batch 1, so no padding; steps cut to --max-len as train.py does). A router that lets the LM loss
decide closes a block for a type only where this cost is below the regulariser's price, about
lambda / n_blocks per token; the sum over the blocks it closes is roughly the perplexity it pays.

    python bench/block_cost.py --model ~/.cache/layerroute/smollm2-135m-qwen2 --data-dir ../shared/data --n 12
"""
import argparse
import os
import random
import sys

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import data  # noqa: E402
import qwen  # noqa: E402


@torch.no_grad()
def target_nll(model: qwen.Qwen2, prompt: list[int], target: list[int], skip: int | None) -> float:
    """Mean NLL of the target tokens with block `skip` passed over (None: every block runs)."""
    ids = torch.tensor([prompt + target])
    h = model.embed_tokens(ids)
    cos, sin = model.rope(0, ids.shape[1], ids.device, h.dtype)
    for i, block in enumerate(model.layers):
        if i != skip:
            h = block(h, cos, sin)
    logits = model.lm_head(model.norm(h))[0, len(prompt) - 1:-1]  # position t predicts token t + 1
    return F.cross_entropy(logits.float(), torch.tensor(target)).item()


def main():
    p = argparse.ArgumentParser(description="Per-block cost of skipping, per step type (nats per target token).")
    p.add_argument("--model", required=True, help="checkpoint folder")
    p.add_argument("--data-dir", required=True, help="local data folder (e.g. ../shared/data)")
    p.add_argument("--n", type=int, default=12, help="training-split steps per type")
    p.add_argument("--max-len", type=int, default=256, help="tokens per step, oldest prompt tokens cut")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = qwen.load_model(args.model).eval(), qwen.load_tokenizer(args.model)
    steps, _ = data.load_steps(args.data_dir)
    L = model.cfg.num_hidden_layers
    for kind in data.KINDS:
        chosen = sorted((s for s in steps if s.kind == kind and s.split == "train"), key=lambda s: s.id)
        random.Random(0).shuffle(chosen)
        pts = [data.truncate(*data.encode(s, tok), args.max_len) for s in chosen[:args.n]]
        if not pts:
            continue
        full = np.array([target_nll(model, pr, t, None) for pr, t in pts])
        cost = np.array([[target_nll(model, pr, t, i) for pr, t in pts] for i in range(L)]).mean(1) - full.mean()
        cheap = np.argsort(cost)
        print(f"{kind}: {len(pts)} steps, NLL {full.mean():.3f} nats/token, {np.mean([len(t) for _, t in pts]):.0f} target tokens")
        print("  cost per block: " + " ".join(f"{c:.2f}" for c in cost))
        for k in (3, round(0.2 * L)):
            print(f"  the {k} cheapest blocks {sorted(cheap[:k].tolist())}: sum {cost[cheap[:k]].sum():.3f} nats/token "
                  f"(perplexity x{np.exp(cost[cheap[:k]].sum()):.2f} if costs added)", flush=True)


if __name__ == "__main__":
    main()
