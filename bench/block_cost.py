"""What skipping blocks costs, per step and per type: the ceiling on what any router can reach.

For each step (batch 1, no padding, cut to --max-len as train.py does) and each block i, the cost
of skipping block i alone: target-token NLL with block i passed over minus NLL with every block on
(nats per target token). Printed per type: the mean cost of each block, then two oracles that know
these costs for every input, which no router does:

- price oracle: close, per input, every block whose own cost is below a price tau, the same tau
  for every type (a type-blind regulariser that lets the LM loss decide, done perfectly). It shows
  which skip differential the model itself supports at each price, and what it costs.
- k-cheapest oracle: close, per input, its k = 20% cheapest blocks (the 20% skip target).

Oracle costs are measured with the chosen blocks skipped together (not added up), as perplexity
relative to the same model with every block on. --run uses a trained run's LoRA (merged, gates
open, i.e. its LoRA-only model); without it the frozen base model.

--keep-answers K asks what a router that knows only the step type can do for exact match: the one
set of K blocks, closed for every tool call, that keeps the most greedy answers of --split's tool
calls (a greedy search), each set then scored on the test split's; with --per-call, a set of K
blocks for each call, chosen knowing its answer (a router that foresaw every answer: the ceiling);
with --among, every set of K blocks drawn from a short list instead of the greedy search.

--ceiling asks how many blocks each right tool call can skip and stay right, the blocks and their
count free per call, chosen knowing its answer (most_closed, a greedy search): about the most a
router that keeps every right answer can skip on them, whatever it learns. --start-from grows each
call's search from the blocks a run's routers closed on it (its eval.py report), and adds what a
router would skip with those blocks on the calls wrong with every block on, which no skip breaks.

DIR: a checkpoint folder (e.g. SmolLM2-135M-Instruct in the Qwen2 layout); DATA: a folder of data files.

    python bench/block_cost.py --model DIR --data-dir DATA --n 12
    python bench/block_cost.py --run runs/layerroute --data-dir DATA --split test --n 11
    python bench/block_cost.py --run runs/layerroute --data-dir DATA --split val --n 16 --keep-answers 8
    python bench/block_cost.py --run runs/layerroute --data-dir DATA --split test --n 200 --max-len 512 --ceiling \
        --start-from runs/layerroute/report.json --out ceiling.json
"""
import argparse
import collections
import heapq
import itertools
import json
import math
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import data  # noqa: E402
import eval as eval_  # noqa: E402
import layerroute as lr  # noqa: E402
import qwen  # noqa: E402

PRICES = (0.002, 0.005, 0.01, 0.02, 0.05)  # tau, nats per target token


def lora_only(run: str) -> tuple[qwen.Qwen2, object]:
    """A run's LoRA merged into its base (every block on: its LoRA-only model), and its tokenizer."""
    routed, tok, _ = lr.load_run(run)
    for m in routed.modules():
        if isinstance(m, lr.LoRALinear):
            m.merge()
    return routed.base, tok


def embed(model: qwen.Qwen2, prompt: list[int], target: list[int]):
    """The stream entering block 0 of one unpadded row, and its rotary tables."""
    ids = torch.tensor([prompt + target])
    h = model.embed_tokens(ids)
    return h, *model.rope(0, ids.shape[1], ids.device, h.dtype)


def target_logits(model: qwen.Qwen2, h: torch.Tensor, target: list[int]) -> torch.Tensor:
    """Logits predicting the target tokens (the last len(target) tokens) from the final hidden
    states; the head runs only where it predicts one (position t predicts token t + 1)."""
    return model.lm_head(model.norm(h[0, -len(target) - 1:-1])).float()


def target_nll(model: qwen.Qwen2, h: torch.Tensor, target: list[int]) -> float:
    """Mean NLL of the target tokens."""
    return F.cross_entropy(target_logits(model, h, target), torch.tensor(target)).item()


