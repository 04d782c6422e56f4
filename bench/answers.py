"""Skips that keep the answers: every recipe on one budget and several seeds, evaluated, swept and compared.

For each recipe and seed it trains a run (train.py, resumed from its newest checkpoint where one is
there, skipped where the run is whole), evaluates it (eval.py, skipped where its report.json is there),
then sweeps the gate threshold of each run (bench/threshold.py, one record per run, so that a seed
added later is swept too) and draws tool-call exact match against tool-call FLOPs skipped, one curve
per recipe pooled over its seeds. It ends with one table: per recipe, pooled over the seeds, the tool
calls routing broke and fixed against LoRA-only (greedy), the blocks and FLOPs tool calls and
planning steps skip, the differential per seed, and GSM8K accuracy. A run's own LoRA-only
model is a yardstick its recipe can move (LoRA trained only through routed passes may write worse
calls with every block on), so each seed also trains LoRA alone, every block on (bench/fixed_gates.py
--skip ""), and every recipe's routed calls are scored against it too. Stopped at any point,
the same command carries on where it was: each piece is a whole file or absent.

    python bench/answers.py --model DIR --data-dir DATA --device cpu --parallel 2
    python bench/answers.py --model DIR --data-dir DATA --device cuda --parallel 8 --recipes defaults,reference

DATA: a folder of data files; DIR: a checkpoint folder.
"""
import argparse
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
import eval as eval_  # noqa: E402
import layerroute as lr  # noqa: E402
import qwen  # noqa: E402

BUDGET = "--steps 300 --max-len 512 --batch-size 4 --grad-accum 1 --save-every 25 --log-every 5"
RECIPES = {
    "defaults": "",
    "reference": "--recipe reference",
    "router-only": "--router-only 0.25",
    "router-only-argmax": "--router-only 0.25 --cost argmax",
    "distill": "--distill 0.5",
    "distill-p04": "--distill 0.5 --price 0.04",  # distilled, at twice the price: skips past 15% of FLOPs
    # LoRA also trained with every block on, as LoRA alone is: its gates-open model stays LoRA alone's
    "open": "--open-loss 1",
    "distill-p04-open": "--distill 0.5 --price 0.04 --open-loss 1",
    "block-drop": "--block-drop 0.1",
    # attention and MLP gated apart: twice the routers, twice the flips, each router measured as often
    "sublayer": "--gate-unit sublayer --flips 12",
}
ALONE = "lora-alone"  # the yardstick's runs
EVAL = "--n 200 --gen-n 200 --latency-n 0 --kinds tool_call,planning --no-base"


def run_state(run: str, steps: int) -> str:
    """'done' (a whole run of `steps`), 'started' (a checkpoint to resume from) or 'new'."""
    try:
        return "done" if lr.read_settings(run)[1].get("step") == steps else "started"
    except FileNotFoundError:
        return "new"


def flag(flags: str, name: str, default: str | None = None) -> str | None:
    """The value of one flag in a string of flags, or the default."""
    words = flags.split()
    return words[words.index(name) + 1] if name in words else default


def step_count(budget: str) -> int:
    return int(flag(budget, "--steps"))


