"""Put a trained run to work: one assistant turn from the command line, or an OpenAI-compatible endpoint.

    python chat.py --run runs/layerroute conversation.json     # messages (and tools) in, the turn out
    python chat.py --run runs/layerroute --serve --port 8000   # POST /v1/chat/completions, GET /v1/models

A conversation is OpenAI's: `{"messages": [...], "tools": [...]}`, or a bare list of messages, from a
file or standard input. data.render writes it in the chat template the run was trained on. The gates
are decided once, from the whole prompt (layerroute.py), so a request's routing is known before its
first token and every token of the reply runs the same blocks.

This is a file of its own because serving is a use of the method, not part of it: layerroute.py stays
what a reader studies. The endpoint is the standard library's ThreadingHTTPServer around stream():
a thread per connection and one request on the model at a time (a lock), so concurrent replies never
mix and each is the reply the request would get alone. Requests are not batched.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

import data
import layerroute as lr
import qwen
from eval import flops_skipped_pct, parse_calls

CALL_OPEN = "<tool_call>"
MAX_BODY = 4 << 20  # bytes: a request with a long tool list is well under a megabyte


# ----------------------------------------------------------------------------- one reply

@dataclass
class Reply:
    content: str | None       # the text before any tool call; None when there is none
    tool_calls: list[dict]    # [{"name", "arguments": dict}], parsed from <tool_call> blocks
    finish_reason: str        # stop | length | tool_calls
    prompt_tokens: int
    completion_tokens: int    # every token sampled, the stop token included
    routing: dict | None      # blocks skipped and FLOPs skipped; None for a model without routers
    prefill_ms: float
    ms_per_token: float       # model time per generated token after the first (detokenising excluded)


def load(run: str | None = None, model: str | None = None, tokenizer: str | None = None,
         device: str = "cpu", dtype: torch.dtype = torch.float32):
    """(model, tokenizer): a run folder (train.py --out), a merged export (layerroute.py export --merged),
    or, with `model`, a bare checkpoint folder or hub id (every block on, no routers)."""
    if run and os.path.exists(os.path.join(run, "layerroute.json")):
        net, tok = lr.load_merged(run, device, dtype), qwen.load_tokenizer(run)
    elif run:
        net, tok, _ = lr.load_run(run, device, dtype)
    else:
        net, tok = qwen.load_model(model, device, dtype).eval(), qwen.load_tokenizer(model)
    if tokenizer:
        tok = qwen.load_tokenizer(tokenizer)
    if tok is None:
        raise ValueError(f"{run}: trained on random weights, no tokenizer with it: pass --tokenizer FILE")
    return net, tok


def config_of(model) -> qwen.QwenConfig:
    return model.base.cfg if isinstance(model, lr.LayerRoute) else model.cfg


def encode_prompt(tok, messages: list[dict], tools: list[dict] | None, context: int, max_tokens: int,
                  fit: bool = False) -> tuple[list[int], int]:
    """(the conversation's ids, ending with the assistant's turn opener; the tokens the reply may take).
    A reply that cannot fit the context is refused, or with fit, shortened to what fits."""
    ids = tok.encode(data.render(messages, tools, add_generation_prompt=True), add_special_tokens=False).ids
    if fit and len(ids) < context:
        max_tokens = min(max_tokens, context - len(ids))
    if len(ids) + max_tokens > context:
        raise ValueError(f"max_tokens {max_tokens} plus the prompt's {len(ids)} tokens exceed the model's "
                         f"context of {context} tokens")
    return ids, max_tokens


def timed(it: Iterator) -> Iterator[tuple[object, float]]:
    """Each item of it with the seconds its computation took (the caller's own work between items excluded)."""
    while True:
        t0 = time.perf_counter()
        item = next(it, None)
        if item is None:
            return
        item = int(item)  # the host copy waits for the device, so the time is the model's
        yield item, time.perf_counter() - t0


def routing(model, prompt: int, new: int) -> dict | None:
    if not isinstance(model, lr.LayerRoute):
        return None
    gates = model.last_gates[0].tolist()  # decided at prefill; every decode step reuses them
    skipped = [i for i, g in enumerate(gates) if g < 0.5]
    # The blocks run at every prompt position and at each generated token but the last (sampled, never
    # fed back); the head once per generated token (the prefill keeps the last position's logits only).
    flops = flops_skipped_pct(model.base.cfg, gates, prompt + max(new - 1, 0), heads=max(new, 1))
    return {"blocks": len(gates), "gate_unit": model.gate_unit, "skipped": skipped, "threshold": model.threshold,
            "blocks_skipped_pct": 100.0 * len(skipped) / len(gates), "flops_skipped_pct": flops}


def held_from(text: str, markers: tuple[str, ...]) -> int:
    """How much of text is safe to show now: not a trailing piece that may still grow into a marker
    (a stop string, a tool call's opener), not trailing white space (it may end the text before a
    call) and not a half-decoded character."""
    safe = len(text)
    for i in range(max(0, len(text) - max(map(len, markers)) + 1), len(text)):
        if any(m.startswith(text[i:]) for m in markers):
            safe = i
            break
    safe = len(text[:safe].rstrip())
    while safe and text[safe - 1] == "\ufffd":
        safe -= 1
    return safe


def split_calls(text: str, parse: bool) -> tuple[str | None, list[dict]]:
    """(content, calls): with calls, the content is the text before the first one."""
    calls = parse_calls(text) if parse and CALL_OPEN in text else None
    if not calls:
        return text, []
    return text[:text.index(CALL_OPEN)].rstrip() or None, calls


def stream(model, tok, messages: list[dict], tools: list[dict] | None = None, max_tokens: int = 256,
           temperature: float = 0.0, top_p: float = 1.0, stop: tuple[str, ...] = (),
           parse_tools: bool = True, fit: bool = False) -> Iterator[str | Reply]:
    """Generate the assistant's turn: yield its text as it comes (str pieces), then the Reply.

    Text that may start a stop string or a tool call is held back until that is decided; from the
    first <tool_call> on nothing more streams: the calls come whole, parsed, in the Reply. A stop
    string ends the reply and is not part of it. parse_tools=False returns every call as text; fit
    shortens max_tokens to what the context leaves (else a reply that may not fit is refused).
    """
    cfg = config_of(model)
    prompt, max_tokens = encode_prompt(tok, messages, tools, cfg.max_position_embeddings, max_tokens, fit)
    ids = torch.tensor([prompt], device=next(model.parameters()).device)
    stop = tuple(s for s in stop if s)
    ends, markers = qwen.stop_ids(cfg, tok), stop + (CALL_OPEN,)
    out, text, shown, finish, seconds = [], "", 0, "length", []
    for t, took in timed(qwen.decode(model, ids, max_tokens, temperature, top_p)):
        seconds.append(took)
        if t in ends:
            finish = "stop"
            break
        out.append(t)
        text = tok.decode(out, skip_special_tokens=False)
        cut = min((text.index(s) for s in stop if s in text), default=None)
        if cut is not None:
            text, finish = text[:cut], "stop"
            break
        safe = held_from(text, markers)
        if CALL_OPEN in text:
            safe = min(safe, text.index(CALL_OPEN))
        if safe > shown:
            yield text[shown:safe]
            shown = safe
    content, calls = split_calls(text, parse_tools)
    if (content or "")[shown:]:
        yield content[shown:]
    sampled = len(seconds)  # the stop token included: it cost a step like any other
    yield Reply(content, calls, "tool_calls" if calls else finish, len(prompt), sampled,
                routing(model, len(prompt), sampled), 1000 * seconds[0],
                1000 * sum(seconds[1:]) / max(len(seconds) - 1, 1))


def complete(model, tok, messages: list[dict], tools: list[dict] | None = None, **options) -> Reply:
    """The whole Reply at once (stream's options)."""
    *_, reply = stream(model, tok, messages, tools, **options)
    return reply


@contextmanager
def every_block(model):
    """Every gate open for the block (a model without routers runs every block anyway)."""
    saved = getattr(model, "open_gates", None)
    if saved is not None:
        model.open_gates = True
    try:
        yield model
    finally:
        if saved is not None:
            model.open_gates = saved


def ms_per_token_every_block(model, tok, messages, tools, new: int) -> float:
    """Decode `new` tokens of the same prompt with every block on, no stop: the full model's ms/token."""
    cfg = config_of(model)
    prompt, new = encode_prompt(tok, messages, tools, cfg.max_position_embeddings, new)
    ids = torch.tensor([prompt], device=next(model.parameters()).device)
    with every_block(model):
        seconds = [s for _, s in timed(qwen.decode(model, ids, new))]
    return 1000 * sum(seconds[1:]) / max(len(seconds) - 1, 1)


# ----------------------------------------------------------------------------- the endpoint

class RequestError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code


def field(req: dict, name: str, kinds: tuple[type, ...], default=None, check=None, rule: str = ""):
    """req[name], of one of kinds (bool is not a number), within check; else a 400 naming the field."""
    value = req.get(name, default)
    if value is None:
        return default
    ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
    if not ok or (check and not check(value)):
        raise RequestError(400, f"'{name}' must be {rule or ' or '.join(k.__name__ for k in kinds)}, "
                                f"got {json.dumps(value)[:80]}", name)
    return value


def parse_request(req, name: str, max_tokens: int) -> dict:
    """A chat.completions body -> stream()'s options, or a RequestError naming the field at fault."""
    if not isinstance(req, dict):
        raise RequestError(400, "the body must be a JSON object")
    model = field(req, "model", (str,))
    if model is None:
        raise RequestError(400, "'model' is required", "model")
    if model != name:
        raise RequestError(404, f"The model '{model}' does not exist; this server serves '{name}'", "model",
                           "model_not_found")
    messages = field(req, "messages", (list,), check=bool, rule="a non-empty list of messages")
    if messages is None:
        raise RequestError(400, "'messages' is required", "messages")
    tools = field(req, "tools", (list,))
    choice = req.get("tool_choice", "auto")
    if choice not in ("auto", "none"):
        raise RequestError(400, "'tool_choice' must be 'auto' or 'none': a call cannot be forced", "tool_choice")
    for key, neutral in (("n", 1), ("presence_penalty", 0), ("frequency_penalty", 0), ("logprobs", False)):
        if req.get(key, neutral) not in (neutral, None):
            raise RequestError(400, f"'{key}' is not supported (only {json.dumps(neutral)})", key)
    if (req.get("response_format") or {"type": "text"}) != {"type": "text"}:
        raise RequestError(400, "'response_format' is not supported (only text)", "response_format")
    stop = field(req, "stop", (str, list), default=[], rule="a string or a list of up to 4 strings",
                 check=lambda v: isinstance(v, str) or (len(v) <= 4 and all(isinstance(s, str) and s for s in v)))
    limit = field(req, "max_completion_tokens", (int,), check=lambda v: v >= 1, rule="an integer >= 1")
    limit = field(req, "max_tokens", (int,), default=limit, check=lambda v: v >= 1, rule="an integer >= 1")
    options = {"messages": messages, "tools": tools if choice == "auto" else None,
               "max_tokens": limit or max_tokens, "fit": limit is None,  # no limit asked: what fits
               "temperature": field(req, "temperature", (int, float), 1.0, lambda v: 0 <= v <= 2, "a number from 0 to 2"),
               "top_p": field(req, "top_p", (int, float), 1.0, lambda v: 0 <= v <= 1, "a number from 0 to 1"),
               "stop": (stop,) if isinstance(stop, str) else tuple(stop), "parse_tools": choice == "auto"}
    if options["top_p"] == 0:  # the limit of nucleus sampling: the likeliest token
        options["temperature"] = 0
    return {"options": options, "stream": field(req, "stream", (bool,), False),
            "usage_chunk": bool(field(req, "stream_options", (dict,), {}).get("include_usage")),
            "seed": field(req, "seed", (int,))}


def message_of(reply: Reply) -> dict:
    msg = {"role": "assistant", "content": reply.content}
    if reply.tool_calls:
        msg["tool_calls"] = [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                              "function": {"name": c["name"], "arguments": json.dumps(c["arguments"], ensure_ascii=False)}}
                             for c in reply.tool_calls]
    return msg


