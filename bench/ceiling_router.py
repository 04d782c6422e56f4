"""Can a router read from the prompt which blocks a tool call can skip and stay right?

bench/block_cost.py --ceiling --split train --out LABELS finds, per training tool call that a run's
LoRA-only model writes right, blocks it can close and stay right, chosen knowing its answer. Here one
router per block (the model's own kind: a linear score of what router_score reads, the block's
input_layernorm of the stream averaged over the prompt, unit length) is fitted to those labels, by
logistic regression with an L2 penalty picked by cross-validation on the training rows (its held-out
loss printed beside that of a router that reads the step type alone); training planning steps teach
it to keep every block on. It then routes the test split's tool calls and planning steps block by
block, each router reading the stream as routed so far, and counts per threshold the tool calls it
breaks and fixes against the same model with every block on
(teacher-forced argmax at every target token, which is greedy exact match) and the FLOPs each type
skips (LM head counted). Printed beside it, measured the same way: the run's trained routers, and
one set closed on every tool call and none on planning (a router that knows only the step type), the
blocks the labels close most often. --read last fits routers that read the prompt's last token
instead, a reading the model's routers do not have.

    python bench/ceiling_router.py --run runs/layerroute --data-dir DATA --labels LABELS.json
"""
import argparse
import json
import os
import sys

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path[:0] = [os.path.join(os.path.dirname(__file__), ".."), os.path.dirname(__file__)]
import data  # noqa: E402
import eval as eval_  # noqa: E402
import layerroute as lr  # noqa: E402
from block_cost import answers, embed, margins  # noqa: E402

THRESHOLDS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7)  # a gate opens above this: lower closes only what a router is surer of
SHARES = (0.75, 0.5, 0.4, 0.3, 0.2)  # the type router closes the blocks closed on at least this share of labels
PENALTIES = (1e-2, 1e-1, 1.0, 10.0, 100.0)  # L2 weight per row, the one with the best held-out loss is used
FOLDS = 5
READS = ("prompt", "last")


def read_labels(path: str) -> dict[str, list[int]]:
    """Per tool-call id, the blocks closed on it in a block_cost.py --ceiling --out file (right calls only)."""
    try:
        with open(path) as f:
            calls = json.load(f)["calls"]
        return {c["id"]: list(c["closed"]) for c in calls if c["right"]}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"{path}: not a block_cost.py --ceiling --out file ({type(e).__name__}: {e})")


def reading(norm: nn.Module, x: torch.Tensor, prompt_len: int, read: str) -> torch.Tensor:
    """What a router reads of one row's stream x (1, d): "prompt", the model's own (norm(x) averaged over
    the prompt, lr.pooled_prompt); "last", norm(x) at the prompt's last token, where the model is about
    to answer, unit length (a reading the model's routers do not have)."""
    if read == "last":
        return F.normalize(norm(x[:, prompt_len - 1]).float(), dim=-1)
    return lr.pooled_prompt(norm, x, torch.tensor([prompt_len]))


@torch.no_grad()
def features(model, prompt: list[int], target: list[int], closed, read: str = "prompt") -> torch.Tensor:
    """What each block's router reads (L, d) when the blocks in `closed` are skipped."""
    x, cos, sin = embed(model, prompt, target)
    out = []
    for i, block in enumerate(model.layers):
        out.append(reading(block.input_layernorm, x, len(prompt), read)[0])
        if i not in closed:
            x = block(x, cos, sin)
    return torch.stack(out)