def run_blocks(model: qwen.Qwen2, x: torch.Tensor, cos, sin, closed=(), start: int = 0):
    """Blocks start.. of one row, those in `closed` passed over: the final stream, and the stream
    entering each of them (so skipping block i later reruns only the blocks after it)."""
    entering = []
    for j in range(start, len(model.layers)):
        entering.append(x)
        if j not in closed:
            x = model.layers[j](x, cos, sin)
    return x, entering


@torch.no_grad()
def skip_costs(model: qwen.Qwen2, prompt: list[int], target: list[int]) -> tuple[float, np.ndarray]:
    """NLL with every block on, and the extra NLL of skipping each block alone, (L,)."""
    h, cos, sin = embed(model, prompt, target)
    h, inputs = run_blocks(model, h, cos, sin)
    full = target_nll(model, h, target)
    costs = [target_nll(model, run_blocks(model, x, cos, sin, start=i + 1)[0], target) - full
             for i, x in enumerate(inputs)]
    return full, np.array(costs)


@torch.no_grad()
def skipping(model: qwen.Qwen2, prompt: list[int], target: list[int], skip: set[int]) -> torch.Tensor:
    """The final hidden states with every block in `skip` passed over at once."""
    h, cos, sin = embed(model, prompt, target)
    for i, block in enumerate(model.layers):
        if i not in skip:
            h = block(h, cos, sin)
    return h


@torch.no_grad()
def nll_skipping(model: qwen.Qwen2, prompt: list[int], target: list[int], skip: set[int]) -> float:
    """Mean target NLL with every block in `skip` passed over at once."""
    return target_nll(model, skipping(model, prompt, target, skip), target)


@torch.no_grad()
def answers(model: qwen.Qwen2, pts, skip: set[int]) -> list[tuple[float, bool]]:
    """Per step: summed target NLL with `skip` passed over, and whether greedy decoding gives the
    target exactly (every target token the argmax after the ones before it: one teacher-forced pass)."""
    out = []
    for p, t in pts:
        logits, t = target_logits(model, skipping(model, p, t, skip), t), torch.tensor(t)
        out.append((F.cross_entropy(logits, t, reduction="sum").item(), bool((logits.argmax(-1) == t).all())))
    return out


def compare(model: qwen.Qwen2, pts, opened, skip: set[int]) -> tuple[int, int, float, int, int]:
    """Against `opened` (answers() with every block on): answers broken and fixed with `skip` passed
    over, perplexity x, and answers right before and after."""
    closed = answers(model, pts, skip)
    pairs = list(zip(opened, closed))
    broke, fixed = sum(a[1] and not b[1] for a, b in pairs), sum(b[1] and not a[1] for a, b in pairs)
    ratio = math.exp(sum(b[0] - a[0] for a, b in pairs) / sum(len(t) for _, t in pts))
    return broke, fixed, ratio, sum(a[1] for a in opened), sum(b[1] for b in closed)


SHOW = "broke {} fixed {} x{:.3f} right {} -> {}".format


def keep_answers(model: qwen.Qwen2, fit, held, k: int) -> None:
    """The best a type router can do for exact match: a greedy search for one set of blocks closed
    for every step, each round adding the block that breaks the fewest of `fit`'s answers net (then
    the lowest NLL). Every set is also scored on `held` (when given), which the search never sees."""
    pairs = (("searched on", fit), ("held out", held)) if held else (("searched on", fit),)
    opened = {w: (pts, answers(model, pts, set())) for w, pts in pairs}

    def net_broken(i):
        broke, fixed, ratio, *_ = compare(model, *opened["searched on"], chosen | {i})
        return broke - fixed, ratio

    chosen: set[int] = set()
    for _ in range(k):
        chosen.add(min((i for i in range(model.cfg.num_hidden_layers) if i not in chosen), key=net_broken))
        print(f"  {sorted(chosen)}  " + " | ".join(f"{w}: " + SHOW(*compare(model, *o, chosen))
                                                  for w, o in opened.items()), flush=True)