def usage_of(reply: Reply) -> dict:
    return {"prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens,
            "total_tokens": reply.prompt_tokens + reply.completion_tokens}


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address, model, tok, name: str, max_tokens: int = 256, max_body: int = MAX_BODY,
                 quiet: bool = False):
        super().__init__(address, Handler)
        self.model, self.tok, self.name = model, tok, name
        self.max_tokens, self.max_body, self.quiet = max_tokens, max_body, quiet
        self.lock = threading.Lock()  # one request on the model at a time
        self.stopping = False


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "layerroute"
    timeout = 60  # seconds a client may stall mid-request before its thread is freed

    def log_message(self, format, *args):  # noqa: A002 (the standard library's name)
        if not self.server.quiet:
            sys.stderr.write(f"{self.address_string()} {format % args}\n")

    def send_json(self, status: int, obj: dict):
        body = json.dumps(obj, ensure_ascii=False).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def send_error_json(self, e: RequestError):
        kind = "invalid_request_error" if e.status < 500 else "server_error"
        self.send_json(e.status, {"error": {"message": str(e), "type": kind, "param": e.param, "code": e.code}})

    def card(self) -> dict:
        return {"id": self.server.name, "object": "model", "created": 0, "owned_by": "layerroute"}

    def do_GET(self):
        path = self.path.split("?")[0].rstrip("/")
        if path == "/v1/models":
            self.send_json(200, {"object": "list", "data": [self.card()]})
        elif path == f"/v1/models/{self.server.name}":
            self.send_json(200, self.card())
        else:
            self.send_error_json(RequestError(404, f"no such route: GET {path}"))

    def read_body(self) -> object:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self.close_connection = True
            raise RequestError(411, "send the body with a Content-Length header")
        length = int(length)
        if length > self.server.max_body:
            self.close_connection = True  # the rest of the body is never read
            raise RequestError(413, f"the body is {length:,} bytes, over this server's limit of "
                                    f"{self.server.max_body:,} (--max-body)")
        raw = self.rfile.read(length)
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise RequestError(400, f"the body is not JSON ({' '.join(str(e).split())[:120]})") from None

    def do_POST(self):
        self.streaming = False  # a connection is kept for its next request: this one has not streamed yet
        try:
            if self.path.split("?")[0].rstrip("/") != "/v1/chat/completions":
                self.close_connection = True
                raise RequestError(404, f"no such route: POST {self.path}")
            req = parse_request(self.read_body(), self.server.name, self.server.max_tokens)
            with self.server.lock:
                if self.server.stopping:
                    raise RequestError(503, "the server is shutting down")
                if req["seed"] is not None:
                    torch.manual_seed(req["seed"])
                replies = stream(self.server.model, self.server.tok, **req["options"])
                first = next(replies)  # a bad conversation fails here, before any header is sent
                if req["stream"]:
                    self.send_stream(first, replies, req["usage_chunk"])
                else:
                    *_, reply = first, *replies
                    self.send_json(200, self.completion(reply))
        except RequestError as e:
            self.send_error_json(e)
        except ValueError as e:  # a malformed message, or a reply that cannot fit the context
            self.send_error_json(RequestError(400, str(e)))
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client left; the next request may use the model
        except Exception as e:  # noqa: BLE001 (one bad request must not end the server)
            error = RequestError(500, f"{type(e).__name__}: {e}")
            if self.streaming:  # the status line is gone: the error is the stream's last event
                self.wfile.write(f"data: {json.dumps({'error': {'message': str(error), 'type': 'server_error'}})}\n\n".encode())
            else:
                self.send_error_json(error)

    def header(self, kind: str) -> dict:
        return {"id": self.request_id, "object": kind, "created": int(time.time()), "model": self.server.name}

    def completion(self, reply: Reply) -> dict:
        self.request_id = f"chatcmpl-{uuid.uuid4().hex}"
        return {**self.header("chat.completion"),
                "choices": [{"index": 0, "message": message_of(reply), "finish_reason": reply.finish_reason,
                             "logprobs": None}],
                "usage": usage_of(reply), "routing": reply.routing}

    def send_stream(self, first, replies, usage_chunk: bool):
        """Server-sent events as OpenAI writes them: a role, content pieces, the calls, the finish, [DONE]."""
        self.request_id = f"chatcmpl-{uuid.uuid4().hex}"
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")  # the end of the stream is the end of the connection
        self.end_headers()
        self.close_connection = self.streaming = True

        def event(delta: dict | None, finish: str | None = None, **extra):
            chunk = {**self.header("chat.completion.chunk"), **extra,
                     "choices": [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]}
            self.wfile.write(f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n".encode())
            self.wfile.flush()

        event({"role": "assistant", "content": ""})
        reply = first
        while not isinstance(reply, Reply):
            event({"content": reply})
            reply = next(replies)
        if reply.tool_calls:
            calls = message_of(reply)["tool_calls"]
            event({"tool_calls": [{"index": i, **c} for i, c in enumerate(calls)]})
        event({}, reply.finish_reason, routing=reply.routing)
        if usage_chunk:
            event(None, usage=usage_of(reply))
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()


def serve(model, tok, name: str, host: str = "127.0.0.1", port: int = 8000, max_tokens: int = 256,
          max_body: int = MAX_BODY, quiet: bool = False):
    """Serve until SIGTERM or Ctrl-C; the request on the model finishes, the ones waiting get a 503."""
    server = Server((host, port), model, tok, name, max_tokens, max_body, quiet)

    def stop(signum, frame):
        server.stopping = True
        threading.Thread(target=server.shutdown, daemon=True).start()  # shutdown() waits for serve_forever

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    host, port = server.server_address[:2]
    print(f"serving {name} at http://{host}:{port}/v1 (SIGTERM or Ctrl-C stops it)", flush=True)
    server.serve_forever()
    with server.lock:
        server.server_close()
    print("stopped", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- command line

def read_conversation(path: str) -> tuple[list[dict], list[dict] | None]:
    """(messages, tools) from a JSON file, or standard input for "-"."""
    where = "standard input" if path == "-" else path
    text = sys.stdin.read() if path == "-" else open(path, encoding="utf-8").read()
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not JSON ({e})") from None
    if isinstance(obj, dict) and isinstance(obj.get("messages"), list):
        return obj["messages"], obj.get("tools")
    if isinstance(obj, list):
        return obj, None
    raise ValueError(f"{where}: expected {{\"messages\": [...], \"tools\": [...]}} or a list of messages")


def parser() -> qwen.Parser:
    p = qwen.Parser(description="One assistant turn of a conversation, or an OpenAI-compatible endpoint, "
                                "from a trained run or a bare checkpoint.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="a run folder (train.py --out) or a merged export (layerroute.py export --merged)")
    src.add_argument("--model", help="a bare checkpoint folder or hub id: every block on, no routers")
    p.add_argument("conversation", nargs="?", default="-",
                   help='a JSON file: {"messages": [...], "tools": [...]} or a list of messages; - reads standard input')
    p.add_argument("--tokenizer", help="tokenizer.json or its folder (default: the model's own)")
    p.add_argument("--threshold", type=qwen.number(float, lo=0, hi=1),
                   help="gate threshold: a block runs where its router's score exceeds it (default: the run's)")
    p.add_argument("--max-tokens", type=qwen.number(int, lo=1), default=256, help="tokens to generate at most "
                   "(with --serve: where a request gives none)")
    p.add_argument("--temperature", type=qwen.number(float, lo=0, hi=2), default=0.0, help="0 is greedy")
    p.add_argument("--top-p", type=qwen.number(float, above=0, hi=1), default=1.0, help="nucleus sampling mass")
    p.add_argument("--serve", action="store_true", help="serve POST /v1/chat/completions and GET /v1/models")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 exposes it to the network)")
    p.add_argument("--port", type=qwen.number(int, lo=0, hi=65535), default=8000, help="port; 0 picks a free one")
    p.add_argument("--name", help="the model name clients ask for (default: the folder's name)")
    p.add_argument("--max-body", type=qwen.number(int, lo=1), default=MAX_BODY, help="largest request body, bytes")
    p.add_argument("--quiet", action="store_true", help="no line per request")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], help="weights dtype (default: bfloat16 on cuda, "
                   "float32 on cpu)")
    return p


