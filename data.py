"""Agentic data: the paper's four sources (or your own files) -> typed steps -> length-grouped batches.

Pipeline, top to bottom:
  files (downloaded from the hub, or found in --data-dir by the shape of their records)
  -> a reader per format turns a record into messages [{role, content, calls}] plus a tool list
  -> rendered in Qwen2.5's own chat template (ChatML, tools in the system turn, <tool_call> JSON)
  -> one Step per assistant turn: prompt = everything before it, target = the turn + <|im_end|>
  -> encode / truncate / collate into Batches that train.py and eval.py consume.

Decisions:
- Kinds. `tool_call`: the assistant turn emits at least one call. `planning`: a gsm8k or Turing
  answer (reasoning). `reply`: a plain-text assistant turn in a tool dataset ("Sure, which
  ingredients?", the summary after a tool result). Replies are kept for the LM loss, because they
  are real turns of the conversations the calls live in, but are reported as their own type and
  never counted as tool_call or planning: they are neither a structured call nor a reasoning step,
  and counting them on either side would blur the skip differential we measure.
- Hermes system prompts embed their own tool list and Python-dict call instructions. We parse the
  tools out and render them Qwen's way; the system text kept is what precedes `<tools>` (the task
  framing), the hermes call-format text after it is dropped (Qwen's tool block says the same).
- Hermes json-mode files are not downloaded: their answers fill a JSON schema in plain text, no call
  is made. Found in --data-dir they read as hermes, and their turns become `reply` steps.
- gsm8k targets drop the `<<48/2=24>>` calculator annotations (an artefact of how the data was
  collected, not text a model should learn to write); the final `#### N` line stays.
- Splits: gsm8k keeps its own (test file -> test; train file -> train, with 5% of it as val so tuning
  never touches test; the test file has `test` as a whole word of its name: test.jsonl,
  main_test.jsonl, test-00000-of-00001.parquet, not latest.jsonl). A conversation that makes calls
  splits by function: each called name hashes (sha256 of "function:name", whatever the source) to
  train, val or test (60/10/30), and the conversation goes where its functions do, so no function
  called in a test step is called in a train or val step (a test call then measures skill, not memory
  of that function). One whose functions fall in different splits is skipped and counted. The test
  share is 30% because a few functions carry many calls (bfcl-live's Movies_3_FindMovies 94 of 1,311)
  and most long tool lists do not fit the training length: at 30% the test split still holds over
  100 calls that fit 512 tokens (results/README.md, "Tool-call test split by function"). Every other
  conversation splits 80/10/10 by sha256 of "source:record_id". Either way a conversation (all its
  steps) lives in exactly one split, the same on every machine.
- Length: a tool-call step whose prompt and target do not fit the training length is dropped and
  counted (`fitting`), never cut: cutting drops the oldest tokens, the system turn with the tool list
  first, and a call cannot be learnt or scored without the names and schemas it must copy. Planning
  and reply steps are cut (`truncate`): a planning prompt loses its system turn before its question,
  and a reply reads the tool results and the conversation, which are nearest the end.
- Caps: at most `max_records` records per source (default 20,000: glaive-v2 has ~113k), chosen by a
  hash of their id (not by file order, and with a salt of its own so the cap does not bias splits).
- A malformed record is skipped whole (later turns' prompts depend on it) and counted per source and
  reason; the first record hit by each reason is named (file#index) in the summary. A bad byte,
  integer, nesting or cut costs the records it is in, never the rest of their file: each JSON line is
  decoded and parsed on its own, a JSON array one element at a time.
"""
from __future__ import annotations

import ast
import hashlib
import json
import os
import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

import qwen

KINDS = ("tool_call", "planning", "reply")
SPLITS = ("train", "val", "test")
PLANNING_SOURCES = ("gsm8k", "turing")
MAX_RECORDS = 20_000
GSM8K_VAL_SHARE = 0.05
# Qwen2.5-0.5B-Instruct's chat_template, word for word (tokenizer_config.json).
DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
TOOLS_HEAD = ("\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
              "You are provided with function signatures within <tools></tools> XML tags:\n<tools>")
TOOLS_TAIL = ("\n</tools>\n\nFor each function call, return a json object with function name and "
              "arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
              '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')
# What load_steps(None) downloads: (source, hub dataset, file). gsm8k's test file comes first so
# that a question duplicated in train is dropped there, not in test.
HUB_FILES = [
    ("hermes", "NousResearch/hermes-function-calling-v1", "func-calling-singleturn.json"),
    ("hermes", "NousResearch/hermes-function-calling-v1", "func-calling.json"),
    ("hermes", "NousResearch/hermes-function-calling-v1", "glaive-function-calling-5k.json"),
    ("glaive", "glaiveai/glaive-function-calling-v2", "glaive-function-calling-v2.json"),
    ("gsm8k", "openai/gsm8k", "main/test-00000-of-00001.parquet"),
    ("gsm8k", "openai/gsm8k", "main/train-00000-of-00001.parquet"),
    ("turing", "TuringEnterprises/Turing-Open-Reasoning", "Computational_STEM_QA_Dataset.json"),
]


@dataclass
class Step:
    id: str       # f"{source}:{record_id}:{assistant turn number}", stable across runs
    source: str   # hermes | glaive | gsm8k | turing | sharegpt | openai
    kind: str     # one of KINDS
    split: str    # train | val | test
    prompt: str   # ChatML of everything before the turn, ending "<|im_start|>assistant\n"
    target: str   # the turn's rendered content + "<|im_end|>"
    answer: object  # tool_call: [{"name", "arguments"}]; planning: final answer str; reply: None


class Skip(Exception):
    """A malformed record; the message is the reason counted in the summary (keep it generic)."""


# ---- JSON that cannot stop a load: every parse in this file goes through _decode ----

TOO_LONG = object()  # stands for an integer past Python's digit limit, so its record can be skipped
MAX_DEPTH = 100  # deeper values are skipped: nothing real nests so deep, and json.dumps of one could
                 # hit Python's recursion limit later, when the record is hashed or rendered
SURROGATE = re.compile("[\ud800-\udfff]")  # a byte that is not UTF-8 (surrogateescape), or a lone \ud800