def keep_among(model: qwen.Qwen2, pts, among: list[int], k: int, always: list[int]) -> None:
    """Every set of k blocks that holds `always` and draws the rest from `among`, closed for every
    step: an exhaustive search where the greedy one may miss, affordable only over a short list
    (C(10, 6) = 210 sets)."""
    opened = answers(model, pts, set())
    sets = [tuple(always) + c for c in itertools.combinations(among, k - len(always))]
    print(f"{len(sets)} sets of {k}: {always} and the rest from {among}, {len(pts)} tool calls", flush=True)
    best, right_after = None, collections.Counter()
    for s in sets:
        res = compare(model, pts, opened, set(s))
        right_after[res[4]] += 1
        if best is None or (res[0] - res[1], res[2]) < best:  # fewest answers lost net, then perplexity
            best = res[0] - res[1], res[2]
            print(f"  best so far {sorted(s)}: " + SHOW(*res), flush=True)
    print("  sets by answers right after: " + ", ".join(f"{n} right: {c}" for n, c in sorted(right_after.items())))


def keep_each(model: qwen.Qwen2, pts, k: int) -> None:
    """The best a router that foresaw each answer could do: per step, close one block at a time, the
    one with the lowest NLL among those that leave a right answer right, up to k blocks."""
    kept = right_open = 0
    for j, pt in enumerate(pts):
        (nll_open, right), = answers(model, [pt], set())
        chosen, nll = set(), nll_open
        for _ in range(k):
            fits = [(a[0], i) for i in range(model.cfg.num_hidden_layers) if i not in chosen
                    for a in answers(model, [pt], chosen | {i}) if a[1] or not right]
            if not fits:
                break
            nll, i = min(fits)
            chosen.add(i)
        right_open, kept = right_open + right, kept + (right and len(chosen) == k)
        print(f"  call {j} ({len(pt[1])} tokens, {'right' if right else 'wrong'} with every block on): "
              f"{len(chosen)} blocks {sorted(chosen)} x{math.exp((nll - nll_open) / len(pt[1])):.3f}", flush=True)
    print(f"  {kept} of the {right_open} right answers stay right with {k} blocks closed, each its own")


def margins(model: qwen.Qwen2, h: torch.Tensor, target: list[int]) -> torch.Tensor:
    """Per target position, the target's logit minus the best other token's: greedy decoding writes
    the target exactly if and only if every one is above 0."""
    logits, t = target_logits(model, h, target), torch.tensor(target)[:, None]
    return logits.gather(1, t)[:, 0] - logits.scatter(1, t, float("-inf")).max(1).values


@torch.no_grad()
def most_closed(model: qwen.Qwen2, prompt: list[int], target: list[int], start=()) -> tuple[bool, list[int]]:
    """Whether a step is right with every block on, and, if so, the blocks a router that knows its
    answer closes while it stays right: the larger of two greedy sets (neither is the largest there
    is), each grown from `start` where closing those keeps the answer right, else from none. Best
    first: one block at a time, the one whose skip leaves the largest weakest margin with those
    closed before it. First fit: every block in the order of the weakest margin its skip alone
    leaves, kept closed if the answer stays right with it and those closed before it."""
    h, cos, sin = embed(model, prompt, target)

    def streams(closed: set[int]) -> tuple[list[torch.Tensor], float]:
        """The stream entering each block with `closed` skipped, and the weakest margin at the end."""
        x, inputs = run_blocks(model, h, cos, sin, closed)
        return inputs, margins(model, x, target).min().item()

    def weakest(i: int, inputs: list[torch.Tensor], closed: set[int]) -> tuple[float, list[torch.Tensor]]:
        """Block i skipped too, where inputs come from streams(closed): the weakest margin, and the
        new inputs (those up to i do not change)."""
        x, after = run_blocks(model, inputs[i], cos, sin, closed, start=i + 1)
        return margins(model, x, target).min().item(), inputs[:i + 1] + after

    opened, m = streams(set())
    if m <= 0:
        return False, []
    base, base_inputs = set(), opened
    if start:
        inputs, m = streams(set(start))
        if m > 0:
            base, base_inputs = set(start), inputs
    alone = [(weakest(i, base_inputs, base)[0], i) for i in range(len(opened)) if i not in base]
    sets = []
    for best_first in (True, False):
        # Best first re-measures lazily: a margin measured with fewer blocks closed rarely rises when
        # more close, so only the block on top is measured again, and closed if it still leads.
        # First fit measures each block once more, in the order of its margin alone.
        queue = [(-m, i) for m, i in alone if m > 0]
        heapq.heapify(queue)
        closed, inputs = set(base), base_inputs
        while queue:
            _, i = heapq.heappop(queue)
            m, entering = weakest(i, inputs, closed)
            if m > 0 and best_first and queue and m < -queue[0][0]:
                heapq.heappush(queue, (-m, i))
            elif m > 0:
                closed.add(i)
                inputs = entering
        sets.append(sorted(closed))
    return True, max(sets, key=len)


