"""The gate threshold at inference: skipping traded for accuracy, without retraining.

Training opens a gate when its router's score is above 0.5. At inference the threshold can be
lowered, so that only the skips a router is surest of are taken: each input then closes its own
number of blocks, those whose score is below the threshold. For each threshold and each run, on
eval.py's sample of --split: blocks skipped per type, the skip differential, routed / LoRA-only
perplexity per type (token-weighted), and the exact match of the tool calls, with the answers
routing broke and fixed against LoRA-only (every block on). Exact match is teacher-forced: every
target token the argmax, which is what greedy decoding reproduces, at the cost of one forward pass;
--generate also decodes each call (greedy_* fields). With several runs, the broken and fixed
answers are pooled per threshold (McNemar). --out saves the rows under a --label;
--plot draws tool-call exact match against tool-call FLOPs skipped (LM head counted), pooled over
the runs of each saved file, one curve per file: a recipe's trade-off, threshold by threshold (as
generation had them, where the sweep was run with --generate); --alone adds a dashed line at the
exact match of LoRA trained alone (bench/fixed_gates.py --skip "" records), the yardstick no
recipe moves.

Choose a threshold on --split val, then read it on test: choosing it on the test calls is tuning
on them. DATA: a folder of data files.

    python bench/threshold.py --runs runs/ours-s0 runs/ours-s1 --data-dir DATA --split val \
        --thresholds 0.5,0.3,0.2,0.1 --threads 1 --label ours --out results/threshold-ours.json
    python bench/threshold.py --plot results/answers-vs-flops.png results/threshold-*.json \
        --alone runs/lora-alone-s0/fixed_gates.json
"""
import argparse
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import data  # noqa: E402
import eval as eval_  # noqa: E402
import layerroute as lr  # noqa: E402
import qwen  # noqa: E402


def perplexity(recs: list[dict], kind: str, name: str) -> float:
    rs = [r for r in recs if r["kind"] == kind]
    return math.exp(sum(r["nll"][name] for r in rs) / sum(r["n_target"] for r in rs))


def skipped_pct(recs: list[dict], kind: str) -> float:
    gates = [g for r in recs if r["kind"] == kind for g in r["gates"]]
    return 100.0 * (1 - sum(gates) / len(gates))


def exact(recs: list[dict], name: str) -> list[bool]:
    """Per tool call: teacher-forced exact under mode name (eval.teacher_forced's wrong count is 0)."""
    return [r["wrong"][name] == 0 for r in recs if r["kind"] == "tool_call"]