def _int(digits: str):
    """json's parse_int: an integer past the digit limit (4,300) is a marker, not a ValueError that
    would end the whole file."""
    try:
        return int(digits)
    except ValueError:
        return TOO_LONG


SPACES = re.compile(r"\s*")
STRICT = json.JSONDecoder(parse_int=_int)  # records: a raw control character in a string is an error
LENIENT = json.JSONDecoder(strict=False, parse_int=_int)  # text inside records: raw newlines occur


def _flaw(value) -> str | None:
    """Why a parsed value is unusable (a string that is not UTF-8, an integer too long, nesting too
    deep), or None. A loop, not recursion, so depth alone cannot break it."""
    stack = [(value, 0)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_DEPTH:
            return "nested too deeply"
        if value is TOO_LONG:
            return "integer too long"
        if isinstance(value, str) and SURROGATE.search(value):
            return "not UTF-8"  # the tokenizer would raise on it mid-run
        if isinstance(value, dict):
            stack += [(v, depth + 1) for kv in value.items() for v in kv]
        elif isinstance(value, list):
            stack += [(v, depth + 1) for v in value]
    return None


def _decode(decoder: json.JSONDecoder, text: str, start: int = 0) -> tuple[object, int]:
    """The JSON value at text[start:] and where it ends. A value that parses but is unusable, or
    nests past the recursion limit, raises Skip with the reason; bad syntax stays a JSONDecodeError."""
    try:
        value, end = decoder.raw_decode(text, start)
    except RecursionError:
        raise Skip("nested too deeply") from None
    if reason := _flaw(value):
        raise Skip(reason)
    return value, end


def _loads_json(decoder: json.JSONDecoder, text: str):
    """json.loads through _decode: one value, nothing but whitespace after it."""
    value, end = _decode(decoder, text, SPACES.match(text).end())
    if SPACES.match(text, end).end() != len(text):
        raise json.JSONDecodeError("Extra data", text, end)
    return value


# ---- parsing the awkward bits: Python-dict calls, quoted-string arguments, concatenated JSON ----

def _loads(text: str, what: str):
    """JSON, else a Python literal (hermes writes {'name': ..., 'flag': True}); never eval."""
    try:
        return _loads_json(LENIENT, text)  # lenient: raw newlines inside strings occur
    except json.JSONDecodeError:
        pass
    try:
        value = ast.literal_eval(text.strip())
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        raise Skip(f"{what} is neither JSON nor a Python literal") from None
    if reason := _flaw(value):
        raise Skip(reason)
    return value


def _values(text: str, what: str) -> list:
    """One value, or several JSON objects written one after another (glaive's system prompt)."""
    try:
        value = _loads(text, what)
        return value if isinstance(value, list) else [value]
    except Skip:
        pass
    out, i = [], 0
    while (i := SPACES.match(text, i).end()) < len(text):
        try:
            value, i = _decode(LENIENT, text, i)
        except json.JSONDecodeError:
            raise Skip(f"{what} is neither JSON nor a Python literal") from None
        out.append(value)
    return out


def _named(obj, what: str) -> dict:
    """obj, or the dict under its "function" key (OpenAI's wrapping); either way it needs a name."""
    if isinstance(obj, dict) and isinstance(obj.get("function"), dict):
        obj = obj["function"]
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        raise Skip(f"{what} has no name")
    return obj


def _call(obj) -> dict:
    """Normalise a call to {"name": str, "arguments": dict}."""
    obj = _named(obj, "tool call")
    args = obj.get("arguments", {})
    if isinstance(args, str):  # glaive and OpenAI write the arguments as a JSON string
        args = _loads(args, "tool call arguments") if args.strip() else {}
    if not isinstance(args, dict):
        raise Skip("tool call arguments are not an object")
    return {"name": obj["name"], "arguments": args}


def _tools(value) -> list[dict]:
    """A tool list as sources write it: a list, one object, or a JSON/Python string of either."""
    if isinstance(value, str):
        value = _values(value, "tool list") if value.strip() else []
    return [_named(t, "tool definition") for t in (value if isinstance(value, list) else [value])]


def _msg(role: str, content, calls: list | None = None) -> dict:
    if not isinstance(content, str):
        raise Skip(f"{role} turn content is not text")
    return {"role": role, "content": content.strip(), "calls": calls or []}


def _field(rec: dict, key: str, kind: type):
    if not isinstance(rec.get(key), kind):
        raise Skip(f"missing or non-{kind.__name__} field '{key}'")
    return rec[key]


# ---- one reader per native format: record -> (messages, tools, final answer or None) ----

TOOLS_RE = re.compile(r"<tools>(.*?)</tools>", re.S)
CALL_RE = re.compile(r"<tool_call>(.*?)</tool_call>", re.S)
RESPONSE_RE = re.compile(r"<tool_response>(.*?)</tool_response>", re.S)
GLAIVE_TURN = re.compile(r"(?:^|\n)[ \t]*(USER|ASSISTANT|FUNCTION RESPONSE):[ \t]?")
GLAIVE_CALL = re.compile(r"""\{\s*"name"\s*:\s*"([^"]*)"\s*,\s*"arguments"\s*:\s*'(.*)'\s*\}""", re.S)
CALCULATOR = re.compile(r"<<[^<>]*>>")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant", "observation": "tool", "tool": "tool"}


def _turns(rec: dict) -> Iterator[tuple[str, str]]:
    for turn in _field(rec, "conversations", list):
        if not (isinstance(turn, dict) and isinstance(turn.get("from"), str)
                and isinstance(turn.get("value"), str)):
            raise Skip("turn without 'from'/'value' strings")
        yield turn["from"], turn["value"]


def read_hermes(rec: dict):
    msgs, tools = [], []
    for role, value in _turns(rec):
        if role == "system" and (m := TOOLS_RE.search(value)):
            tools = _tools(m.group(1))
            msgs.append(_msg("system", value[:m.start()]))  # keep the framing, drop hermes' format text
        elif role in ("system", "human"):
            msgs.append(_msg("system" if role == "system" else "user", value))
        elif role == "gpt":
            calls = [_call(_loads(c, "tool call")) for c in CALL_RE.findall(value)]
            if "<tool_call>" in (text := CALL_RE.sub("", value)):
                raise Skip("unclosed <tool_call>")
            msgs.append(_msg("assistant", text, calls))
        elif role == "tool":  # one message per <tool_response> block; they share a user turn
            msgs += [_msg("tool", r) for r in RESPONSE_RE.findall(value) or [value]]
        else:
            raise Skip("unknown turn role")
    return msgs, tools, None


def read_sharegpt(rec: dict):
    msgs = [_msg("system", rec["system"])] if rec.get("system") else []
    for role, value in _turns(rec):
        if role == "function_call":  # a list of calls is how sharegpt writes parallel calls
            calls = _values(value, "tool call")
            msgs.append(_msg("assistant", "", [_call(c) for c in calls]))
        elif role in SHAREGPT_ROLES:
            msgs.append(_msg(SHAREGPT_ROLES[role], value))
        else:
            raise Skip("unknown turn role")
    return msgs, _tools(rec.get("tools") or []), None


def read_glaive(rec: dict):
    system = _field(rec, "system", str).strip().removeprefix("SYSTEM:").strip()
    head, brace, functions = system.partition("\n{")  # signatures follow as pretty-printed JSON
    tools = _tools(brace.strip() + functions)
    msgs = [_msg("system", head.strip().removesuffix("-"))]
    parts = GLAIVE_TURN.split(_field(rec, "chat", str))
    if parts[0].strip():
        raise Skip("chat text before the first USER/ASSISTANT marker")
    for role, text in zip(parts[1::2], parts[2::2]):
        text = text.replace("<|endoftext|>", "")
        if role == "ASSISTANT":
            content, tag, call = text.partition("<functioncall>")
            msgs.append(_msg("assistant", content, [_glaive_call(call)] if tag else []))
        else:
            msgs.append(_msg("user" if role == "USER" else "tool", text))
    return msgs, tools, None


def _glaive_call(text: str) -> dict:
    """glaive writes {"name": "f", "arguments": '{...}'}: JSON outside, a quoted JSON string inside."""
    if m := GLAIVE_CALL.fullmatch(text.strip()):
        return _call({"name": m.group(1), "arguments": m.group(2)})
    return _call(_loads(text, "tool call"))


def read_openai(rec: dict):
    msgs = [chat_message(m) for m in _field(rec, "messages", list)]
    return [{**m, "content": m["content"].strip()} for m in msgs], _tools(rec.get("tools") or []), None


def read_gsm8k(rec: dict):
    question, answer = _field(rec, "question", str), _field(rec, "answer", str)
    if "####" not in answer:
        raise Skip("answer has no '#### N' line")
    final = answer.rsplit("####", 1)[1].strip().replace(",", "")
    return [_msg("user", question), _msg("assistant", CALCULATOR.sub("", answer))], [], final


def read_turing(rec: dict):
    question, answer = _field(rec, "question", str), _field(rec, "answer", str)
    if not answer.strip():
        raise Skip("empty answer")
    return [_msg("user", question), _msg("assistant", answer)], [], answer.strip()


READERS = {"hermes": read_hermes, "glaive": read_glaive, "sharegpt": read_sharegpt,
           "openai": read_openai, "gsm8k": read_gsm8k, "turing": read_turing}


def sniff(rec) -> str | None:
    """Which format a record is in, from its keys alone (so a folder of files just works)."""
    if not isinstance(rec, dict):
        return None
    if isinstance(rec.get("conversations"), list):
        roles = {t.get("from") for t in rec["conversations"] if isinstance(t, dict)}
        hermes = "tools" not in rec and roles <= {"system", "human", "gpt", "tool"}
        return "hermes" if hermes else "sharegpt"
    if isinstance(rec.get("messages"), list):
        return "openai"
    if "system" in rec and "chat" in rec:
        return "glaive"
    if {"question", "answer", "conversation_id"} <= rec.keys():
        return "turing"
    if {"question", "answer"} <= rec.keys() and "####" in str(rec["answer"]):
        return "gsm8k"
    return None


# ---- rendering: Qwen2.5's chat template, turn by turn ----

def render_system(system: str | None, tools: list[dict]) -> str:
    text = DEFAULT_SYSTEM if system is None else system
    if tools:  # one {"type": "function", ...} per line; json.dumps = the template's tojson
        lines = "".join("\n" + json.dumps({"type": "function", "function": t}, ensure_ascii=False)
                        for t in tools)
        text += TOOLS_HEAD + lines + TOOLS_TAIL
    return f"<|im_start|>system\n{text}<|im_end|>\n"


def render_assistant(content: str, calls: list[dict]) -> str:
    """The turn's body (after "<|im_start|>assistant\\n"): text, then one block per call."""
    blocks = [f'<tool_call>\n{{"name": "{c["name"]}", "arguments": '
              f'{json.dumps(c["arguments"], ensure_ascii=False)}}}\n</tool_call>' for c in calls]
    return "\n".join([content] * bool(content) + blocks)


def render_turn(msgs: list[dict], i: int) -> str:
    """Message i (not a leading system turn: render_system writes that) as the template writes it."""
    m = msgs[i]
    if m["role"] == "tool":  # consecutive tool results share one user turn
        first = i == 0 or msgs[i - 1]["role"] != "tool"
        last = i + 1 == len(msgs) or msgs[i + 1]["role"] != "tool"
        return (("<|im_start|>user" if first else "") + f"\n<tool_response>\n{m['content']}\n</tool_response>"
                + ("<|im_end|>\n" if last else ""))
    if m["role"] == "assistant":
        return f"<|im_start|>assistant\n{render_assistant(m['content'], m['calls'])}<|im_end|>\n"
    return f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n"  # user, or a system turn after the first


def render_messages(msgs: list[dict], tools: list[dict], add_generation_prompt: bool = False) -> str:
    """Messages as the readers give them ({role, content, calls}) -> the model's text."""
    start = int(bool(msgs) and msgs[0]["role"] == "system")
    text = render_system(msgs[0]["content"] if start else None, tools)
    text += "".join(render_turn(msgs, i) for i in range(start, len(msgs)))
    return text + "<|im_start|>assistant\n" * add_generation_prompt


def chat_message(m) -> dict:
    """One OpenAI chat message -> {role, content, calls, kind}, its text as given."""
    if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant", "tool"):
        raise Skip("unknown message role")
    content = m.get("content") or ""
    if isinstance(content, list):  # content parts: keep the text ones
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    if not isinstance(content, str):
        raise Skip(f"{m['role']} message content is not text")
    role = "system" if m["role"] == "developer" else m["role"]  # OpenAI's newer name for the system turn
    calls = m.get("tool_calls") or []
    if not isinstance(calls, list):
        raise Skip("tool_calls is not a list")
    return {"role": role, "content": content, "calls": [_call(c) for c in calls], "kind": stated_kind(m, "message")}


def render(messages: list[dict], tools: list[dict] | None = None, add_generation_prompt: bool = False) -> str:
    """A conversation in Qwen2.5-Instruct's chat template, as transformers' apply_chat_template writes it.

    messages: OpenAI chat messages (system/developer, user, assistant with optional tool_calls, tool).
    tools: OpenAI tool definitions ({"type": "function", "function": {...}}) or bare function dicts.
    add_generation_prompt: end with "<|im_start|>assistant\\n", for the model to write the next turn.
    A call's arguments sent as a JSON string (as OpenAI clients do) are parsed first: the template
    and the training data write them as an object. Raises ValueError naming what is malformed.
    """
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list")
    try:
        return render_messages([chat_message(m) for m in messages], _tools(tools or []), add_generation_prompt)
    except Skip as e:
        raise ValueError(str(e)) from None


def stated_kind(rec: dict, where: str = "record") -> str | None:
    """A record's (or message's) own step type, `"step_type": "planning"`: a user's data says what its
    steps are, instead of the source deciding."""
    kind = rec.get("step_type")
    if kind is not None and kind not in KINDS:
        raise Skip(f"{where} step_type not one of {', '.join(KINDS)}")
    return kind


def to_steps(source: str, rid: str, split: str, msgs: list[dict], tools: list[dict],
             final: str | None, stated: str | None = None) -> list[Step]:
    """One step per assistant turn: prompt = render_messages(msgs before it, add_generation_prompt),
    target = its body + <|im_end|>. Its type: the message's step_type if it states one; else tool_call
    for a turn with calls; else the record's step_type (planning or reply) if it states one; else
    planning for a reasoning source, reply otherwise."""
    if msgs and msgs[0]["role"] == "system" and not msgs[0]["content"]:
        msgs = msgs[1:]  # an empty system prompt -> Qwen's default
    start = int(bool(msgs) and msgs[0]["role"] == "system")
    if not any(m["role"] == "assistant" for m in msgs[start:]):
        raise Skip("no assistant turn")
    text, steps = render_system(msgs[0]["content"] if start else None, tools), []
    for i in range(start, len(msgs)):
        m = msgs[i]
        if m["role"] == "assistant":
            body = render_assistant(m["content"], m["calls"])
            if not body:
                raise Skip("empty assistant turn")
            auto = "tool_call" if m["calls"] else "planning" if source in PLANNING_SOURCES else "reply"
            kind = m.get("kind") or (stated if stated and not m["calls"] else auto)
            if (kind == "tool_call") != bool(m["calls"]):
                raise Skip("step_type tool_call needs tool calls, and only it may have them")
            answer = m["calls"] if m["calls"] else final if kind == "planning" else None
            steps.append(Step(f"{source}:{rid}:{len(steps)}", source, kind, split,
                              text + "<|im_start|>assistant\n", body + "<|im_end|>", answer))
        text += render_turn(msgs, i)
    return steps


# ---- files, splits, loading ----

@dataclass(frozen=True)
class Unreadable:
    """Stands in a file's record list for a record that could not be read, so indices stay right."""
    reason: str


def read_records(path: Path) -> list:
    """A file's records in order, an Unreadable in place of each that cannot be read."""
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq  # only the hub's gsm8k needs it
        except ImportError:
            raise ImportError(f"{path}: reading parquet needs pyarrow (`pip install pyarrow`)") from None
        try:
            return pq.read_table(path).to_pylist()
        except Exception as e:  # noqa: BLE001 (ArrowInvalid and kin: a cut or foreign file)
            raise ValueError(f"{path}: not a readable parquet file ({e})") from None
    raw = path.read_bytes().removeprefix(b"\xef\xbb\xbf")  # tolerate a byte-order mark
    if path.suffix == ".json":
        text = raw.decode("utf-8", errors="surrogateescape")  # a bad byte costs its record: _flaw
        start = SPACES.match(text).end()
        if text.startswith("[", start):
            return _array_records(text, start, path.stat().st_size)
        try:
            value = _loads_json(STRICT, text)
            return [value if isinstance(value, dict) else Unreadable("not a JSON array or object of records")]
        except Skip as e:
            return [Unreadable(str(e))]
        except json.JSONDecodeError:
            pass  # some .json files hold one record per line
    return _line_records(raw)


def _line_records(raw: bytes) -> list:
    """JSON lines, each decoded and parsed on its own. Split at b"\\n" only: str.splitlines() also
    cuts at U+2028 and U+0085, which JSON strings may hold raw."""
    records = []
    for line in raw.split(b"\n"):
        if not line.strip():
            continue
        try:
            records.append(_loads_json(STRICT, line.decode("utf-8")))
        except UnicodeDecodeError:
            records.append(Unreadable("not UTF-8"))
        except json.JSONDecodeError:
            records.append(Unreadable("line is not a JSON object"))
        except Skip as e:
            records.append(Unreadable(str(e)))
    return records


def _array_records(text: str, start: int, size: int) -> list:
    """A JSON array's elements, parsed one at a time: a broken element costs itself, a cut costs
    the records after it (counted once, "file truncated at byte N"), every complete one is kept."""
    records, i, cut = [], SPACES.match(text, start + 1).end(), Unreadable(f"file truncated at byte {size}")
    while i < len(text) and text[i] != "]":
        try:
            value, end = _decode(STRICT, text, i)
            records.append(value)
        except (Skip, json.JSONDecodeError) as e:
            if (end := _element_end(text, i)) is None:
                return records + [cut]
            records.append(Unreadable(str(e) if isinstance(e, Skip) else "not valid JSON"))
            end = max(end, i + 1)  # a stray '}' is one bad element, not a loop
        i = SPACES.match(text, end).end()
        if text.startswith(",", i):
            i = SPACES.match(text, i + 1).end()
    if i == len(text):  # the closing bracket is missing
        return records + [cut]
    if SPACES.match(text, i + 1).end() < len(text):
        records.append(Unreadable("text after the array's closing bracket"))
    return records


JSON_TOKEN = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[][{},]')


def _element_end(text: str, i: int) -> int | None:
    """Where the array element at text[i] ends (its ',' or the array's ']'), found by counting
    brackets outside strings, so the next element can be read; None when the text ends first."""
    depth = 0
    for m in JSON_TOKEN.finditer(text, i):
        token = m.group()
        if token in "[{":
            depth += 1
        elif depth == 0 and token in ",]}":
            return m.start()
        elif token in "]}":
            depth -= 1
    return None


def scan(root: Path) -> tuple[list[tuple[str, str, list]], dict[str, str]]:
    """Every data file under root as (source, path, records); the rest as {path: why ignored}."""
    found, ignored = [], {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        if any(part.startswith(".") for part in path.relative_to(root).parts):
            continue
        if path.suffix not in (".json", ".jsonl", ".parquet"):
            ignored[str(path)] = "not a .json/.jsonl/.parquet file"
            continue
        try:
            records = read_records(path)
        except (ValueError, ImportError, OSError) as e:
            ignored[str(path)] = str(e).removeprefix(f"{path}: ")  # the key already names the file
            continue
        readable = [r for r in records if isinstance(r, dict)]
        votes = Counter(fmt for r in readable[:50] if (fmt := sniff(r)))  # the file's majority format
        if not votes:
            ignored[str(path)] = "records match no known format" if readable else _unread(records)
            continue
        found.append((votes.most_common(1)[0][0], str(path), records))
    return found, ignored


def _unread(records: list) -> str:
    """Why a file gave no record, e.g. "no readable record (2 x not UTF-8)"."""
    if not records:
        return "no records"
    why = Counter(r.reason if isinstance(r, Unreadable) else "record is not a JSON object" for r in records)
    return f"no readable record ({', '.join(f'{n} x {reason}' for reason, n in why.items())})"


LOCAL_COPIES = "pass --data-dir FOLDER with local copies of the data files (in any format this file reads)"


def download(cache_dir: str | None = None) -> list[tuple[str, str, list]]:
    """HUB_FILES from the hub's cache or the network; offline or unreachable, one error naming the
    file and what to do instead."""
    try:
        from huggingface_hub import hf_hub_download  # respects HF_HOME
    except ImportError:
        raise ImportError(f"downloading the data needs huggingface_hub (`pip install huggingface_hub`); or "
                          f"{LOCAL_COPIES}") from None
    # Read here, not when huggingface_hub was imported: offline, no request leaves the machine.
    offline = any(os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE")
                  for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    found = []
    for source, repo, name in HUB_FILES:
        try:
            path = hf_hub_download(repo, name, repo_type="dataset", cache_dir=cache_dir,
                                   local_files_only=offline)
        except OSError as e:  # LocalEntryNotFoundError, OfflineModeIsEnabled, HTTP and connection errors
            why = ("HF_HUB_OFFLINE is set and it is not in the local cache" if offline else
                   f"{type(e).__name__}: {' '.join(str(e).split())[:200]}")
            raise OSError(f"could not download {name} from the hub dataset {repo} ({why}); "
                          f"{LOCAL_COPIES}") from None
        found.append((source, path, read_records(Path(path))))
    return found


def _unit(key: str) -> float:
    """A deterministic number in [0, 1) from a string: the same on every machine and run."""
    return int(hashlib.sha256(key.encode()).hexdigest()[:12], 16) / 16 ** 12


def own_split(path: str) -> str:
    """gsm8k's split from its file name: test when `test` is a whole word of the name (test.jsonl,
    main_test.jsonl, test-00000-of-00001.parquet), else train (latest.jsonl, contest.jsonl)."""
    return "test" if "test" in re.split(r"[^a-z0-9]+", Path(path).stem.lower()) else "train"


TOOL_TEST_SHARE, TOOL_VAL_SHARE = 0.3, 0.1  # of the called functions; the rest train


def function_split(name: str) -> str:
    """The split of every conversation that calls the function `name`: a hash of the name alone, so a
    function glaive and hermes both call lands in the same split."""
    u = _unit(f"function:{name}")
    return "test" if u < TOOL_TEST_SHARE else "val" if u < TOOL_TEST_SHARE + TOOL_VAL_SHARE else "train"


def router_only_step(step: Step, share: float) -> bool:
    """Whether a training tool call teaches the routers only, LoRA never fitting it: a hash of each
    called name (salted apart from function_split) puts `share` of the functions on the routers' side,
    and a call of any of them goes there. The routers then measure what a skip costs calls the adapter
    has not memorised, as the test calls are."""
    return step.kind == "tool_call" and any(_unit(f"router:{c['name']}") < share for c in step.answer)


def record_split(source: str, rid: str, own: str | None, msgs: list[dict]) -> str:
    """A conversation's split: gsm8k's own; else its called functions' one split (Skip when they
    disagree: in any split it would share a function with another); else split_of's hash of its id."""
    names = {c["name"] for m in msgs for c in m["calls"]}
    if own is not None or not names:
        return split_of(source, rid, own)
    splits = {function_split(n) for n in names}
    if len(splits) > 1:
        raise Skip("calls functions of different splits")
    return splits.pop()


def split_of(source: str, rid: str, own: str | None = None) -> str:
    u = _unit(f"{source}:{rid}")
    if own == "test":
        return "test"
    if own == "train":
        return "val" if u < GSM8K_VAL_SHARE else "train"
    return "train" if u < 0.8 else "val" if u < 0.9 else "test"


def record_id(rec: dict) -> str:
    for key in ("id", "conversation_id"):
        if isinstance(rec.get(key), (str, int)):
            return str(rec[key])
    blob = json.dumps(rec, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def load_steps(data_dir: str | None = None, cache_dir: str | None = None,
               max_records: int | None = MAX_RECORDS) -> tuple[list[Step], dict]:
    """All steps of every source found in data_dir (or downloaded, if None), and the summary dict."""
    found, ignored = scan(Path(data_dir)) if data_dir else (download(cache_dir), {})
    if not found:
        raise FileNotFoundError(f"{data_dir}: no recognisable data file; ignored: {ignored}")
    sources, pending = {}, defaultdict(dict)  # pending: source -> {record id: (where, record, split)}
    for source, path, records in found:
        rep = sources.setdefault(source, {"files": [], "records": 0, "splits": Counter(),
                                          "skipped": Counter(), "first_skipped": {}, "capped": 0})
        rep["files"].append(path)
        own = own_split(path) if source == "gsm8k" else None
        for i, rec in enumerate(records):
            rid = record_id(rec) if isinstance(rec, dict) else None
            reason = (rec.reason if isinstance(rec, Unreadable) else
                      "record is not a JSON object" if rid is None else
                      "duplicate record id" if rid in pending[source] else None)
            if reason:
                _skipped(rep, reason, f"{path}#{i}")
            else:
                pending[source][rid] = (f"{path}#{i}", rec, own)
    steps = []
    for source, rep in sources.items():
        # Parse in the order of a hash of the ids, so the cap keeps a stable, unbiased sample and
        # records past it are never rendered (glaive-v2 alone has ~113k).
        order = sorted(pending[source], key=lambda r: _unit(f"cap:{source}:{r}"))
        for n, rid in enumerate(order):
            if rep["records"] == max_records:
                rep["capped"] = len(order) - n
                break
            where, rec, own = pending[source][rid]
            try:
                msgs, tools, final = READERS[source](rec)
                new = to_steps(source, rid, record_split(source, rid, own, msgs), msgs, tools, final, stated_kind(rec))
            except Skip as e:
                _skipped(rep, str(e), where)
                continue
            rep["records"] += 1
            rep["splits"][new[0].split] += 1
            steps += new
        if not rep["records"]:
            raise ValueError(f"source '{source}' yielded no steps from {rep['files']}: "
                             f"every record was skipped ({dict(rep['skipped'])})")
        rep["splits"], rep["skipped"] = dict(rep["splits"]), dict(rep["skipped"])
    summary = {"sources": sources, "steps": dict(Counter(s.kind for s in steps)),
               "splits": dict(Counter(s.split for s in steps)), "ignored_files": ignored}
    return steps, summary


def _skipped(rep: dict, reason: str, where: str) -> None:
    rep["skipped"][reason] += 1
    rep["first_skipped"].setdefault(reason, where)


REPORT_ITEMS = 4  # reasons (and ignored-file reasons) named in skip_report; the rest are counted
KIND_FILES = {"tool_call": "hermes, glaive, sharegpt or openai files whose conversations make calls",
              "planning": "gsm8k or Turing files",
              "reply": "tool conversations with plain-text assistant turns"}


def _counted(n: int, noun: str, items: list[str]) -> str:
    """ "3 records (a; b; c; d; and 2 more)": at most REPORT_ITEMS items, so the line stays short."""
    more = [f"and {len(items) - REPORT_ITEMS} more"] if len(items) > REPORT_ITEMS else []
    return f"{n} {noun}{'s' * (n != 1)} ({'; '.join(items[:REPORT_ITEMS] + more)})"


def skip_report(summary: dict) -> str:
    """One line on what loading skipped and ignored (and, given fitting's count, which tool calls were
    too long), for train.py and eval.py to print, e.g.
    "data: skipped 3 records (glaive: 2 x not UTF-8, first at F#4; gsm8k: 1 x integer too long at
    G#0), ignored 1 file (x.txt: not a .json/.jsonl/.parquet file)". One line, because qwen.cli
    folds an error's text onto one line anyway."""
    skipped = [f"{name}: {n} x {reason}{', first' if n > 1 else ''} at {r['first_skipped'][reason]}"
               for name, r in summary["sources"].items() for reason, n in r["skipped"].items()]
    n_skipped = sum(sum(r["skipped"].values()) for r in summary["sources"].values())
    said = [f"skipped {_counted(n_skipped, 'record', skipped)}" if skipped else "nothing skipped"]
    if ignored := summary["ignored_files"]:
        paths = defaultdict(list)  # reason -> files, in scan order
        for path, reason in ignored.items():
            paths[reason].append(path)
        items = [f"{p[0]}: {reason}" if len(p) == 1 else f"{len(p)} x {reason}, first {p[0]}"
                 for reason, p in paths.items()]
        said.append(f"ignored {_counted(len(ignored), 'file', items)}")
    if (long := summary.get("too_long")) and sum(long["dropped"].values()):  # set by the caller that ran fitting()
        per = ", ".join(f"{k} {n}" for k, n in long["dropped"].items())
        said.append(f"dropped {sum(long['dropped'].values())} tool-call steps whose prompt and target do not "
                    f"fit --max-len {long['max_len']} ({per}; a cut would drop their tool list)")
    return "data: " + ", ".join(said)


def require_kinds(steps: list[Step], kinds: tuple[str, ...], split: str, where: str,
                  summary: dict | None = None) -> None:
    """Raise ValueError when a kind a run needs has no step in `split` (a recipe that mixes
    tool_call and planning rows cannot run on one of them), naming where the data came from and,
    given load_steps' summary, what was skipped (often the reason the kind is missing)."""
    present = {s.kind for s in steps if s.split == split}
    for kind in kinds:
        if kind not in present:
            report = f"; {skip_report(summary)}" if summary else ""
            raise ValueError(f"{where}: no {kind} steps in the {split} split (this run needs "
                             f"{' and '.join(kinds)} rows; add {KIND_FILES[kind]}){report}")


# ---- tokens and batches ----

def encode(step: Step, tokenizer, max_len: int | None = None) -> tuple[list[int], list[int]]:
    """Prompt and target encoded apart, so the boundary is exact; <|im_start|> etc. are added
    tokens in tokenizer.json, so they come out as single ids. With max_len, cut as truncate() cuts."""
    ids = (tokenizer.encode(step.prompt, add_special_tokens=False).ids,
           tokenizer.encode(step.target, add_special_tokens=False).ids)
    return truncate(*ids, max_len) if max_len else ids


def pad_id(tokenizer) -> int:
    """The id batches are padded with (padding is masked out of every loss and every router)."""
    return tokenizer.token_to_id("<|endoftext|>") or 0


def encode_all(steps: list[Step], tokenizer) -> list[tuple[list[int], list[int], str]]:
    """encode() for many steps at once (the tokenizer batches in Rust): the input of batches()."""
    prompts = tokenizer.encode_batch([s.prompt for s in steps], add_special_tokens=False)
    targets = tokenizer.encode_batch([s.target for s in steps], add_special_tokens=False)
    return [(p.ids, t.ids, s.kind) for p, t, s in zip(prompts, targets, steps)]


def fitting(steps: list[Step], tokenizer, max_len: int) -> tuple[list[Step], dict[str, int]]:
    """The steps that run at max_len, and per split the tool-call steps dropped because prompt + target
    pass it (module docstring, "Length"); every other kind stays, to be cut by truncate."""
    calls = [i for i, s in enumerate(steps) if s.kind == "tool_call"]
    encoded = encode_all([steps[i] for i in calls], tokenizer)
    long = {i for i, (p, t, _) in zip(calls, encoded) if len(p) + len(t) > max_len}
    dropped = Counter(steps[i].split for i in long)
    return [s for i, s in enumerate(steps) if i not in long], {k: dropped[k] for k in SPLITS}


def truncate(prompt_ids: list[int], target_ids: list[int], max_len: int) -> tuple[list[int], list[int]]:
    """Keep the target (its end is cut only if it alone passes max_len - 1) and at least one
    prompt token; drop the OLDEST prompt tokens."""
    if len(prompt_ids) + len(target_ids) <= max_len:
        return prompt_ids, target_ids
    target_ids = target_ids[:max_len - 1]
    return prompt_ids[max(0, len(prompt_ids) - (max_len - len(target_ids))):], target_ids


@dataclass
class Batch:
    ids: torch.Tensor          # (B, T) long, right-padded with pad_id; T = longest row of this batch
    labels: torch.Tensor       # (B, T) long: ids at target positions, -100 on prompt and padding
    prompt_lens: torch.Tensor  # (B,) long: prompt tokens per row after truncation (router pools < it)
    kinds: list[str]           # kind of each row
    n_target: int              # target tokens the LM loss counts: those of the rows not router_only
    router_only: torch.Tensor  # (B,) bool: rows that teach the routers only (router_only_step)


def collate(examples: list[tuple[list[int], list[int]]], kinds: list[str], pad_id: int,
            pad_to: int | None = None, pad_multiple: int = 1, router_only: list[bool] | None = None) -> Batch:
    """Right-pad to the longest row, rounded up to a multiple of pad_multiple (or to pad_to: the
    reference recipe pads everything to max_len)."""
    T = pad_to or -(-max(len(p) + len(t) for p, t in examples) // pad_multiple) * pad_multiple
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), T), -100, dtype=torch.long)
    for b, (p, t) in enumerate(examples):
        ids[b, :len(p) + len(t)] = torch.tensor(p + t, dtype=torch.long)
        labels[b, len(p):len(p) + len(t)] = torch.tensor(t, dtype=torch.long)
    only = torch.tensor(router_only or [False] * len(examples))
    return Batch(ids, labels, torch.tensor([len(p) for p, _ in examples]), list(kinds),
                 sum(len(t) for (_, t), o in zip(examples, only.tolist()) if not o), only)


def _draw(rng: np.random.Generator, idx: list[int], n: int) -> np.ndarray:
    """n of idx: shuffled copies while n exceeds it (repeat), then a shuffled prefix (subsample)."""
    copies = [rng.permutation(idx) for _ in range(-(-n // len(idx)))] if n else []
    return np.concatenate(copies)[:n] if copies else np.zeros(0, dtype=int)


def epoch_plan(kinds: list[str], lengths: list[int], batch_size: int, seed: int, epoch: int,
               tool_fraction: float | None = 0.5) -> list[list[int]]:
    """Rows of each batch of one epoch, a function of (seed, epoch) only. An epoch has len(kinds)
    rows. tool_fraction = share of tool_call rows; planning and reply rows fill the rest in their
    natural ratio (the paper's mix is about half tool calls). None, or a missing side, keeps the
    natural mix, in which tool calls can be a small minority of the rows (the real data's counts:
    results/README.md, "How the defaults were chosen")."""
    rng = np.random.default_rng([seed, epoch])
    tool = [i for i, k in enumerate(kinds) if k == "tool_call"]
    plan = [i for i, k in enumerate(kinds) if k != "tool_call"]
    if tool_fraction is None or not tool or not plan:
        pool = rng.permutation(len(kinds))
    else:
        n_tool = round(tool_fraction * len(kinds))
        pool = rng.permutation(np.concatenate([_draw(rng, tool, n_tool),
                                               _draw(rng, plan, len(kinds) - n_tool)]))
    # Length grouping: chunks of 50 batches, each sorted by length, so rows of a batch are alike.
    order = []
    for c in range(0, len(pool), 50 * batch_size):
        chunk = sorted(pool[c:c + 50 * batch_size].tolist(), key=lambda i: lengths[i])
        order += [chunk[j:j + batch_size] for j in range(0, len(chunk), batch_size)]
    return [order[j] for j in rng.permutation(len(order))]


def batches(encoded: list[tuple[list[int], list[int], str]], batch_size: int, max_len: int,
            pad_id: int, seed: int, tool_fraction: float | None = 0.5,
            start: int = 0, pad_to: int | None = None, pad_multiple: int = 1,
            router_only: list[bool] | None = None) -> Iterator[Batch]:
    """Infinite deterministic stream of training batches, beginning at batch index `start`
    (resume at optimiser step k with start = k * grad_accum: nothing skipped is collated).
    router_only: per example, whether its rows teach the routers only (router_only_step)."""
    if not encoded:
        raise ValueError("batches(): no examples")
    kinds = [k for _, _, k in encoded]
    lengths = [min(len(p) + len(t), max_len) for p, t, _ in encoded]
    # Chunks hold whole batches, so every epoch has ceil(N / batch_size) batches.
    epoch, skip = divmod(start, -(-len(encoded) // batch_size))
    while True:
        for rows in epoch_plan(kinds, lengths, batch_size, seed, epoch, tool_fraction)[skip:]:
            examples = [truncate(encoded[i][0], encoded[i][1], max_len) for i in rows]
            yield collate(examples, [kinds[i] for i in rows], pad_id, pad_to, pad_multiple,
                          [router_only[i] for i in rows] if router_only else None)
        epoch, skip = epoch + 1, 0


# ---- summary CLI ----

def token_stats(steps: list[Step], tokenizer, max_len: int, batch_size: int = 4) -> dict:
    """Length percentiles per kind; for one training epoch, its mix of kinds and the padding our
    batches waste vs padding every batch to max_len."""
    encoded = encode_all(steps, tokenizer)
    stats = {"lengths": {}, "padding": {}}
    for kind in KINDS:
        n = np.array([len(p) + len(t) for p, t, k in encoded if k == kind])
        if len(n):
            q = {p: int(np.percentile(n, int(p[1:]))) for p in ("p50", "p90", "p99")}
            stats["lengths"][kind] = {**q, "max": int(n.max()), "over_max_len": int((n > max_len).sum())}
    train = [e for e, s in zip(encoded, steps) if s.split == "train"]
    if not train:
        return stats
    lengths = [min(len(p) + len(t), max_len) for p, t, _ in train]
    plan = epoch_plan([k for _, _, k in train], lengths, batch_size, seed=0, epoch=0)
    real = sum(lengths[i] for rows in plan for i in rows)
    grouped = sum(max(lengths[i] for i in rows) * len(rows) for rows in plan)
    stats["padding"] = {"batch_size": batch_size, "max_len": max_len, "grouped": 1 - real / grouped,
                        "fixed": 1 - real / (max_len * sum(len(r) for r in plan))}
    stats["train_epoch_mix"] = dict(Counter(train[i][2] for rows in plan for i in rows))
    return stats


def print_summary(s: dict) -> None:
    print(f"{'source':10}{'records':>9}{'train':>7}{'val':>6}{'test':>6}{'capped':>8}  files")
    for name, r in s["sources"].items():
        sp = r["splits"]
        print(f"{name:10}{r['records']:>9}{sp.get('train', 0):>7}{sp.get('val', 0):>6}"
              f"{sp.get('test', 0):>6}{r['capped']:>8}  {', '.join(r['files'])}")
    print("steps:  " + "  ".join(f"{k} {s['steps'].get(k, 0)}" for k in KINDS))
    if kept := s.get("kept_steps"):
        print(f"steps at --max-len {s['too_long']['max_len']} (long tool calls dropped), train / val / test:")
        for name, sp in kept.items():
            print(f"  {name:20}" + " / ".join(str(sp[k]) for k in SPLITS))
    print("splits: " + "  ".join(f"{k} {s['splits'].get(k, 0)}" for k in SPLITS))
    if "lengths" in s:
        print(f"tokens (prompt+target){'p50':>8}{'p90':>7}{'p99':>7}{'max':>7}  over max_len")
        for kind, q in s["lengths"].items():
            print(f"  {kind:20}{q['p50']:>8}{q['p90']:>7}{q['p99']:>7}{q['max']:>7}"
                  f"  {q['over_max_len']}")
    if p := s.get("padding"):
        mix = "  ".join(f"{k} {s['train_epoch_mix'].get(k, 0)}" for k in KINDS)
        print(f"one training epoch (tool_fraction 0.5): {mix}")
        print(f"padding at batch size {p['batch_size']}: length-grouped {p['grouped']:.1%}"
              f" vs padded to {p['max_len']}: {p['fixed']:.1%}")
    print("skipped records:")
    for name, r in s["sources"].items():
        for reason, n in r["skipped"].items():
            print(f"  {name}: {n} x {reason} (first: {r['first_skipped'][reason]})")
        if not r["skipped"]:
            print(f"  {name}: none")
    for path, why in s["ignored_files"].items():
        print(f"ignored: {path} ({why})")


def main(argv: list[str] | None = None) -> None:
    ap = qwen.Parser(description="Load the agentic data and print what it holds.")
    ap.add_argument("--data-dir", help="read local files (recognised by shape; default: download the four sources)")
    ap.add_argument("--cache-dir", help="huggingface_hub cache for the downloads (default: its own, HF_HOME)")
    ap.add_argument("--tokenizer", default="Qwen/Qwen2.5-0.5B-Instruct", help="tokenizer.json, model folder or hub id")
    ap.add_argument("--max-len", type=qwen.number(int, lo=8), default=512, help="training length, for the padding figure")
    ap.add_argument("--max-records", type=qwen.number(int, lo=1), default=MAX_RECORDS, help="records kept per source")
    ap.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    args = ap.parse_args(argv)
    steps, summary = load_steps(args.data_dir, args.cache_dir, args.max_records)
    tok = qwen.load_tokenizer(args.tokenizer)
    kept, dropped = fitting(steps, tok, args.max_len)
    summary["too_long"] = {"max_len": args.max_len, "dropped": dropped}
    summary.update(token_stats(kept, tok, args.max_len))  # the padding of what training reads...
    summary["lengths"] = token_stats(steps, tok, args.max_len)["lengths"]  # ...and the lengths of all
    summary["kept_steps"] = {f"{source} {kind}": {k: n[(source, kind, k)] for k in SPLITS}  # per split
                             for n in [Counter((s.source, s.kind, s.split) for s in kept)]
                             for source, kind in dict.fromkeys((s.source, s.kind) for s in kept)}
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        print_summary(summary)
        print(skip_report(summary))


if __name__ == "__main__":
    qwen.cli(main)