def keep_most(model: qwen.Qwen2, steps, tok, max_len: int, out: str | None, starts: dict) -> None:
    """most_closed() for every tool call, each from its blocks in `starts` (by id): how many blocks,
    and what share of its FLOPs (LM head counted), each right call can skip and stay right when the
    router knows its answer; as found by a greedy search, so a router that keeps every right answer
    may skip more than this."""
    L, recs = model.cfg.num_hidden_layers, []

    def share(closed: list[int], n: int) -> float:
        return eval_.flops_skipped_pct(model.cfg, [float(i not in closed) for i in range(L)], n)

    for j, s in enumerate(steps):
        prompt, target = data.encode(s, tok, max_len)
        start = starts.get(s.id, [])
        right, closed = most_closed(model, prompt, target, start)
        n = len(prompt) + len(target)
        recs.append({"id": s.id, "right": right, "closed": closed, "length": n, "flops_pct": share(closed, n),
                     "start": start, "start_flops_pct": share(start, n)})
        if right:
            print(f"  call {j} ({len(target)} target tokens): {len(closed)} blocks {closed}, "
                  f"{recs[-1]['flops_pct']:.1f}% of FLOPs", flush=True)
    summarize(recs)
    if out:
        lr.write_json(out, {"max_len": max_len, "calls": recs})
        print(f"wrote {out}")


def summarize(recs: list[dict]) -> None:
    """keep_most()'s findings: per right call, then with the start blocks on the calls wrong anyway."""
    kept = [r for r in recs if r["right"]]
    if not kept:
        raise SystemExit("no tool call is right with every block on: nothing to keep")
    flops = np.array([r["flops_pct"] for r in kept])
    counts = np.array([len(r["closed"]) for r in kept])
    print(f"{len(kept)} of {len(recs)} tool calls right with every block on; closed while each stays right: "
          f"{counts.mean():.1f} blocks on average (min {counts.min()}, median {np.median(counts):g}, max "
          f"{counts.max()}), {flops.mean():.1f}% of FLOPs (min {flops.min():.1f}%)")
    for pct in (5, 10, 15, 20, 25):
        print(f"  right calls that can skip {pct}% of their FLOPs or more and stay right: "
              f"{(flops >= pct).sum()} of {len(kept)}")
    if any(r["start"] for r in recs):  # no skip can break a call wrong with every block on
        mixed = np.mean([r["flops_pct"] if r["right"] else r["start_flops_pct"] for r in recs])
        print(f"these blocks on the right calls and the start blocks on the other {len(recs) - len(kept)}: "
              f"{mixed:.1f}% of tool-call FLOPs, none broken; the start blocks on every call: "
              f"{np.mean([r['start_flops_pct'] for r in recs]):.1f}%")