def sh(argv: list[str], log: str, threads: int) -> None:
    """Run a command with its output in log; a failure stops everything, naming the log."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    with open(log, "a") as f:
        if subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT).returncode:
            raise RuntimeError(f"{' '.join(argv[:3])} ... failed: see {log}")


def train_and_eval(recipe: str, seed: int, args) -> str:
    """One run, trained (or resumed) then evaluated, each skipped where already whole; its folder."""
    run = os.path.join(args.out, f"{recipe}-s{seed}")
    state = run_state(run, step_count(args.budget))
    py = [sys.executable]
    if state != "done":
        t0 = time.time()
        sh(py + ["train.py", "--model", args.model, "--data-dir", args.data_dir, "--device", args.device,
                 "--seed", str(seed), "--out", run, *args.budget.split(), *RECIPES[recipe].split()]
           + (["--resume"] if state == "started" else []), run + ".train.log", args.threads)
        print(f"{recipe} seed {seed}: trained in {time.time() - t0:.0f} s", flush=True)
    if not os.path.exists(os.path.join(run, "report.json")):
        t0 = time.time()
        sh(py + ["eval.py", "--run", run, "--data-dir", args.data_dir, "--device", args.device, "--split", args.split,
                 "--threads", str(args.threads), *args.eval.split()], run + ".eval.log", args.threads)
        print(f"{recipe} seed {seed}: evaluated in {time.time() - t0:.0f} s", flush=True)
    return run


def sweep(recipe: str, seed: int, run: str, args) -> str:
    """One run's threshold sweep (bench/threshold.py), skipped where its record is there; the record's
    path. Records of one recipe share its label, so the plot pools them into one curve."""
    out = os.path.join(args.out, f"threshold-{recipe}-s{seed}.json")
    if not os.path.exists(out):
        extra = ["--generate"] if recipe == "reference" else []  # its teacher-forced gates see the answer
        sh([sys.executable, "bench/threshold.py", "--runs", run, "--data-dir", args.data_dir, "--split", args.split,
            "--n", "200", "--thresholds", args.thresholds, "--threads", str(args.threads), "--device", args.device,
            "--label", recipe, "--out", out, *extra], out[:-5] + ".log", args.threads)
    return out


def train_alone(seed: int, args) -> str:
    """The yardstick of one seed: train.py's LoRA on the same budget and seed, every block on, and its
    greedy tool calls scored on the eval's steps; trained, resumed or skipped like the runs. The path
    of its record."""
    run = os.path.join(args.out, f"{ALONE}-s{seed}")
    if alone_path(run) is None:
        t0 = time.time()
        state = run_state(run, step_count(args.budget))
        sh([sys.executable, "bench/fixed_gates.py", "--skip", "", "--split", args.split, "--n", flag(args.eval, "--n", "200"),
            "--gen-n", flag(args.eval, "--gen-n", "20"), "--max-new-tokens", flag(args.eval, "--max-new-tokens", "256"),
            "--threads", str(args.threads), "--model", args.model, "--data-dir", args.data_dir, "--device", args.device,
            "--seed", str(seed), "--out", run, *args.budget.split()]
           + {"done": ["--eval-only"], "started": ["--resume"], "new": []}[state], run + ".log", args.threads)
        print(f"{ALONE} seed {seed}: trained and scored in {time.time() - t0:.0f} s", flush=True)
    return alone_path(run)


def alone_path(run: str) -> str | None:
    """The path of fixed_gates.py's record of a LoRA-alone run with its calls scored one by one
    (written after training, or by --eval-only), or None."""
    for name in ("fixed_gates.json", "fixed_gates_eval.json"):
        path = os.path.join(run, name)
        if os.path.exists(path) and "right" in qwen.read_json(path).get("exact_match", {}):
            return path
    return None


def against_alone(runs: list[str], alone: list[str]) -> dict:
    """Each run's routed tool calls against LoRA alone of the same seed (its record), call by call, pooled."""
    broke = fixed = right = calls = 0
    for run, yard in zip(runs, alone):
        scored = qwen.read_json(yard)["exact_match"]["right"]
        for g in qwen.read_json(os.path.join(run, "report.json"))["generations"]["tool_call"]:
            if g["id"] not in scored:
                raise ValueError(f"{yard}: tool call {g['id']} of {run} was not scored (another split, data or --gen-n?)")
            a, r = scored[g["id"]]["lora_only"], eval_.answer_correct("tool_call", g["routed"], g["answer"])
            broke, fixed, right, calls = broke + (a and not r), fixed + (r and not a), right + a, calls + 1
    return {"exact_alone": right / calls, "broke_vs_alone": broke, "fixed_vs_alone": fixed,
            "net_vs_alone_pct": 100 * (broke - fixed) / calls}


def summary(recipe: str, runs: list[str], alone: list[str]) -> dict:
    """The pooled numbers of one recipe's evaluated runs; alone: LoRA alone's record of each run's seed."""
    reps = [qwen.read_json(os.path.join(r, "report.json")) for r in runs]
    tool = [r["types"]["tool_call"] for r in reps]
    plan = [r["types"]["planning"] for r in reps]
    calls = sum(t["task_accuracy"]["n"] for t in tool)
    broke, fixed = (sum(t["task_accuracy"][k] for t in tool) for k in ("lost", "gained"))
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    return {"recipe": recipe, "seeds": len(runs), "calls": calls, "broke": broke, "fixed": fixed,
            "net_broken_pct": 100 * (broke - fixed) / calls,
            "exact_lora": mean([t["task_accuracy"]["lora"] for t in tool]),
            "exact_routed": mean([t["task_accuracy"]["routed"] for t in tool]),
            "tool_blocks_pct": mean([t["blocks_skipped_pct"] for t in tool]),
            "tool_flops_pct": mean([t["flops_skipped_pct"] for t in tool]),
            "planning_blocks_pct": mean([p["blocks_skipped_pct"] for p in plan]),
            "differential": [r["differential"]["points"] for r in reps],
            "cut_matched": [(r.get("cut_matched") or {}).get("points") for r in reps],
            "gsm8k_lora": mean([p["task_accuracy"]["lora"] for p in plan]),
            "gsm8k_routed": mean([p["task_accuracy"]["routed"] for p in plan]),
            "gsm8k_n": sum(p["task_accuracy"]["n"] for p in plan), **against_alone(runs, alone)}


