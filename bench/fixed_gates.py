"""Train with gates fixed by step type instead of learned: what LoRA absorbs when routing is perfect.

A type oracle replaces the routers: every step of --kind skips the blocks in --skip (the same
blocks for every input of that kind), every other step runs every block. Everything else is
train.py unchanged (same data, schedule, seed, loss). It answers the question the oracle routers of
bench/block_cost.py leave open: when LoRA is trained *with* the skips, how much of their cost does
it absorb within the budget? Afterwards, perplexity per type on the test split (batch 1, unpadded,
eval.py's sample), with the fixed gates and with every block on, and the greedy exact match of --kind,
each step's by id. With nothing skipped it is "LoRA alone", the yardstick bench/answers.py scores
every recipe's routed answers against.
train.py is patched from outside for the run (two functions, restored after): it stays the method.

DIR: a checkpoint folder (e.g. SmolLM2-135M-Instruct in the Qwen2 layout); DATA: a folder of data files.

    python bench/fixed_gates.py --skip 3,5,7,12,14,25 --model DIR --data-dir DATA \
        --device cpu --steps 300 --max-len 256 --batch-size 4 --grad-accum 1 --seed 0 --out runs/fixed6
    python bench/fixed_gates.py --skip "" ... --out runs/lora0          # LoRA alone, nothing skipped
    python bench/fixed_gates.py --eval-only --skip 3,5,7,12,14,25 --out runs/lora0 --data-dir DATA
"""
import argparse
import collections
import contextlib
import math
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import block_cost  # noqa: E402
import data  # noqa: E402
import eval as eval_  # noqa: E402
import layerroute as lr  # noqa: E402
import train  # noqa: E402


@contextlib.contextmanager
def fixed_gates(skip: set[int], kind: str):
    """Inside the block, train.py's loop uses fixed gates: each micro-batch's rows get theirs from
    their kinds. The loop draws grad_accum micro-batches, then runs them in the same order: a queue
    pairs them. Both patched functions are restored on exit."""
    pending = collections.deque()
    make_batches, forward = train.training_batches, lr.LayerRoute.forward

    def batches(args, model, start):
        L = model.base.cfg.num_hidden_layers
        for b in make_batches(args, model, start):
            pending.append(torch.tensor([[0.0 if k == kind and i in skip else 1.0 for i in range(L)]
                                         for k in b.kinds]))
            yield b

    def fixed_forward(self, ids, *args, **kwargs):
        scores = pending.popleft()  # a constant score: the gate is hard and the router gets no gradient
        self.route = lambda i, h, _lens, _pad=None: scores[:, i].to(h.device)
        return forward(self, ids, *args, **kwargs)

    train.training_batches, lr.LayerRoute.forward = batches, fixed_forward
    try:
        yield
    finally:
        train.training_batches, lr.LayerRoute.forward = make_batches, forward


def perplexities(run: str, data_dir: str, skip: set[int], kind: str, n: int, max_len: int, split: str = "test") -> dict:
    """Per type: perplexity with every block on, and (for `kind`) with `skip` passed over."""
    model, tok = block_cost.lora_only(run)
    steps = data.fitting(data.load_steps(data_dir)[0], tok, max_len)[0]  # as eval.py drops
    out = {}
    for k, chosen in eval_.pick(steps, split, n, seed=0).items():
        if k not in eval_.PAIR:
            continue
        pts = [data.encode(s, tok, max_len) for s in chosen]
        tokens = sum(len(t) for _, t in pts)

        def ppl(blocks):
            return math.exp(sum(len(t) * block_cost.nll_skipping(model, p, t, blocks) for p, t in pts) / tokens)
        out[k] = {"n": len(pts), "ppl_open": ppl(set())}
        if k == kind and skip:
            out[k]["ppl_skipping"] = ppl(skip)
            out[k]["ratio"] = out[k]["ppl_skipping"] / out[k]["ppl_open"]
        print(f"{k}: n {len(pts)}, " + ", ".join(f"{a} {b:.4f}" for a, b in out[k].items() if a != "n"), flush=True)
    return out


def exact_match(run: str, data_dir: str, skip: set[int], kind: str, n: int, max_len: int, split: str = "test",
                max_new_tokens: int = 256) -> dict:
    """eval.py's greedy task accuracy of `kind`, its sample and cap: LoRA-only, and skipping `skip` where
    any; with each step's right or wrong by id, so that other runs can be scored against this one."""
    model, tok, _ = lr.load_run(run)
    model.route = lambda i, h, _lens, _pad=None: torch.full((h.shape[0],), 0.0 if i in skip else 1.0)
    steps = data.fitting(data.load_steps(data_dir)[0], tok, max_len)[0]
    chosen = [s for s in eval_.pick(steps, split, None, seed=0).get(kind, [])
              if eval_.answer_correct(kind, "", s.answer) is not None][:n]
    items = [(data.encode(s, tok, max_len)[0], kind, s.answer) for s in chosen]
    right = {}
    for name, how in (("lora_only", "lora"), ("skipping", "routed"))[:2 if skip else 1]:
        with eval_.mode(model, how):
            right[name] = eval_.greedy_answers(model, tok, items, max_new_tokens)[0]
    acc = {"n": len(items), **{k: sum(v) / len(items) if items else None for k, v in right.items()},
           "right": {s.id: {k: v[j] for k, v in right.items()} for j, s in enumerate(chosen)}}
    print(f"{kind} exact match: " + ", ".join(f"{k} {eval_.fmt(acc[k])}" for k in right) + f" (n {acc['n']})")
    return acc


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], add_help=False)
    p.add_argument("--skip", required=True, help="comma-separated blocks that --kind steps skip ('' for none)")
    p.add_argument("--kind", default="tool_call", help="the step type that skips")
    p.add_argument("--eval-only", action="store_true", help="evaluate the run in --out, do not train")
    p.add_argument("--n", type=int, default=200, help="test steps per type")
    p.add_argument("--gen-n", type=int, default=20, help="steps of --kind to generate for exact match (0: none)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="generation length cap for exact match")
    p.add_argument("--split", default="test", choices=["test", "val"], help="the steps evaluated")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's, which follows OMP_NUM_THREADS)")
    ours, rest = p.parse_known_args()
    args = train.parse_args(["--gate-grad", "ste", *rest, "--no-fast"])  # fixed gates: no router learns; the eager
    # step, whose forward the patch replaces (the fixed-shape step would not see the fixed gates)
    if ours.threads:
        torch.set_num_threads(ours.threads)
    skip = {int(x) for x in ours.skip.split(",") if x.strip()}
    if not ours.eval_only:
        with fixed_gates(skip, ours.kind):
            train.train(args)
    result = perplexities(args.out, args.data_dir, skip, ours.kind, ours.n, args.max_len, ours.split)
    if ours.gen_n:
        result["exact_match"] = exact_match(args.out, args.data_dir, skip, ours.kind, ours.gen_n, args.max_len,
                                            ours.split, ours.max_new_tokens)
    name = "fixed_gates_eval.json" if ours.eval_only else "fixed_gates.json"
    record = {"skip": sorted(skip), "kind": ours.kind, "trained_with_skip": not ours.eval_only, **result}
    lr.write_json(os.path.join(args.out, name), record)


if __name__ == "__main__":
    main()
