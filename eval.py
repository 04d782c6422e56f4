"""Evaluate a trained LayerRoute run: every number the paper reports, and the ones it left out.

    python eval.py --run runs/layerroute                      # test split -> RUN/report.json + plots
    python eval.py --run RUN --data-dir FOLDER --n 200 --gen-n 20 --split all
    python eval.py --runs runs/seed0 runs/seed1 runs/seed2    # mean +- std over seeds

Per step type (tool_call, planning, and reply when the data has it), from one teacher-forced pass
per model: blocks and FLOPs skipped, target-token perplexity of the frozen base, of LoRA with every
gate open and of LayerRoute (LoRA + routing), per-layer skip rates; from greedy generation, task
accuracy of the same three; from timed KV-cached decoding at batch 1, ms per token with routing and
with every block on; what routing costs, and how well that is known: the routed / LoRA-only
perplexity ratio with a bootstrap CI over steps, and the answers routing broke and fixed (paired,
McNemar; --runs pools them over seeds). Across types: the skip differential (tool - planning) with
a bootstrap CI, the same on length-matched pairs and against tool-call prompts cut to the planning
prompts' lengths, and the correlation of the gate score with prompt length.
The three models are one LayerRoute object under its two switches (MODES): they share every line
of code except the switch, so a difference between them is the switch's.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import sys
import tempfile
import time
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F

import data
import layerroute as lr
import qwen

# name -> (LoRA on, every gate open). Routed runs last so last_gates/last_scores are its decision.
MODES = {"base": (False, True), "lora": (True, True), "routed": (True, False)}
PAIR = ("tool_call", "planning")  # the two types the differential compares
GEN_BATCH = 16  # prompts per greedy batch: 4x one at a time on a CPU thread (bench/gen_batch.py), a modest KV cache


@contextmanager
def mode(model: lr.LayerRoute, name: str):
    """Put the model in one of MODES for the block, then restore both switches as they were."""
    loras = [m for m in model.modules() if isinstance(m, lr.LoRALinear)]
    saved = [m.enabled for m in loras], model.open_gates
    model.lora(MODES[name][0])
    model.open_gates = MODES[name][1]
    try:
        yield model
    finally:
        for m, on in zip(loras, saved[0]):
            m.enabled = on
        model.open_gates = saved[1]


def flops_skipped_pct(cfg: qwen.QwenConfig, gates: list[float], length: int, start: int = 0,
                      heads: int | None = None) -> float:
    """Percent of a forward's FLOPs that closed gates save, over token positions start..length-1.

    gates: one per block, or two per block (attention, MLP) with sublayer gates (LayerRoute.gate_unit).
    Position t attends over t + 1 keys. A full forward costs, per position, L blocks plus the LM head
    (qwen.half_flops: attention's matmuls with QK^T and AV, and the MLP's; the d x vocab head); the
    routed one drops the closed units. start=0, length=prompt+target is the teacher-forced pass; start=prompt
    length is the decode phase of generation. heads: the positions the head runs at, when not every
    one (a generation's prefill keeps the last logits only). The head is never skipped, which caps the saving.
    """
    L = cfg.num_hidden_layers
    halves = [qwen.half_flops(cfg, t + 1) for t in range(start, length)]
    attention, mlp = sum(a for a, _ in halves), sum(m for _, m in halves)
    costs = {L: [attention + mlp] * L, 2 * L: [attention, mlp] * L}.get(len(gates))
    if costs is None:
        raise ValueError(f"{len(gates)} gates: expected {L} (one a block) or {2 * L} (attention and MLP apart)")
    head = (length - start if heads is None else heads) * qwen.forward_flops(cfg, 1)[1]
    skipped = sum(c * (1 - float(g)) for c, g in zip(costs, gates))
    return 100.0 * skipped / (sum(costs) + head)


# ----------------------------------------------------------------------------- teacher forcing

@torch.no_grad()
def teacher_forced(model: lr.LayerRoute, examples: list[tuple[list[int], list[int], str]],
                   batch_size: int = 4, pad_id: int = 0, pad_to: int | None = None,
                   modes: tuple[str, ...] = tuple(MODES)) -> list[dict]:
    """Per example (prompt_ids, target_ids, kind): target NLL sums under each of modes, the target
    positions whose argmax is not the target under each ("wrong"), and the last mode's gates and
    scores (the routed pass's, with the default modes). Examples are batched by length (less
    padding), results kept in order.
    Greedy decoding reproduces a target exactly if and only if its wrong count is 0: the prompt
    pooling decides the gates from the prompt alone, as generation does (not so for "reference").
    pad_to: pad every batch to this length, as training does for the reference recipe (its router
    pools over the padding, so its gates depend on it)."""
    dev = model.base.embed_tokens.weight.device
    order = sorted(range(len(examples)), key=lambda i: len(examples[i][0]) + len(examples[i][1]))
    out: list[dict] = [{} for _ in examples]
    for s in range(0, len(order), batch_size):
        rows = order[s:s + batch_size]
        b = data.collate([examples[i][:2] for i in rows], [examples[i][2] for i in rows], pad_id, pad_to)
        ids, labels, plens = b.ids.to(dev), b.labels.to(dev), b.prompt_lens.to(dev)
        nll, wrong = {}, {}
        for name in modes:
            with mode(model, name):
                logits = model(ids, plens)
            # labels[t] is predicted at t-1; -100 (prompt, padding) adds exactly 0 to the row's sum.
            ce = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels[:, 1:], reduction="none")
            nll[name] = ce.sum(1).tolist()
            scored = labels[:, 1:] != -100
            wrong[name] = ((logits[:, :-1].argmax(-1) != labels[:, 1:]) & scored).sum(1).tolist()
        for j, i in enumerate(rows):
            p, t, kind = examples[i]
            out[i] = {"kind": kind, "prompt_len": len(p), "length": len(p) + len(t), "n_target": len(t),
                      "nll": {m: nll[m][j] for m in modes}, "wrong": {m: wrong[m][j] for m in modes},
                      "gates": model.last_gates[j].tolist(),
                      "scores": model.last_scores[j].tolist()}
    return out


def mean_flops_skipped_pct(cfg: qwen.QwenConfig, recs: list[dict]) -> float:
    """The mean over teacher_forced records of each one's FLOPs skipped (flops_skipped_pct, LM head counted)."""
    return float(np.mean([flops_skipped_pct(cfg, r["gates"], r["length"]) for r in recs]))


def type_summary(cfg: qwen.QwenConfig, recs: list[dict], n_boot: int = 1000, seed: int = 0) -> dict:
    """Skip rates, FLOPs and perplexities of one step type from its teacher_forced records."""
    closed = 1 - np.array([r["gates"] for r in recs])  # (n, L)
    tokens = sum(r["n_target"] for r in recs)
    # Perplexity over every target token of the type (token-weighted, as a training loss is).
    ppl = {m: math.exp(sum(r["nll"][m] for r in recs) / tokens) for m in recs[0]["nll"]}
    base = ppl.get("base")  # None where eval ran --no-base
    return {"n": len(recs), "target_tokens": tokens,
            "blocks_skipped_pct": float(100 * closed.mean()),
            "flops_skipped_pct": mean_flops_skipped_pct(cfg, recs),
            "ppl_base": base, "ppl_lora": ppl["lora"], "ppl_routed": ppl["routed"],
            "ppl_routed_minus_base": None if base is None else ppl["routed"] - base,  # the paper's kind of delta...
            "ppl_routed_minus_lora": ppl["routed"] - ppl["lora"],  # ...and the cost of skipping itself
            "ppl_routed_vs_lora": ppl["routed"] / ppl["lora"], "ppl_routed_vs_lora_ci95": ratio_ci(recs, n_boot, seed),
            "per_layer_skip_pct": (100 * closed.mean(0)).tolist(), "forced_exact": forced_exact(recs)}


def forced_exact(recs: list[dict]) -> dict:
    """Teacher-forced exact match (every target argmax right: what greedy decoding reproduces) per
    mode, and the targets routing broke and fixed against LoRA-only. Free: it needs no generation."""
    right = {m: [r["wrong"][m] == 0 for r in recs] for m in recs[0]["wrong"]}
    broke, fixed = broke_fixed(right["lora"], right["routed"])
    return {**{m: sum(v) / len(recs) for m, v in right.items()}, "broke": broke, "fixed": fixed}


# ----------------------------------------------------------------------------- statistics

def bootstrap_ci(a, b=None, n_boot: int = 1000, seed: int = 0) -> list[float]:
    """95% percentile interval of mean(a) - mean(b), resampling a and b independently with
    replacement; with b None, of mean(a) (a then holds paired differences, resampled as pairs)."""
    rng = np.random.default_rng(seed)
    a = np.asarray(a, dtype=float)
    stat = rng.choice(a, (n_boot, len(a))).mean(1)
    if b is not None:
        b = np.asarray(b, dtype=float)
        stat = stat - rng.choice(b, (n_boot, len(b))).mean(1)
    return [float(x) for x in np.percentile(stat, [2.5, 97.5])]


def length_matched_pairs(tool_lens: list[int], plan_lens: list[int], width: int = 32) -> list[tuple[int, int]]:
    """Pair tool and planning steps one-to-one within prompt-length bins [k*width, (k+1)*width).

    A bin gives min(#tool, #planning) pairs: every step of the smaller side, each with the step of
    the same rank (by length) among evenly spaced ranks of the larger side, so pairs spread over the bin.
    Returns (tool index, planning index) pairs, by bin then length.
    """
    bins: dict[int, tuple[list, list]] = {}
    for side, lens in enumerate((tool_lens, plan_lens)):
        for i, n in enumerate(lens):
            bins.setdefault(n // width, ([], []))[side].append(i)
    pairs = []
    for k in sorted(bins):
        tool, plan = (sorted(ix, key=lambda i, ls=ls: (ls[i], i)) for ix, ls in zip(bins[k], (tool_lens, plan_lens)))
        small, big = (tool, plan) if len(tool) <= len(plan) else (plan, tool)
        if not small:
            continue
        picks = [big[round(r)] for r in np.linspace(0, len(big) - 1, len(small))]
        pairs += [(s, p) if small is tool else (p, s) for s, p in zip(small, picks)]
    return pairs


def pearson(x, y) -> float | None:
    """Pearson r, or None when it is undefined (fewer than 3 points, or a constant side)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x) < 3 or x.std() == 0 or y.std() == 0:
        return None
    return float(np.corrcoef(x, y)[0, 1])


def across_types(recs: list[dict], n_boot: int, width: int, seed: int) -> dict:
    """Skip differential (tool - planning, points of blocks skipped %), raw and length-matched; gate/length correlation."""
    score = np.array([np.mean(r["scores"]) for r in recs])  # an example's mean router score
    plen, kind = np.array([r["prompt_len"] for r in recs]), np.array([r["kind"] for r in recs])
    pair = np.isin(kind, PAIR)
    # Is the gate about length or about type? A router that pools padding and answer (the reference code's)
    # can follow prompt length instead of step type (results/README.md, "The defaults, per seed").
    out = {"gate_length_corr": pearson(score, plen),
           "gate_length_corr_by_type": {k: pearson(score[kind == k], plen[kind == k]) for k in dict.fromkeys(kind.tolist())},
           "gate_type_corr": pearson(score[pair], kind[pair] == "tool_call")}
    skip = lambda r: 100 * (1 - np.mean(r["gates"]))  # noqa: E731
    tool, plan = ([r for r in recs if r["kind"] == k] for k in PAIR)
    if not tool or not plan:
        out["differential"] = out["length_matched"] = None  # nothing to compare
        return out
    a, b = [skip(r) for r in tool], [skip(r) for r in plan]
    out["differential"] = {"points": float(np.mean(a) - np.mean(b)), "ci95": bootstrap_ci(a, b, n_boot, seed)}
    pairs = length_matched_pairs([r["prompt_len"] for r in tool], [r["prompt_len"] for r in plan], width)
    out["length_matched"] = paired([a[i] - b[j] for i, j in pairs], n_boot, seed) | {"bin_width": width}
    if any("cut_gates" in r for r in plan):  # tool prompts cut to planning prompts' lengths
        out["cut_matched"] = paired([skip({"gates": r["cut_gates"]}) - skip(r) for r in plan if "cut_gates" in r],
                                    n_boot, seed)
    return out


def ratio_ci(recs: list[dict], n_boot: int, seed: int) -> list[float]:
    """95% percentile interval of one type's routed / LoRA-only perplexity, resampling its steps with
    replacement (each keeps its own two NLLs and token count). Over few steps, such as a test split's
    tool calls, it says whether a ratio is known to within 5% at all."""
    rng = np.random.default_rng(seed)
    d = np.array([r["nll"]["routed"] - r["nll"]["lora"] for r in recs])
    n = np.array([r["n_target"] for r in recs])
    idx = rng.integers(0, len(recs), (n_boot, len(recs)))
    return [float(x) for x in np.percentile(np.exp(d[idx].sum(1) / n[idx].sum(1)), [2.5, 97.5])]


def mcnemar_p(lost: int, gained: int) -> float:
    """Exact two-sided McNemar test on paired right/wrong answers: the chance of a split of the
    changed answers at least this uneven if routing were as likely to fix an answer as to break it."""
    n = lost + gained
    tail = sum(math.comb(n, k) for k in range(min(lost, gained) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def broke_fixed(before: list[bool], after: list[bool]) -> tuple[int, int]:
    """Paired answers: how many were right before and wrong after, and how many the reverse."""
    return sum(a and not b for a, b in zip(before, after)), sum(b and not a for a, b in zip(before, after))


def paired(d: list[float], n_boot: int, seed: int) -> dict:
    """Mean of paired differences with its bootstrap CI (None for no pairs)."""
    return {"points": float(np.mean(d)) if d else None, "ci95": bootstrap_ci(d, None, n_boot, seed) if d else None,
            "pairs": len(d)}


@torch.no_grad()
def cut_tool_gates(model: lr.LayerRoute, recs: list[dict], tool_prompts: list[list[int]], batch_size: int,
                   pad_id: int) -> None:
    """Length control by cutting: planning record j gets "cut_gates", the routed gates of tool-call
    prompt j mod n cut to the planning prompt's length (oldest tokens dropped, as data.truncate cuts
    long steps). Same length, different type: a router that tracks length gives both the same gates.
    Records whose prompt is not shorter than that tool prompt get none."""
    plan = [r for r in recs if r["kind"] == "planning"]
    jobs = [(r, tool_prompts[j % len(tool_prompts)][-r["prompt_len"]:]) for j, r in enumerate(plan)
            if tool_prompts and r["prompt_len"] < len(tool_prompts[j % len(tool_prompts)])]
    dev = model.base.embed_tokens.weight.device
    for s in range(0, len(jobs), batch_size):
        chunk = jobs[s:s + batch_size]
        b = data.collate([(p, []) for _, p in chunk], ["tool_call"] * len(chunk), pad_id)
        with mode(model, "routed"):
            model(b.ids.to(dev), b.prompt_lens.to(dev), logits_at=torch.zeros_like(b.ids, dtype=torch.bool).to(dev))
        for j, (r, _) in enumerate(chunk):
            r["cut_gates"] = model.last_gates[j].tolist()


# ----------------------------------------------------------------------------- task accuracy

NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def parse_calls(text: str) -> list[dict] | None:
    """Every <tool_call> block as {"name", "arguments"}; None if any block is not a JSON call."""
    calls = []
    for block in data.CALL_RE.findall(text):
        try:
            obj = json.loads(block)
            args = obj["arguments"]
            args = json.loads(args) if isinstance(args, str) else args  # a JSON string is the same call
        except (json.JSONDecodeError, KeyError, TypeError):
            return None
        if not isinstance(obj.get("name"), str) or not isinstance(args, dict):
            return None
        calls.append({"name": obj["name"], "arguments": args})
    if text.count("<tool_call>") != len(calls):
        return None  # an unclosed block (generation cut off) is not a call
    return calls


def calls_match(text: str, answer: list[dict]) -> bool:
    """Same multiset of calls: names equal, arguments equal as parsed JSON (key order ignored)."""
    calls = parse_calls(text)
    key = lambda c: json.dumps({"name": c["name"], "arguments": c["arguments"]}, sort_keys=True)  # noqa: E731
    return calls is not None and sorted(map(key, calls)) == sorted(map(key, answer))


def to_number(text: str) -> float | None:
    try:
        return float(text.replace(",", "").strip())
    except ValueError:
        return None


def final_number(text: str) -> float | None:
    """GSM8K-style: the number after the last "####" if there is one, else the last number in the text."""
    head, sep, tail = text.rpartition("####")
    nums = NUMBER.findall(tail) if sep else NUMBER.findall(text)
    nums = nums[:1] if sep else nums[-1:]
    return to_number(nums[0]) if nums else None


def answer_correct(kind: str, text: str, answer) -> bool | None:
    """Whether generated text gets the step's answer; None when the answer cannot be scored
    (replies, and planning answers that are not one number, like Turing's free-text ones)."""
    if kind == "tool_call":
        return calls_match(text, answer)
    gold = to_number(answer) if kind == "planning" and isinstance(answer, str) else None
    if gold is None:
        return None
    got = final_number(text)
    return got is not None and abs(got - gold) <= 1e-6 * max(1.0, abs(gold))


@torch.no_grad()
def task_accuracy(model: lr.LayerRoute, tok, items: list[tuple[list[int], str, object]],
                  max_new_tokens: int, gen_batch: int = GEN_BATCH, modes: tuple[str, ...] = tuple(MODES)) -> tuple[dict, list[dict]]:
    """Greedy generation of each (prompt_ids, kind, scorable answer) under each of modes:
    fraction correct per mode (with n), and the generated texts for inspection."""
    acc, texts, right = {"n": len(items)}, [{} for _ in items], {}
    for name in modes:
        with mode(model, name):
            right[name], said, _ = greedy_answers(model, tok, items, max_new_tokens, gen_batch)
        for j, text in enumerate(said):
            texts[j][name] = text
        acc[name] = sum(right[name]) / len(items) if items else None
    # Paired: the same steps under both models, so what counts is which answers routing changed.
    acc["lost"], acc["gained"] = broke_fixed(right["lora"], right["routed"])
    acc["mcnemar_p"] = mcnemar_p(acc["lost"], acc["gained"])
    return acc, texts


def greedy_answers(model: lr.LayerRoute, tok, items: list[tuple[list[int], str, object]],
                   max_new_tokens: int, gen_batch: int = GEN_BATCH) -> tuple[list[bool | None], list[str], list[list]]:
    """Greedy generation of each (prompt_ids, kind, answer) in the model's current mode, gen_batch
    prompts at a time (left-padded, each row routed and decoded as it would be alone): whether each
    answer is right, the texts, and the gates each prompt was decoded with, in the items' order. The
    reference recipe's router pools the padding too, so its prompts go one at a time."""
    stop = qwen.stop_ids(model.base.cfg, tok)
    gen_batch = 1 if model.pooling == "reference" else gen_batch
    order = sorted(range(len(items)), key=lambda i: len(items[i][0]))  # similar lengths: little padding
    texts, gates = [""] * len(items), [[]] * len(items)
    for s in range(0, len(order), gen_batch):
        rows = order[s:s + gen_batch]
        for j, (i, new) in enumerate(zip(rows, qwen.generate(model, [items[i][0] for i in rows], max_new_tokens, stop))):
            texts[i] = tok.decode(new, skip_special_tokens=False)
            gates[i] = model.last_gates[j].tolist()  # the prefill's decision, which every decode step reused
    return [answer_correct(kind, text, answer) for (_, kind, answer), text in zip(items, texts)], texts, gates


# ----------------------------------------------------------------------------- latency

@torch.no_grad()
def timed_decode(model: lr.LayerRoute, ids: torch.Tensor, new_tokens: int) -> tuple[float, float]:
    """Greedy KV-cached decoding at batch 1: (prefill seconds, seconds per decoded token).
    A fixed token count, no stop token, so every model decodes the same positions."""
    sync = torch.cuda.synchronize if ids.is_cuda else (lambda: None)
    cache = model.new_cache(1, ids.shape[1] + new_tokens)
    sync()
    t0 = time.perf_counter()
    logits = model(ids, cache=cache)[:, -1]  # prefill: routed gates are decided here
    sync()
    t1 = time.perf_counter()
    for _ in range(new_tokens):
        logits = model(logits.argmax(-1)[:, None], cache=cache)[:, -1]
    sync()
    return t1 - t0, (time.perf_counter() - t1) / new_tokens


def latency(model: lr.LayerRoute, prompts: list[list[int]], new_tokens: int, repeats: int) -> dict:
    """Every block on (LoRA, gates open) vs routed, interleaved on the same prompts so that machine
    noise hits both alike; per prompt the median over repeats, then the mean over prompts."""
    dev, cfg = model.base.embed_tokens.weight.device, model.base.cfg
    ms = {"lora": [], "routed": []}  # per prompt: [prefill ms, ms per decoded token], medians over repeats
    ideal = []
    for p in prompts:
        ids = torch.tensor([p], device=dev)
        runs = {"lora": [], "routed": []}
        for r in range(repeats + 1):  # round 0 warms up (allocations, caches) and is dropped
            for name in (("lora", "routed") if r % 2 else ("routed", "lora")):
                with mode(model, name):
                    runs[name].append(timed_decode(model, ids, new_tokens))
        for name, times in runs.items():
            ms[name].append(1000 * np.median(times[1:], axis=0))
        with mode(model, "routed"):
            model(ids)
        # The ideal speed-up of these very decode positions, LM head included.
        ideal.append(flops_skipped_pct(cfg, model.last_gates[0].tolist(), len(p) + new_tokens, start=len(p)))
    (pre_full, full), (pre_routed, routed) = (np.mean(ms[m], axis=0).tolist() for m in ("lora", "routed"))
    return {"ms_per_token_full": full, "ms_per_token_routed": routed, "speedup": full / routed,
            "ideal_speedup": 1 / (1 - float(np.mean(ideal)) / 100),
            "prefill_ms_full": pre_full, "prefill_ms_routed": pre_routed,
            "prompts": len(prompts), "new_tokens": new_tokens, "repeats": repeats}


# ----------------------------------------------------------------------------- one run

def pick(steps: list[data.Step], split: str, n: int | None, seed: int) -> dict[str, list[data.Step]]:
    """Steps of the split per kind, in a seeded shuffle of their id order, capped at n per kind."""
    out = {}
    for kind in data.KINDS:
        chosen = sorted((s for s in steps if s.kind == kind and split in ("all", s.split)), key=lambda s: s.id)
        random.Random(seed).shuffle(chosen)
        if chosen:
            out[kind] = chosen[:n]
    return out


def evaluate(model: lr.LayerRoute, tok, by_kind: dict[str, list[data.Step]], args) -> tuple[dict, list[dict]]:
    """The report of one run, and its per-example records."""
    cfg = model.base.cfg
    enc = {k: [data.encode(s, tok, args.max_len) for s in ss] for k, ss in by_kind.items()}
    examples = [(p, t, k) for k, pts in enc.items() for p, t in pts]
    pad = data.pad_id(tok)
    t0 = time.time()
    modes = tuple(MODES) if args.base else ("lora", "routed")
    recs = teacher_forced(model, examples, args.batch_size, pad, args.max_len if model.pooling == "reference" else None,
                          modes)
    print(f"teacher-forced: {len(recs)} steps x {len(modes)} models in {time.time() - t0:.0f} s", file=sys.stderr)
    steps = [s for ss in by_kind.values() for s in ss]
    for r, s in zip(recs, steps):
        r["id"] = s.id
    if model.pooling == "prompt":  # (the reference recipe's gates also depend on padding and answer)
        cut_tool_gates(model, recs, [p for p, _ in enc.get("tool_call", [])], args.batch_size, pad)
    report = {"types": {}, "latency": {}, "generations": {}}
    for kind in by_kind:
        report["types"][kind] = type_summary(cfg, [r for r in recs if r["kind"] == kind], args.bootstrap, args.seed)
        # Generation: the first gen_n steps whose answer can be scored (replies and free text cannot).
        scored = [(p, s) for (p, _), s in zip(enc[kind], by_kind[kind])
                  if answer_correct(kind, "", s.answer) is not None][:args.gen_n]
        if scored:
            t0 = time.time()
            acc, texts = task_accuracy(model, tok, [(p, kind, s.answer) for p, s in scored], args.max_new_tokens,
                                       args.gen_batch, modes)
            if kind == "tool_call":  # a call is right when every token is: forced_exact says the same
                forced = {r["id"]: r["wrong"] for r in recs}
                acc["forced_agree"] = sum((forced[s.id][m] == 0) == answer_correct(kind, t[m], s.answer)
                                          for (_, s), t in zip(scored, texts) for m in ("lora", "routed"))
            report["types"][kind]["task_accuracy"] = acc
            report["generations"][kind] = [{"id": s.id, "answer": s.answer, **t} for (_, s), t in zip(scored, texts)]
            print(f"{kind}: generated {acc['n']} x {len(modes)} in {time.time() - t0:.0f} s", file=sys.stderr)
        if args.latency_n and kind in PAIR:  # timing is slow on a CPU: the two types compared
            prompts = [p for p, _ in enc[kind][:args.latency_n]]
            report["latency"][kind] = latency(model, prompts, args.latency_tokens, args.latency_repeats)
    report.update(across_types(recs, args.bootstrap, args.bin_width, args.seed))
    return report, recs


# ----------------------------------------------------------------------------- output

def fmt(x, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def print_table(report: dict, out=None):
    out = out or sys.stdout  # looked up at call time (redirections, pytest's capture)
    print(f"{'type':10}{'n':>6}{'blocks%':>9}{'FLOPs%':>8}{'ppl base':>10}{'lora':>8}{'routed':>8}"
          f"{'acc base':>10}{'lora':>6}{'routed':>7}{'(gen n)':>8}{'ms/tok full':>13}{'routed':>8}"
          f"{'speedup':>9}{'ideal':>7}", file=out)
    for kind, t in report["types"].items():
        a = t.get("task_accuracy", {})
        lat = report["latency"].get(kind, {})
        # the perplexities are spaced apart: an untrained model's have six digits
        print(f"{kind:10}{t['n']:>6}{t['blocks_skipped_pct']:>9.2f}{t['flops_skipped_pct']:>8.2f}"
              f" {fmt(t['ppl_base'], '.3f'):>9} {t['ppl_lora']:>7.3f} {t['ppl_routed']:>7.3f}"
              f"{fmt(a.get('base')):>10}{fmt(a.get('lora')):>6}{fmt(a.get('routed')):>7}{fmt(a.get('n'), 'd'):>8}"
              f"{fmt(lat.get('ms_per_token_full'), '.1f'):>13}{fmt(lat.get('ms_per_token_routed'), '.1f'):>8}"
              f"{fmt(lat.get('speedup'), '.3f'):>9}{fmt(lat.get('ideal_speedup'), '.3f'):>7}", file=out)
    for kind, t in report["types"].items():  # what routing costs each type, and how well that is known
        lo, hi = t["ppl_routed_vs_lora_ci95"]
        line = f"{kind}: routed / LoRA-only perplexity x{t['ppl_routed_vs_lora']:.3f}, 95% CI [{lo:.3f}, {hi:.3f}]"
        a = t.get("task_accuracy")
        if a:
            line += (f"; of {a['n']} answers routing broke {a['lost']}, fixed {a['gained']}"
                     f" (McNemar p {a['mcnemar_p']:.3f})")
        e = t["forced_exact"]
        line += (f"; teacher-forced exact base / LoRA-only / routed {fmt(e.get('base'))} / {e['lora']:.2f} / "
                 f"{e['routed']:.2f} (routing broke {e['broke']}, fixed {e['fixed']})")
        if a and "forced_agree" in a:
            line += f", greedy and teacher-forced exact agree on {a['forced_agree']} of {2 * a['n']}"
        print(line, file=out)
    for key, label in (("differential", "skip differential (tool - planning, blocks)"),
                       ("length_matched", "length-matched ({pairs} pairs, bins of {bin_width} prompt tokens)"),
                       ("cut_matched", "cut-matched (tool prompts cut to each planning prompt's length, {pairs} pairs)")):
        d = report.get(key)
        if d:
            ci = f"[{d['ci95'][0]:+.2f}, {d['ci95'][1]:+.2f}]" if d["ci95"] else "-"
            print(f"{label.format(**d)}: {fmt(d['points'], '+.2f')} points, 95% CI {ci}", file=out)
    print(f"corr(mean gate score, prompt length): {fmt(report.get('gate_length_corr'), '+.3f')}; "
          f"corr(score, is tool call): {fmt(report.get('gate_type_corr'), '+.3f')}", file=out)
    if report["latency"]:
        print("(latency: batch 1, KV cache, greedy; 'full' = LoRA with every block on; "
              f"on {report['settings']['device']} absolute ms are only indicative)", file=out)


def plot_name(report: dict) -> str:
    """The run folder's name and, when it is not the test split, the split."""
    st = report["settings"]
    split = "" if st.get("split", "test") == "test" else f" ({st['split']} split)"
    return os.path.basename(os.path.normpath(st.get("run_dir") or "run")) + split


def figures(report: dict, recs: list[dict]) -> dict:
    """{file suffix: matplotlib figure}: per-layer skip rate per type (bars, 0-100% whatever the data) and
    gate score vs prompt length (scatter, with the gate threshold)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    name, threshold = plot_name(report), report["settings"]["threshold"]
    types = list(report["types"])
    L = len(report["types"][types[0]]["per_layer_skip_pct"])
    bars, ax = plt.subplots(figsize=(max(6, L * 0.3), 3.5))
    w = 0.8 / len(types)
    for k, kind in enumerate(types):
        ax.bar(np.arange(L) + (k - (len(types) - 1) / 2) * w, report["types"][kind]["per_layer_skip_pct"], w, label=kind)
    sublayer = report["settings"].get("run", {}).get("gate_unit") == "sublayer"
    unit = "gate: block i's attention is 2i, its MLP 2i + 1" if sublayer else "block"
    ax.set(xlabel=unit, ylabel="skipped (% of steps)", ylim=(0, 100),
           title=f"{name}: per-layer skip rate, gate threshold {threshold:g}")
    ax.legend()
    bars.tight_layout()
    scatter, ax = plt.subplots(figsize=(6, 4))
    for kind in types:
        rs = [r for r in recs if r["kind"] == kind]
        ax.scatter([r["prompt_len"] for r in rs], [np.mean(r["scores"]) for r in rs], s=8, alpha=0.6, label=kind)
    ax.axhline(threshold, color="gray", lw=0.8, ls="--", label=f"gate threshold {threshold:g}")
    ax.set(xlabel="prompt length (tokens)", ylabel="mean router score over blocks", ylim=(0, 1),
           title=f"{name}: gate vs length (r = {fmt(report.get('gate_length_corr'), '+.2f')})")
    ax.legend()
    scatter.tight_layout()
    return {"_per_layer.png": bars, "_gate_vs_length.png": scatter}


def plot(report: dict, recs: list[dict], stem: str) -> list[str]:
    """The figures as PNGs beside the report: their paths."""
    import matplotlib.pyplot as plt
    paths = []
    for suffix, fig in figures(report, recs).items():
        fig.savefig(stem + suffix, dpi=120)
        plt.close(fig)
        paths.append(stem + suffix)
    return paths


# ----------------------------------------------------------------------------- several seeds

NOT_AGGREGATED = ("settings", "generations", "examples")


def flatten(obj, prefix: str = "") -> dict[str, float]:
    """Numeric leaves as {"types.tool_call.ppl_base": x, "types.planning.per_layer_skip_pct.3": y}."""
    if isinstance(obj, dict):
        items = ((k, v) for k, v in obj.items() if not (prefix == "" and k in NOT_AGGREGATED))
    elif isinstance(obj, list):
        items = enumerate(obj)
    else:
        ok = isinstance(obj, (int, float)) and not isinstance(obj, bool)
        return {prefix: float(obj)} if ok else {}
    return {k: v for key, val in items for k, v in flatten(val, f"{prefix}.{key}" if prefix else str(key)).items()}


def aggregate(reports: list[dict]) -> dict:
    """Mean and sample std (ddof 1) of every numeric leaf across runs, and in how many runs the
    differential (raw, length-matched, cut-matched) is positive."""
    flats = [flatten(r) for r in reports]
    keys = list(dict.fromkeys(k for f in flats for k in f))
    stats = {}
    for k in keys:
        v = np.array([f[k] for f in flats if k in f])
        stats[k] = {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "n": len(v)}
    pooled = {}  # answers broken / fixed by routing, summed over runs: one test where each run has few steps
    for r in reports:
        for kind, t in r["types"].items():
            if "lost" in t.get("task_accuracy", {}):
                p = pooled.setdefault(kind, {"runs": 0, "n": 0, "lost": 0, "gained": 0})
                for k in ("n", "lost", "gained"):
                    p[k] += t["task_accuracy"][k]
                p["runs"] += 1
    for p in pooled.values():
        p["mcnemar_p"] = mcnemar_p(p["lost"], p["gained"])
    positive = lambda sec: sum(bool(r.get(sec) and (r[sec]["points"] or 0) > 0) for r in reports)  # noqa: E731
    return {"runs": len(reports), "differential_positive": positive("differential"),
            "length_matched_positive": positive("length_matched"), "cut_matched_positive": positive("cut_matched"),
            "answers_pooled": pooled, "stats": stats}


def read_report(run: str) -> dict:
    path = os.path.join(run, "report.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no report; run `python eval.py --run {run}` first")
    with open(path) as f:
        return json.load(f)


# ----------------------------------------------------------------------------- CLI

def kinds_list(text: str) -> list[str]:
    kinds = text.split(",")
    if not kinds or any(k not in data.KINDS for k in kinds):
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated types of {', '.join(data.KINDS)}")
    return kinds


def parser() -> argparse.ArgumentParser:
    p = qwen.Parser(description="Evaluate LayerRoute runs (skip rates, FLOPs, perplexity, accuracy, speed).")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--run", help="a run folder written by train.py")
    which.add_argument("--runs", nargs="+", help="several run folders (seeds), each with report.json: aggregate them")
    p.add_argument("--data-dir", help="data to evaluate on (default: the run's own --data-dir)")
    p.add_argument("--split", default="test", choices=["test", "val", "train", "all"], help="'all': every step "
                   "(held-out collections); train: rows LoRA trained on, to see what fitting them hides")
    p.add_argument("--n", type=qwen.number(int, lo=1), help="at most this many steps per type (default: all of the split)")
    p.add_argument("--kinds", type=kinds_list, default=",".join(data.KINDS), help="comma-separated step types to "
                   "evaluate (the differential needs tool_call and planning)")
    p.add_argument("--base", action=argparse.BooleanOptionalAction, default=True, help="also evaluate the base "
                   "model (LoRA off, every block on); --no-base leaves it out, a third less work")
    p.add_argument("--gen-n", type=qwen.number(int, lo=0), default=20, help="steps per type to generate for task accuracy "
                   "(0: none; generation is most of the time on a CPU)")
    p.add_argument("--max-new-tokens", type=qwen.number(int, lo=1), default=256, help="generation length cap for task accuracy")
    p.add_argument("--gen-batch", type=qwen.number(int, lo=1), default=GEN_BATCH, help="prompts generated together "
                   "for task accuracy, left-padded (1: one at a time)")
    p.add_argument("--latency-n", type=qwen.number(int, lo=0), default=5, help="prompts per type to time (0: no timing)")
    p.add_argument("--latency-tokens", type=qwen.number(int, lo=1), default=64, help="tokens decoded per timed generation")
    p.add_argument("--latency-repeats", type=qwen.number(int, lo=1), default=3, help="timed repeats per prompt and model")
    p.add_argument("--threshold", type=qwen.number(float, above=0, below=1), default=0.5, help="a gate opens when its router's score is above "
                   "this; training uses 0.5, lower closes only the surest skips (bench/threshold.py sweeps it)")
    p.add_argument("--batch-size", type=qwen.number(int, lo=1), default=4, help="rows per teacher-forced batch")
    p.add_argument("--max-len", type=qwen.number(int, lo=8), help="tokens per step: longer planning and reply "
                   "steps lose their oldest prompt tokens, longer tool calls are dropped and counted (default: the run's)")
    p.add_argument("--bootstrap", type=qwen.number(int, lo=1), default=1000, help="bootstrap resamples for the CIs")
    p.add_argument("--bin-width", type=qwen.number(int, lo=1), default=32, help="prompt-length bin width for length matching")
    p.add_argument("--seed", type=qwen.number(int, lo=0), default=0, help="seed of the step sample and the bootstrap")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weights dtype")
    p.add_argument("--threads", type=qwen.number(int, lo=1), help="CPU threads for torch (default: torch's; 1 is faster on a busy machine)")
    p.add_argument("--out", help="report path (default: RUN/report.json; with --runs, aggregate.json beside the "
                   "runs)")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    return parser().parse_args(argv)


def check_writable(path: str):
    """Fail now, naming the place, if the report could not be written there after the work."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder}: no such folder")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise OSError(f"{path}: cannot write there ({e.strerror}): pass --out somewhere writable") from None


def main(argv=None) -> dict:
    args = parse_args(argv)
    qwen.set_attention_backends()
    if args.runs:
        agg = aggregate([read_report(r) for r in args.runs])
        agg["run_dirs"] = [os.path.abspath(r) for r in args.runs]
        out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.runs[0])), "aggregate.json")
        check_writable(out)
        print(f"{agg['runs']} runs; differential > 0 in {agg['differential_positive']}, "
              f"length-matched > 0 in {agg['length_matched_positive']}, cut-matched > 0 in {agg['cut_matched_positive']}")
        for kind, p in agg["answers_pooled"].items():
            print(f"  {kind}: over {p['runs']} runs, of {p['n']} answers routing broke {p['lost']}, "
                  f"fixed {p['gained']} (McNemar p {p['mcnemar_p']:.4f})")
        for k, s in agg["stats"].items():
            if "per_layer" not in k:
                print(f"  {k:50} {s['mean']:10.4f} +- {s['std']:.4f}  (n={s['n']})")
        lr.write_json(out, agg, indent=1)
        print(f"wrote {out}", file=sys.stderr)
        return agg
    out = args.out or os.path.join(args.run, "report.json")
    check_writable(out)  # before the work, not after it
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok, run = lr.load_run(args.run, args.device, getattr(torch, args.dtype))
    model.threshold = args.threshold
    if tok is None:
        raise ValueError(f"{args.run}: trained with --random-init on synthetic batches: no steps to evaluate")
    args.max_len = args.max_len or run["max_len"]
    data_dir = args.data_dir or run.get("data_dir")
    steps, summary = data.load_steps(data_dir)
    steps, dropped = data.fitting(steps, tok, args.max_len)
    summary["too_long"] = {"max_len": args.max_len, "dropped": dropped}
    print(data.skip_report(summary), file=sys.stderr)
    by_kind = {k: ss for k, ss in pick(steps, args.split, args.n, args.seed).items() if k in args.kinds}
    if not by_kind:
        raise ValueError(f"{data_dir}: no {'/'.join(args.kinds)} steps in split '{args.split}'")
    report, recs = evaluate(model, tok, by_kind, args)
    report["settings"] = {**{k: v for k, v in vars(args).items() if k != "runs"}, "data_dir": data_dir,
                          "run_dir": os.path.abspath(args.run), "too_long": summary["too_long"],
                          "device": f"{args.device} ({torch.get_num_threads()} threads)" if args.device == "cpu" else args.device,
                          "run": {k: run.get(k) for k in ("model", "seed", "step", "steps", "max_len", "gate_grad",
                                                          "gate_unit", "gate_lambda", "price", "flips", "cost", "margin", "router_only")}}
    report["examples"] = [{k: r[k] for k in ("id", "kind", "prompt_len", "length", "n_target", "nll", "wrong", "gates", "scores")}
                          for r in recs]
    print_table(report)  # first: a write that fails loses no result
    lr.write_json(out, report, indent=1)
    pngs = plot(report, recs, os.path.splitext(out)[0])
    print(f"wrote {out}, {', '.join(pngs)}", file=sys.stderr)
    return report


if __name__ == "__main__":
    qwen.cli(main)