def report(reply: Reply, full_ms: float | None) -> str:
    """The routing and speed line printed after a turn (to standard error)."""
    r, speed = reply.routing, f"{reply.completion_tokens} tokens, {reply.ms_per_token:.1f} ms/token"
    if r is None:
        return f"every block runs (no routers); {speed}"
    skipped = ", ".join(map(str, r["skipped"])) or "none"
    units = "blocks" if r["gate_unit"] == "block" else "half-blocks (2i: block i's attention, 2i + 1: its MLP)"
    return (f"skipped {len(r['skipped'])} of {r['blocks']} {units} ({skipped}) at threshold {r['threshold']:g}: "
            f"{r['flops_skipped_pct']:.1f}% of the FLOPs, LM head counted; {speed} routed, "
            f"{full_ms:.1f} ms/token with every block on")


def main(argv=None):
    args = parser().parse_args(argv)
    qwen.set_attention_backends()
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))
    model, tok = load(args.run, args.model, args.tokenizer, args.device, dtype)
    if args.threshold is not None and isinstance(model, lr.LayerRoute):
        model.threshold = args.threshold
    if args.serve:
        name = args.name or os.path.basename(os.path.normpath(args.run or args.model))
        return serve(model, tok, name, args.host, args.port, args.max_tokens, args.max_body, args.quiet)
    messages, tools = read_conversation(args.conversation)
    reply = complete(model, tok, messages, tools, max_tokens=args.max_tokens, temperature=args.temperature,
                     top_p=args.top_p)
    print(json.dumps({"content": reply.content, "tool_calls": reply.tool_calls,
                      "finish_reason": reply.finish_reason}, ensure_ascii=False))
    full = ms_per_token_every_block(model, tok, messages, tools, max(reply.completion_tokens, 2)) \
        if reply.routing else None
    print(report(reply, full), file=sys.stderr)
    return reply


if __name__ == "__main__":
    qwen.cli(main)