def fit_one(x: torch.Tensor, y: torch.Tensor, penalty: float) -> nn.Linear:
    """Logistic regression of y (n,) 1 = open on x (n, d): mean BCE + penalty * |w|^2 / 2, by L-BFGS, on
    x standardised per feature, then folded back into the router's weight and bias. Pooled prompts share
    most of their direction; standardised, the penalty weighs what tells them apart."""
    mean, std = x.mean(0), x.std(0).clamp(min=1e-6)
    z = (x - mean) / std
    router = nn.Linear(x.shape[1], 1)
    nn.init.zeros_(router.weight)
    nn.init.zeros_(router.bias)
    opt = torch.optim.LBFGS(router.parameters(), max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = (F.binary_cross_entropy_with_logits(router(z)[:, 0], y)
                + penalty / 2 * router.weight.pow(2).sum())
        loss.backward()
        return loss

    opt.step(closure)
    router.requires_grad_(False)
    router.bias -= router.weight[0] @ (mean / std)  # w . (x - mean) / std + b, as w' . x + b'
    router.weight /= std
    return router


def held_out_loss(x: torch.Tensor, y: torch.Tensor, penalty: float) -> float:
    """Mean BCE over FOLDS folds of the rows, each scored by a router fitted on the others."""
    folds = torch.arange(len(y)) % FOLDS
    losses = [F.binary_cross_entropy_with_logits(fit_one(x[folds != k], y[folds != k], penalty)(x[folds == k])[:, 0],
                                                 y[folds == k], reduction="sum").item() for k in range(FOLDS)]
    return sum(losses) / len(y)


def fit_routers(x: torch.Tensor, y: torch.Tensor, is_call: torch.Tensor) -> tuple[list[nn.Linear], float]:
    """One router per block from x (n, L, d) and y (n, L), 1 = open; the penalty with the lowest
    held-out loss summed over blocks, printed beside that of a router that reads the step type alone
    (is_call (n,): 1 for a tool call). Rows are in a seeded shuffle, so each fold mixes the kinds."""
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y, is_call = x[order], y[order], is_call[order, None]
    scores = {pen: sum(held_out_loss(x[:, i], y[:, i], pen) for i in range(y.shape[1])) for pen in PENALTIES}
    typed = sum(held_out_loss(is_call, y[:, i], PENALTIES[0]) for i in range(y.shape[1]))
    print("held-out loss per penalty (nats per row, summed over blocks): "
          + ", ".join(f"{pen:g}: {s:.2f}" for pen, s in scores.items())
          + f"; a router that reads the step type alone: {typed:.2f}", flush=True)
    best = min(scores, key=scores.get)
    return [fit_one(x[:, i], y[:, i], best) for i in range(y.shape[1])], best


@torch.no_grad()
def routed(model, routers, prompt: list[int], target: list[int], threshold: float,
           read: str = "prompt") -> tuple[list[int], bool]:
    """The blocks the routers close, deciding block by block on the stream as routed so far, and
    whether every target token is still the argmax (greedy decoding writes the target)."""
    x, cos, sin = embed(model, prompt, target)
    closed = []
    for i, block in enumerate(model.layers):
        if torch.sigmoid(routers[i](reading(block.input_layernorm, x, len(prompt), read))).item() > threshold:
            x = block(x, cos, sin)
        else:
            closed.append(i)
    return closed, bool(margins(model, x, target).min() > 0)


def score(model, calls, plans, opened, tool_sets, plan_sets) -> str:
    """One line: tool calls broken and fixed against every block on, and FLOPs skipped per type."""
    def flops(pts, sets) -> float:
        L = model.cfg.num_hidden_layers
        return np.mean([eval_.flops_skipped_pct(model.cfg, [float(i not in c) for i in range(L)], len(p) + len(t))
                        for (p, t), c in zip(pts, sets)])

    after = [right for _, right in tool_sets]
    broke = sum(a and not b for a, b in zip(opened, after))
    fixed_ = sum(b and not a for a, b in zip(opened, after))
    tool, plan = flops(calls, [c for c, _ in tool_sets]), flops(plans, plan_sets)
    return (f"right {sum(opened)} -> {sum(after)} of {len(calls)}, broke {broke} fixed {fixed_} "
            f"({100 * (broke - fixed_) / len(calls):.1f}% net); FLOPs skipped: tool calls {tool:.1f}%, "
            f"planning {plan:.1f}%, differential {tool - plan:+.1f} points")


def main():
    p = argparse.ArgumentParser(description="Routers fitted to the ceiling's per-call blocks, scored on the test split.")
    p.add_argument("--run", required=True, help="a train.py run folder: its LoRA-only model and its routers")
    p.add_argument("--data-dir", required=True, help="local data folder (data.py reads every file under it)")
    p.add_argument("--labels", required=True, help="block_cost.py --ceiling --split train --out file of this run")
    p.add_argument("--n", type=int, default=200, help="test steps per type, and training planning steps")
    p.add_argument("--max-len", type=int, default=512, help="tokens per step, as the labels were found with")
    p.add_argument("--read", choices=READS, default="prompt", help="what the fitted routers read: prompt, "
                   "the model's routers' input (the prompt averaged); last, the prompt's last token")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    args = p.parse_args()
    labels = read_labels(args.labels)  # before the model loads, so a bad file fails at once
    if not labels:
        raise SystemExit(f"{args.labels}: no tool call right with every block on, nothing to fit")
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok, _ = lr.load_run(args.run)
    if model.pooling != "prompt" or model.gate_unit != "block":
        raise SystemExit(f"{args.run}: routers that gate whole blocks and pool the prompt only (its pooling is "
                         f"{model.pooling!r}, its gate unit {model.gate_unit!r})")
    trained = model.routers
    for m in model.modules():
        if isinstance(m, lr.LoRALinear):
            m.merge()
    base, L = model.base, model.base.cfg.num_hidden_layers
    steps = data.fitting(data.load_steps(args.data_dir)[0], tok, args.max_len)[0]  # as eval.py drops
    by_id = {s.id: s for s in steps}
    missing = [i for i in labels if i not in by_id or by_id[i].split != "train"]
    if missing:
        raise SystemExit(f"{args.labels}: {len(missing)} ids are not training tool calls of {args.data_dir} "
                         f"(first: {missing[0]})")
    encode = lambda ss: [data.encode(s, tok, args.max_len) for s in ss]  # noqa: E731
    train_plans = encode(eval_.pick(steps, "train", args.n, 0).get("planning", []))
    rows = [(*data.encode(by_id[i], tok, args.max_len), c) for i, c in labels.items()]
    rows += [(pr, t, []) for pr, t in train_plans]
    x = torch.stack([features(base, pr, t, c, args.read) for pr, t, c in rows])  # (n, L, d)
    y = torch.tensor([[float(i not in c) for i in range(L)] for _, _, c in rows])
    print(f"fitted on {len(labels)} right training tool calls ({100 * (1 - y[:len(labels)].mean()):.1f}% of "
          f"blocks closed) and {len(train_plans)} training planning steps (every block on)", flush=True)
    routers, penalty = fit_routers(x, y, (torch.arange(len(rows)) < len(labels)).float())
    test = eval_.pick(steps, "test", args.n, 0)
    calls, plans = encode(test.get("tool_call", [])), encode(test.get("planning", []))
    opened = [right for _, right in answers(base, calls, set())]
    print(f"test: {len(calls)} tool calls, {len(plans)} planning steps")
    for name, rs, read, thresholds in (("the run's trained routers", trained, "prompt", (0.5,)),
                                       (f"fitted routers (L2 {penalty:g}, reading {args.read})", routers, args.read,
                                        THRESHOLDS)):
        for thr in thresholds:
            tool_sets = [routed(base, rs, pr, t, thr, read) for pr, t in calls]
            plan_sets = [routed(base, rs, pr, t, thr, read)[0] for pr, t in plans]
            print(f"  {name}, threshold {thr:g}: " + score(base, calls, plans, opened, tool_sets, plan_sets), flush=True)
    share = 1 - y[:len(labels)].mean(0)  # per block, the share of labels that close it
    for least in SHARES:
        s = [i for i in range(L) if share[i] >= least]
        tool_sets = [(s, right) for _, right in answers(base, calls, set(s))]
        print(f"  type router, the blocks closed on >= {least:g} of labels {s}: "
              + score(base, calls, plans, opened, tool_sets, [[] for _ in plans]), flush=True)


if __name__ == "__main__":
    main()