def sweep(run: str, args) -> list[dict]:
    """One row per threshold: skips, perplexity ratios and answers of one run."""
    model, tok, saved = lr.load_run(run, args.device)
    if model.pooling == "reference" and not args.generate:
        raise SystemExit(f"{run}: a reference-recipe run's teacher-forced gates see the answer and the padding, "
                         "its generation's do not: give --generate")
    max_len = saved["max_len"]
    steps = data.fitting(data.load_steps(args.data_dir or saved.get("data_dir"))[0], tok, max_len)[0]
    by_kind = {k: ss for k, ss in eval_.pick(steps, args.split, args.n, args.seed).items() if k in eval_.PAIR}
    enc = {k: [data.encode(s, tok, max_len) for s in ss] for k, ss in by_kind.items()}
    examples = [(p, t, k) for k, pts in enc.items() for p, t in pts]
    calls = [(p, "tool_call", s.answer) for (p, _), s in zip(enc["tool_call"], by_kind["tool_call"])]
    call_lens = [len(p) + len(t) for p, t in enc["tool_call"]]
    pad = data.pad_id(tok)
    lora = eval_.teacher_forced(model, examples, args.batch_size, pad, modes=("lora",))
    lora_right = exact(lora, "lora")
    if args.generate:
        with eval_.mode(model, "lora"):
            greedy_lora = eval_.greedy_answers(model, tok, calls, args.max_new_tokens)[0]
    rows = []
    for t in args.thresholds:
        t0 = time.time()
        model.threshold = t
        recs = eval_.teacher_forced(model, examples, args.batch_size, pad, modes=("routed",))
        right = exact(recs, "routed")
        broke, fixed = eval_.broke_fixed(lora_right, right)
        row = {"run": run, "threshold": t, "calls": len(calls), "lora_right": sum(lora_right),
               "right": sum(right), "broke": broke, "fixed": fixed}
        if args.generate:
            with eval_.mode(model, "routed"):
                greedy, _, gates = eval_.greedy_answers(model, tok, calls, args.max_new_tokens)
            # The gates generation decided, over the call's prompt and target: for the reference recipe
            # they differ from teacher forcing's, whose router also pools the answer.
            flops = [eval_.flops_skipped_pct(model.base.cfg, g, n) for g, n in zip(gates, call_lens)]
            row.update(zip(("greedy_broke", "greedy_fixed"), eval_.broke_fixed(greedy_lora, greedy)),
                       greedy_lora_right=sum(greedy_lora), greedy_right=sum(greedy),
                       greedy_tool_call_flops=sum(flops) / len(flops))
        for kind in ("tool_call", "planning"):
            row[kind] = skipped_pct(recs, kind)
            row[kind + "_flops"] = eval_.mean_flops_skipped_pct(model.base.cfg, [r for r in recs if r["kind"] == kind])
            row[kind + "_x"] = perplexity(recs, kind, "routed") / perplexity(lora, kind, "lora")
        rows.append(row)
        print(f"{run}  threshold {t:.3f}: tool_call {row['tool_call']:5.1f}% of blocks, {row['tool_call_flops']:.1f}% of "
              f"FLOPs (x{row['tool_call_x']:.3f}), "
              f"planning {row['planning']:5.2f}% (x{row['planning_x']:.3f}), differential "
              f"{row['tool_call'] - row['planning']:+.1f} points; exact match {row['lora_right']}/{len(calls)} LoRA-only, "
              f"{row['right']}/{len(calls)} routed (broke {row['broke']}, fixed {row['fixed']}; teacher-forced)"
              + (f"; greedy {row['greedy_lora_right']} and {row['greedy_right']} at "
                 f"{row['greedy_tool_call_flops']:.1f}% of FLOPs" if args.generate else "") + f" "
              f"[{time.time() - t0:.0f} s]", flush=True)
    return rows


def pooled(rows: list[dict], greedy: bool = False) -> list[dict]:
    """Per threshold over the runs: exact match (routed and LoRA-only, of every call), the mean tool-call
    FLOPs and blocks skipped, and the answers broken and fixed; greedy: exact match and FLOPs as
    generation had them (rows swept with --generate)."""
    g = "greedy_" if greedy else ""
    out = []
    for t in sorted({r["threshold"] for r in rows}, reverse=True):
        at = [r for r in rows if r["threshold"] == t]
        calls = sum(r["calls"] for r in at)
        out.append({"threshold": t, "calls": calls, "exact": sum(r[g + "right"] for r in at) / calls,
                    "lora_exact": sum(r[g + "lora_right"] for r in at) / calls,
                    "broke": sum(r[g + "broke"] for r in at), "fixed": sum(r[g + "fixed"] for r in at),
                    "tool_call_flops": sum(r[g + "tool_call_flops"] for r in at) / len(at),
                    **{k: sum(r[k] for r in at) / len(at) for k in ("tool_call", "planning")}})
    return out


def by_label(files: list[str]) -> dict[str, dict]:
    """Saved sweeps, those with the same label joined into one (say, seeds or thresholds swept at
    different times); a run is counted once."""
    curves = {}
    for path in files:
        with open(path) as f:
            saved = json.load(f)
        curve = curves.setdefault(saved["label"], {"runs": [], "rows": []})
        curve["runs"] += [r for r in saved["runs"] if r not in curve["runs"]]
        curve["rows"] += saved["rows"]
    return curves


def alone_exact(files: list[str]) -> tuple[float, int]:
    """Pooled greedy exact match of LoRA trained alone (bench/fixed_gates.py --skip "" records):
    (fraction right, calls)."""
    scored = [qwen.read_json(f)["exact_match"]["right"] for f in files]
    calls = sum(len(s) for s in scored)
    return sum(c["lora_only"] for s in scored for c in s.values()) / calls, calls


