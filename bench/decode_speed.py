"""Routed decoding with the KV cache: measured speed-up of skipped blocks vs the FLOP ideal.

The same LayerRoute generates the same number of tokens (qwen.generate, no stop token) twice:
routed (the gates decided at prefill; closed blocks are not run and keep no KV) and full
(`open_gates = True`: every block runs). Only the decode steps are timed (generate's wall time
minus its prefill forward), interleaved full / routed in one process, several repeats; medians.
ideal = FLOPs(full) / FLOPs(routed) = 1 / (1 - fraction skipped), from qwen.forward_flops at each
step's actual context length, LM head included; achieved = (measured - 1) / (ideal - 1).

Gates: --skip-frac closes that share of blocks, spread across depth (batch 1; at batch 8 every row
closes its own random set of that size: mixed gates), by replacing route() with a fixed table.
--run uses a trained run's own routers on real test prompts from --data-dir (tool calls at batch 1;
4 tool-call + 4 planning prompts, cut to one length, at batch 8).

DIR: a checkpoint folder (e.g. SmolLM2-135M-Instruct in the Qwen2 layout); DATA: a folder of data files.

    python bench/decode_speed.py --model DIR --skip-frac 0.25
    python bench/decode_speed.py --run runs/smollm --data-dir DATA
"""
import argparse
import os
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import eval as eval_  # noqa: E402
import layerroute as lr  # noqa: E402
import qwen  # noqa: E402


class PrefillTimer:
    """Passes generate's calls to the model and notes how long the prefill (first) forward took."""

    def __init__(self, model):
        self.model, self.prefill_s, self.first = model, 0.0, True

    def new_cache(self, batch: int, max_len: int, pad=None):
        self.first = True
        return self.model.new_cache(batch, max_len, pad)

    def __call__(self, ids, cache=None):
        t = time.perf_counter()
        out = self.model(ids, cache=cache)
        if self.first:
            self.prefill_s, self.first = time.perf_counter() - t, False
        return out


def spread(L: int, n: int) -> list[int]:
    """n block indices spread evenly across depth (first and last blocks kept open)."""
    return sorted({round(1 + k * (L - 2) / n + (L - 2) / (2 * n)) for k in range(n)})


def ideal_speedup(cfg, gates: torch.Tensor, prompt_len: int, new_tokens: int) -> float:
    """FLOPs(all open) / FLOPs(gates) over the decode steps of every row. gates: (B, L) 0/1.
    Rows have the same length here, so the batch's skipped share is the mean of the rows'."""
    end = prompt_len + new_tokens
    skipped = np.mean([eval_.flops_skipped_pct(cfg, g, end, start=prompt_len) for g in gates.tolist()])
    return 1 / (1 - skipped / 100)


def measure(model, ids, args, label: str):
    """Interleaved full / routed decoding of ids; prints and returns (measured, ideal) speed-ups."""
    timer, B = PrefillTimer(model), ids.shape[0]
    ms = {"full": [], "routed": []}
    for r in range(args.warmup + args.repeats):
        for name in (("full", "routed") if r % 2 == 0 else ("routed", "full")):
            model.open_gates = name == "full"
            t = time.perf_counter()
            out = qwen.generate(timer, ids, args.new_tokens, stop=set())
            dt = time.perf_counter() - t - timer.prefill_s
            assert all(len(o) == args.new_tokens for o in out)
            if r >= args.warmup:
                ms[name].append(1000 * dt / args.new_tokens)
            if name == "routed":
                gates = model.last_gates  # (B, L): the prefill's decision (decode steps reuse it)
    model.open_gates = False
    full, routed = statistics.median(ms["full"]), statistics.median(ms["routed"])
    ratios = [f / r for f, r in zip(ms["full"], ms["routed"])]
    ideal = ideal_speedup(model.base.cfg, gates, ids.shape[1], args.new_tokens)
    nobody = int((gates.sum(0) == 0).sum())
    # At small batch a decode step mostly reads weights: a block that any row runs costs its full
    # weight read, so the bound by weights read counts only the blocks every row skips.
    cfg = model.base.cfg
    block, head = qwen.forward_flops(cfg, 0)
    weight_bound = (cfg.num_hidden_layers * block + head) / ((cfg.num_hidden_layers - nobody) * block + head)
    print(f"{label}: batch {B}, prompt {ids.shape[1]}, {args.new_tokens} new tokens, "
          f"{100 * (1 - gates.mean()):.1f}% of row-blocks closed, {nobody}/{gates.shape[1]} blocks closed for every row")
    print(f"  full {full:.2f} ms/step, routed {routed:.2f} ms/step ({1000 * B / routed:,.0f} tok/s); "
          f"speed-up {full / routed:.3f} (median of per-repeat ratios {statistics.median(ratios):.3f}, "
          f"range {min(ratios):.3f}..{max(ratios):.3f})")
    print(f"  ideal {ideal:.3f} (1 / (1 - {1 - 1 / ideal:.3f} of FLOPs skipped)); "
          f"achieved {(full / routed - 1) / (ideal - 1):.0%} of the ideal gain; bound by weights read "
          f"(blocks no row runs) {weight_bound:.3f}", flush=True)
    return full / routed, ideal