def oracle(model, pts, full, costs, choose) -> tuple[float, float]:
    """Blocks skipped (%) and perplexity ratio (skipping / every block on, token-weighted) when each
    input closes choose(its costs) together."""
    sets = [choose(c) for c in costs]
    n_tok = sum(len(t) for _, t in pts)
    nll = sum(len(t) * nll_skipping(model, p, t, s) for (p, t), s in zip(pts, sets))
    base = sum(len(t) * f for (_, t), f in zip(pts, full))
    return 100 * np.mean([len(s) for s in sets]) / costs.shape[1], math.exp((nll - base) / n_tok)


def tool_calls(steps, tok, split: str, args) -> list:
    """eval.py's sample of a split's tool calls, encoded and cut as train.py does."""
    chosen = eval_.pick(steps, split, args.n, 0).get("tool_call", [])
    if not chosen:
        raise SystemExit(f"{args.data_dir}: --keep-answers needs tool calls in split '{split}'")
    return [data.encode(s, tok, args.max_len) for s in chosen]


def routers_closed(report: str | None) -> dict[str, list[int]]:
    """Per step id, the blocks its routers closed in an eval.py report.json (none without one)."""
    if not report:
        return {}
    try:
        with open(report) as f:
            examples = json.load(f)["examples"]
        return {e["id"]: [i for i, g in enumerate(e["gates"]) if g < 0.5] for e in examples}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"{report}: not an eval.py report with per-step gates ({type(e).__name__}: {e})")


def block_list(p: argparse.ArgumentParser, name: str, value: str | None) -> set[int]:
    """Block numbers from "3,5,7" (an empty set when not given); anything else is a usage error."""
    if value and not all(b.strip().isdigit() for b in value.split(",")):
        p.error(f"{name} takes block numbers separated by commas, not {value!r}")
    return {int(b) for b in value.split(",")} if value else set()