def plot(files: list[str], out: str, alone: list[str] = ()):
    """Tool-call exact match against tool-call FLOPs skipped, one curve per label, pooled over its runs;
    a dashed line at LoRA alone's exact match, from its records, where given."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for label, saved in by_label(files).items():
        # A curve swept with --generate is drawn as generation has it: the reference recipe's
        # teacher-forced gates see the answer, so only its generated calls say what it keeps.
        greedy = all("greedy_tool_call_flops" in r for r in saved["rows"])
        points = pooled(saved["rows"], greedy)
        line, = ax.plot([p["tool_call_flops"] for p in points], [100 * p["exact"] for p in points], "o-",
                        label=f"{label} ({len(saved['runs'])} run{'s' * (len(saved['runs']) > 1)}, "
                              f"{points[0]['calls']} calls{', greedy' * greedy})")
        for p in points:
            ax.annotate(f"{p['threshold']:g}", (p["tool_call_flops"], 100 * p["exact"]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
        ax.axhline(100 * points[0]["lora_exact"], color=line.get_color(), ls=":", lw=1)
    if alone:
        exact, calls = alone_exact(alone)
        ax.axhline(100 * exact, color="black", ls="--", lw=1,
                   label=f"LoRA alone, every block on ({len(alone)} run{'s' * (len(alone) > 1)}, {calls} calls)")
    ax.set_xlabel("tool-call FLOPs skipped, LM head counted (%)")
    ax.set_ylabel("tool-call exact match (%): teacher-forced, or greedy")
    ax.set_title("Answers kept against compute skipped (dotted: each run's LoRA-only; labels: threshold)", fontsize=9)
    ax.set_ylim(0, 100)
    ax.set_xlim(left=0)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", nargs="+", help="run folders written by train.py")
    p.add_argument("--label", help="the name of these runs' curve in --plot (e.g. the recipe)")
    p.add_argument("--out", help="save the rows as JSON (with --label) for --plot")
    p.add_argument("--plot", nargs="+", metavar=("PNG", "JSON"), help="PNG then saved sweeps: draw them, run nothing "
                   "(sweeps with the same --label make one curve)")
    p.add_argument("--alone", nargs="+", default=[], metavar="JSON", help="with --plot: bench/fixed_gates.py records "
                   "of LoRA trained alone (--skip \"\"), drawn as a dashed line at their exact match")
    p.add_argument("--data-dir", help="data to evaluate on (default: each run's own --data-dir)")
    p.add_argument("--split", default="val", choices=["val", "test"])
    p.add_argument("--n", type=int, default=200, help="at most this many steps per type (eval.py's sample)")
    p.add_argument("--thresholds", default="0.5,0.4,0.3,0.2,0.1",
                   type=lambda s: [float(x) for x in s.split(",")], help="comma-separated, each in [0, 1]")
    p.add_argument("--generate", action="store_true", help="also greedy-decode each call (slow on a CPU)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="with --generate: the decoding length cap")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seed", type=int, default=0, help="seed of eval.py's step sample")
    p.add_argument("--threads", type=int, help="CPU threads for torch")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    args = p.parse_args(argv)
    if args.plot:
        if len(args.plot) < 2:
            p.error("--plot PNG SWEEP.json [SWEEP.json ...]")
        return plot(args.plot[1:], args.plot[0], args.alone)
    if not args.runs:
        p.error("give --runs, or --plot")
    if not all(0 <= t <= 1 for t in args.thresholds):
        p.error(f"--thresholds {args.thresholds}: each must be in [0, 1]")
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [r for run in args.runs for r in sweep(run, args)]
    if len(args.runs) > 1:
        for t in args.thresholds:
            at = [r for r in rows if r["threshold"] == t]
            broke, fixed = sum(r["broke"] for r in at), sum(r["fixed"] for r in at)
            mean = lambda k: sum(r[k] for r in at) / len(at)  # noqa: E731
            print(f"pooled, threshold {t:.3f}: tool_call {mean('tool_call'):.1f}%, planning {mean('planning'):.2f}% "
                  f"(mean over runs); of {sum(r['calls'] for r in at)} calls routing broke {broke}, fixed {fixed} "
                  f"(McNemar p {eval_.mcnemar_p(broke, fixed):.4f})")
    if args.out:
        lr.write_json(args.out, {"label": args.label or os.path.basename(args.runs[0]), "runs": args.runs,
                                 "split": args.split, "rows": rows}, indent=1)
        print(f"wrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