def real_prompts(args, tok, n_tool: int, n_plan: int) -> torch.Tensor:
    """The first test-split prompts of each kind, cut (oldest tokens first) to the shortest one."""
    import data
    steps, _ = data.load_steps(args.data_dir)
    test = [s for s in steps if s.split == "test"]
    picked = [s for s in test if s.kind == "tool_call"][:n_tool] + [s for s in test if s.kind == "planning"][:n_plan]
    prompts = [data.encode(s, tok)[0] for s in picked]
    n = min(min(map(len, prompts)), args.prompt_len)
    return torch.tensor([p[-n:] for p in prompts])


def main():
    p = argparse.ArgumentParser(description="KV-cached routed decoding vs every block on, against the FLOP ideal.")
    p.add_argument("--model", help="checkpoint folder (with --skip-frac)")
    p.add_argument("--run", help="a trained run folder: its own routers decide the gates (needs --data-dir)")
    p.add_argument("--data-dir", help="data folder for --run's real prompts (test split)")
    p.add_argument("--skip-frac", type=float, default=0.25, help="share of blocks closed by hand (without --run)")
    p.add_argument("--prompt-len", type=int, default=128, help="prompt tokens (random ids without --run; at most this with)")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens generated per row")
    p.add_argument("--batch", type=int, default=8, help="batch of the mixed-gates measurement (0: skip it)")
    p.add_argument("--repeats", type=int, default=5, help="interleaved repeats (medians reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed repeats first")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 on a shared machine)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompt and gate patterns")
    args = p.parse_args()
    qwen.set_attention_backends()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(args.seed)
    if args.run:
        if not args.data_dir:
            p.error("--run needs --data-dir for its prompts")
        model, tok, _ = lr.load_run(args.run)
        measure(model, real_prompts(args, tok, 1, 0), args, "trained routers, tool-call prompt")
        if args.batch:
            measure(model, real_prompts(args, tok, args.batch // 2, args.batch - args.batch // 2), args,
                    "trained routers, tool-call + planning prompts")
        return
    if not args.model:
        p.error("give --model (with --skip-frac) or --run")
    model = lr.LayerRoute(qwen.load_model(args.model)).eval()
    L, V = model.base.cfg.num_hidden_layers, model.base.cfg.vocab_size
    n = round(args.skip_frac * L)
    table = torch.ones(max(1, args.batch), L)  # (B, L) gate per row and block: row 0 = the spread set
    table[0, spread(L, n)] = 0
    for b in range(1, len(table)):  # the other rows: a random set of n blocks each (mixed gates)
        table[b, torch.randperm(L, generator=g)[:n]] = 0
    model.route = lambda i, h, prompt_lens, pad=None: table[:h.shape[0], i]  # scores 0/1 -> those gates
    print(f"batch 1 closes blocks {spread(L, n)} of {L}", flush=True)
    measure(model, torch.randint(0, V, (1, args.prompt_len), generator=g), args, "batch 1, blocks spread")
    if args.batch:
        measure(model, torch.randint(0, V, (args.batch, args.prompt_len), generator=g), args,
                f"batch {args.batch}, mixed gates (each row its own {n} closed blocks)")


if __name__ == "__main__":
    main()