def main():
    p = argparse.ArgumentParser(description="Per-block cost of skipping per step type, and oracle routers.")
    p.add_argument("--model", help="checkpoint folder (the frozen base)")
    p.add_argument("--run", help="a train.py run folder: use its LoRA-only model instead of the base")
    p.add_argument("--data-dir", required=True, help="local data folder (data.py reads every file under it)")
    p.add_argument("--split", default="train", help="train, val, test or all")
    p.add_argument("--n", type=int, default=12, help="steps per type")
    p.add_argument("--max-len", type=int, default=256, help="tokens per step, oldest prompt tokens cut")
    p.add_argument("--keep-answers", type=int, metavar="K", help="instead: search --split's tool calls for the "
                   "K blocks whose skipping keeps the most greedy answers, and score each set on the test split")
    p.add_argument("--per-call", action="store_true", help="with --keep-answers: a set of K blocks for each tool "
                   "call of --split, chosen knowing its answer (a router that foresaw it: the ceiling per call)")
    p.add_argument("--among", help="with --keep-answers: every set of K blocks from this list (e.g. 3,4,5,6,7,25,26), "
                   "closed for every tool call of --split: an exhaustive search over a short list")
    p.add_argument("--always", default="", help="with --among: blocks in every set (e.g. 5,6,7,26)")
    p.add_argument("--ceiling", action="store_true", help="instead: per tool call of --split right with every block "
                   "on, the blocks a router that knows its answer can close and keep it right (most_closed)")
    p.add_argument("--out", help="with --ceiling: also write each call's blocks and FLOPs to this JSON file")
    p.add_argument("--start-from", metavar="REPORT", help="with --ceiling: an eval.py report.json; each call's search "
                   "starts from the blocks its routers closed there, where closing them keeps the answer right")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's, which follows OMP_NUM_THREADS)")
    args = p.parse_args()
    if bool(args.model) == bool(args.run):
        p.error("give exactly one of --model and --run")
    if args.per_call and not args.keep_answers:
        p.error("--per-call goes with --keep-answers K")
    if args.among and (not args.keep_answers or args.per_call):
        p.error("--among goes with --keep-answers K, without --per-call")
    if args.always and not args.among:
        p.error("--always goes with --among")
    if args.ceiling and args.keep_answers:
        p.error("give one of --ceiling and --keep-answers")
    if (args.out or args.start_from) and not args.ceiling:
        p.error("--out and --start-from go with --ceiling")
    among, always = (block_list(p, name, v) for name, v in (("--among", args.among), ("--always", args.always)))
    starts = routers_closed(args.start_from)  # read before the model loads, so a bad file fails at once
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.run:
        model, tok = lora_only(args.run)
    else:
        model, tok = qwen.load_model(args.model).eval(), qwen.load_tokenizer(args.model)
    steps = data.fitting(data.load_steps(args.data_dir)[0], tok, args.max_len)[0]  # as eval.py drops
    if args.ceiling:
        calls = eval_.pick(steps, args.split, args.n, 0).get("tool_call")
        if not calls:
            raise SystemExit(f"{args.data_dir}: --ceiling needs tool calls in split '{args.split}'")
        return keep_most(model, calls, tok, args.max_len, args.out, starts)
    if args.keep_answers:
        fit = tool_calls(steps, tok, args.split, args)
        if args.per_call:
            return keep_each(model, fit, args.keep_answers)
        if among:
            L, k = model.cfg.num_hidden_layers, args.keep_answers
            if not among | always <= set(range(L)) or len(among | always) < k or len(always) > k:
                p.error(f"--among and --always: at least {k} blocks in all, at most {k} always, each in 0-{L - 1}")
            return keep_among(model, fit, sorted(among - always), k, sorted(always))
        held = tool_calls(steps, tok, "test", args) if args.split != "test" else None  # test: searched on already
        print(f"tool calls: {len(fit)} searched on ({args.split}), {len(held) if held else 'none'} held out (test)")
        return keep_answers(model, fit, held, args.keep_answers)
    L = model.cfg.num_hidden_layers
    k = round(0.2 * L)
    per_type = {}
    for kind, chosen in eval_.pick(steps, args.split, args.n, seed=0).items():  # eval.py's sample
        pts = [data.encode(s, tok, args.max_len) for s in chosen]
        full, costs = zip(*(skip_costs(model, pr, t) for pr, t in pts))
        full, costs = np.array(full), np.stack(costs)  # (n,), (n, L)
        per_type[kind] = pts, full, costs
        mean = costs.mean(0)
        cheap = np.argsort(mean)[:k]
        print(f"{kind}: {len(pts)} steps, NLL {full.mean():.3f} nats/token, {np.mean([len(t) for _, t in pts]):.0f} target tokens")
        print("  mean cost per block: " + " ".join(f"{c:.2f}" for c in mean))
        print(f"  the {k} cheapest on average {sorted(cheap.tolist())}: sum {mean[cheap].sum():.3f} nats/token", flush=True)
    print(f"\noracle routers (perplexity x = skipping / every block on, blocks skipped together; {args.split} split)")
    rows = [(f"price {tau} nats/token", lambda c, tau=tau: {i for i in range(L) if c[i] < tau}) for tau in PRICES]
    rows.append((f"{k} cheapest per input", lambda c: set(np.argsort(c)[:k].tolist())))
    pair = [kind for kind in ("tool_call", "planning") if kind in per_type]
    for name, choose in rows:
        res = {kind: oracle(model, *per_type[kind], choose) for kind in per_type}
        line = "  ".join(f"{kind} {s:5.1f}% x{r:.3f}" for kind, (s, r) in res.items())
        diff = f"  differential {res[pair[0]][0] - res[pair[1]][0]:+.1f} points" if len(pair) == 2 else ""
        print(f"  {name:24s} {line}{diff}", flush=True)


if __name__ == "__main__":
    main()