def print_table(rows: list[dict]):
    print(f"{'recipe':20}{'seeds':>6}{'calls':>6}{'broke':>6}{'fixed':>6}{'net %':>7}{'exact LoRA':>11}{'routed':>7}"
          f"{'alone':>6}{'broke':>6}{'fixed':>6}{'net %':>7}"
          f"{'tool blk%':>10}{'FLOPs%':>7}{'plan blk%':>10}{'GSM8K LoRA':>11}{'routed':>7}  differential per seed")
    for r in rows:
        diff = " ".join(f"{d:+.1f}" for d in r["differential"])
        print(f"{r['recipe']:20}{r['seeds']:>6}{r['calls']:>6}{r['broke']:>6}{r['fixed']:>6}{r['net_broken_pct']:>7.1f}"
              f"{r['exact_lora']:>11.3f}{r['exact_routed']:>7.3f}"
              f"{r['exact_alone']:>6.3f}{r['broke_vs_alone']:>6}{r['fixed_vs_alone']:>6}{r['net_vs_alone_pct']:>7.1f}"
              f"{r['tool_blocks_pct']:>10.1f}{r['tool_flops_pct']:>7.1f}"
              f"{r['planning_blocks_pct']:>10.2f}{r['gsm8k_lora']:>11.3f}{r['gsm8k_routed']:>7.3f}  {diff}")
    print("(net %: broke minus fixed, of the calls pooled over the seeds, against the run's own LoRA-only model, "
          "then against LoRA trained alone (alone); exact match greedy, mean over seeds; "
          "blocks and FLOPs skipped, LM head counted, mean over seeds)")


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="checkpoint folder or hub id (train.py --model)")
    p.add_argument("--data-dir", required=True, help="a folder of data files")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated, of: " + ", ".join(
        f"{k} ({v or 'train.py defaults'})" for k, v in RECIPES.items()))
    p.add_argument("--seeds", default="0,1,2", help="comma-separated")
    p.add_argument("--budget", default=BUDGET, help="train.py flags every run shares (default: %(default)s)")
    p.add_argument("--eval", default=EVAL, help="eval.py flags (default: %(default)s)")
    p.add_argument("--split", default="test", choices=["test", "val"], help="the steps evaluated and swept")
    p.add_argument("--thresholds", default="0.7,0.6,0.5,0.4,0.3,0.2", help="bench/threshold.py's, for the plot")
    p.add_argument("--out", default="runs/answers", help="folder of the runs, their logs and the sweeps")
    p.add_argument("--plot", default="results/answers-vs-flops.png", help="the PNG of the curves")
    p.add_argument("--parallel", type=int, default=2, help="runs trained or evaluated at once")
    p.add_argument("--threads", type=int, default=1, help="CPU threads per process")
    args = p.parse_args(argv)
    recipes, seeds = args.recipes.split(","), [int(s) for s in args.seeds.split(",")]
    unknown = [r for r in recipes if r not in RECIPES]
    if unknown:
        p.error(f"--recipes: unknown {', '.join(unknown)}; expected some of {', '.join(RECIPES)}")
    os.makedirs(args.out, exist_ok=True)
    jobs = [(r, s) for s in seeds for r in [ALONE, *recipes]]  # seed-major: every recipe's first seed comes first
    with ThreadPoolExecutor(args.parallel) as pool:
        done = dict(zip(jobs, pool.map(lambda j: train_alone(j[1], args) if j[0] == ALONE else train_and_eval(*j, args),
                                       jobs)))
        sweeps = list(pool.map(lambda j: sweep(*j, done[j], args), [(r, s) for s in seeds for r in recipes]))
    yardsticks = [done[(ALONE, s)] for s in seeds]
    sh([sys.executable, "bench/threshold.py", "--plot", args.plot, *sweeps, "--alone", *yardsticks],
       os.path.join(args.out, "plot.log"), 1)
    rows = [summary(r, [done[(r, s)] for s in seeds], yardsticks) for r in recipes]
    print_table(rows)
    lr.write_json(os.path.join(args.out, "summary.json"), rows, indent=1)
    print(f"wrote {args.plot}, {os.path.join(args.out, 'summary.json')}")
    return rows


if __name__ == "__main__":
    main()
