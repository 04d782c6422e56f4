"""Tests for layerroute: each checks behaviour against an independent reference or an invariant.

The decoder is compared with transformers' Qwen2ForCausalLM on tiny random checkpoints written
here in the official layout; data fixtures are written here in each source's native format.
Nothing is downloaded. Run: python -m pytest -q test_layerroute.py
"""
import contextlib
import inspect
import json
import math
import os
import re
import signal
import socket
import struct
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

import qwen

# ---- qwen ----

def tiny_config(heads=4, kv_heads=2, tie=True, layers=2, **extra) -> dict:
    """A 2-layer Qwen2 config.json small enough for a CPU test in milliseconds."""
    return {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 16 * heads,
            "intermediate_size": 96, "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": kv_heads, "vocab_size": 300, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
            "tie_word_embeddings": tie, "hidden_act": "silu", "max_position_embeddings": 512,
            "use_sliding_window": False, "bos_token_id": 1, "eos_token_id": 2, **extra}


def write_checkpoint(folder, seed=0, shard=False, **cfg_kwargs):
    """Write a random checkpoint with transformers itself (official key names and layout)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(seed)
    ref = Qwen2ForCausalLM(Qwen2Config(**tiny_config(**cfg_kwargs))).eval()
    with torch.no_grad():  # non-trivial biases and norms, so a dropped term would show
        for name, p in ref.named_parameters():
            if "bias" in name or "norm" in name:
                p.add_(torch.randn_like(p) * 0.5)
    ref.save_pretrained(folder, max_shard_size="20KB" if shard else "5GB")
    return ref


@pytest.mark.parametrize("heads,kv_heads,tie", [(4, 4, True), (4, 2, False), (6, 2, True)])
def test_qwen_logits_match_transformers(tmp_path, heads, kv_heads, tie):
    ref = write_checkpoint(tmp_path, heads=heads, kv_heads=kv_heads, tie=tie)
    ours = qwen.load_model(str(tmp_path))
    ids = torch.randint(0, 300, (3, 21))
    with torch.no_grad():
        diff = (ours(ids) - ref(ids).logits).abs().max().item()
    assert diff <= 1e-4, diff


def test_qwen_right_padding_leaves_real_tokens_unchanged(tmp_path):
    ref = write_checkpoint(tmp_path)
    ours = qwen.load_model(str(tmp_path))
    ids = torch.randint(3, 300, (2, 15))
    padded = ids.clone()
    padded[1, 9:] = 0  # row 1 is 9 real tokens then padding
    with torch.no_grad():
        a, b = ours(padded), ref(ids[1:, :9]).logits
    assert (a[1, :9] - b[0]).abs().max() <= 1e-4
    assert (a[0] - ref(ids[:1]).logits[0]).abs().max() <= 1e-4


def test_qwen_sharded_checkpoint_loads(tmp_path):
    ref = write_checkpoint(tmp_path, shard=True, tie=False)
    assert (tmp_path / "model.safetensors.index.json").exists()
    ids = torch.randint(0, 300, (1, 7))
    with torch.no_grad():
        assert (qwen.load_model(str(tmp_path))(ids) - ref(ids).logits).abs().max() <= 1e-4


def test_qwen_cached_decoding_equals_full_forward(tmp_path):
    write_checkpoint(tmp_path)
    m = qwen.load_model(str(tmp_path))
    ids = torch.randint(0, 300, (2, 20))
    with torch.no_grad():
        full = m(ids)
        cache = m.new_cache(2, 32)
        steps = [m(ids[:, :8], cache=cache), m(ids[:, 8:13], cache=cache)]  # prefill, then a chunk
        steps += [m(ids[:, t:t + 1], cache=cache) for t in range(13, 20)]  # then one token at a time
    assert (torch.cat(steps, 1) - full).abs().max() <= 1e-4


def test_qwen_greedy_generation_matches_transformers(tmp_path):
    ref = write_checkpoint(tmp_path, tie=False)
    m = qwen.load_model(str(tmp_path))
    ids = torch.randint(3, 300, (1, 6))
    theirs = ref.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=None,
                          attention_mask=torch.ones_like(ids))[0, 6:].tolist()
    assert qwen.generate(m, ids, 12)[0] == theirs
    stop = theirs[4]  # stopping: the row ends at (and includes) its first stop token
    assert qwen.generate(m, ids, 12, stop={stop})[0] == theirs[:theirs.index(stop) + 1]


def prompts_of(lengths, seed=0) -> list[list[int]]:
    """Random prompts of the given lengths (ids 3.. : none is a stop token)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 300, (n,), generator=g).tolist() for n in lengths]


MIXED = (3, 11, 6, 11, 8)  # four lengths: a row left-padded by 8, two unpadded rows of equal length


@torch.no_grad()
def prefill_then_steps(model, prompts: list[list[int]], more: torch.Tensor):
    """Logits (B, T + k, vocab) of the prompts left-padded to T, then of more (B, k) fed one token a step
    through the KV cache (generation's path, with given tokens); the cache; and the prefill's scores."""
    ids, pad = qwen.left_pad(prompts, "cpu")
    cache = model.new_cache(len(prompts), ids.shape[1] + more.shape[1], pad)
    logits = [model(ids, cache=cache)]
    scores = getattr(model, "last_scores", None)
    logits += [model(more[:, t:t + 1], cache=cache) for t in range(more.shape[1])]
    return torch.cat(logits, 1), cache, scores


def test_qwen_left_padded_batch_is_each_prompt_alone(tmp_path):
    """Left padding changes nothing a row computes: its logits at prefill and at each decode step, its
    cached keys (RoPE turns them by the row's own positions) and its greedy continuation are the
    prompt's alone, at batch 1."""
    write_checkpoint(tmp_path)
    m = qwen.load_model(str(tmp_path))
    prompts, more = prompts_of(MIXED), torch.randint(3, 300, (len(MIXED), 4))
    ids, pad = qwen.left_pad(prompts, "cpu")
    assert pad.tolist() == [8, 0, 5, 0, 3] and qwen.left_pad(prompts[1:2] * 2, "cpu")[1] is None
    mask = qwen.padding_mask(pad, 0, ids.shape[1])  # (B, 1, T, T)
    assert mask.any(-1).all() and not mask[0, 0, 8:, :8].any()  # a query sees itself at least, a real one no pad
    logits, cache, _ = prefill_then_steps(m, prompts, more)
    for b, p in enumerate(prompts):
        alone, one, _ = prefill_then_steps(m, [p], more[b:b + 1])
        torch.testing.assert_close(logits[b, pad[b]:], alone[0], atol=1e-5, rtol=1e-5)
        for kv, kv1 in zip(cache, one):
            torch.testing.assert_close(kv.k[b, :, pad[b]:kv.len], kv1.k[0, :, :kv1.len], atol=1e-5, rtol=1e-5)
    alone = [qwen.generate(m, [p], 10)[0] for p in prompts]
    assert qwen.generate(m, prompts, 10) == alone
    stop = alone[0][3]  # row 0 ends early (at its stop token), the others go on
    assert qwen.generate(m, prompts, 10, stop={stop}) == [qwen.generate(m, [p], 10, stop={stop})[0] for p in prompts]
    assert qwen.generate(m, torch.tensor(prompts[1:2] * 2), 10) == alone[1:2] * 2  # equal lengths: a tensor too


@pytest.mark.parametrize("field,value", [("model_type", "gpt2"), ("rope_scaling", {"type": "yarn", "factor": 4.0}),
                                         ("use_sliding_window", True), ("hidden_act", "gelu")])
def test_qwen_refuses_unsupported_config(tmp_path, field, value):
    (tmp_path / "config.json").write_text(json.dumps(tiny_config(**{field: value})))
    with pytest.raises(ValueError, match=field):
        qwen.QwenConfig.from_json(str(tmp_path / "config.json"))


def test_qwen_reports_every_bad_tensor_by_name(tmp_path):
    from safetensors.torch import load_file, save_file
    write_checkpoint(tmp_path, tie=False)
    sd = load_file(tmp_path / "model.safetensors")
    del sd["model.layers.0.self_attn.q_proj.bias"]
    sd["model.layers.1.mlp.up_proj.weight"] = torch.zeros(3, 3)
    sd["model.extra.weight"] = torch.zeros(1)
    save_file(sd, tmp_path / "model.safetensors")
    with pytest.raises(ValueError) as err:
        qwen.load_model(str(tmp_path))
    msg = str(err.value)
    assert "missing layers.0.self_attn.q_proj.bias" in msg
    assert "unexpected extra.weight" in msg
    assert "shape of layers.1.mlp.up_proj.weight" in msg
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        os.remove(tmp_path / "model.safetensors")
        qwen.load_model(str(tmp_path))


def test_qwen_flops_hand_count():
    """Qwen2.5-0.5B: per-token weights by hand from MISSION's shapes (d 896, 14/2 heads of 64, ff 4864)."""
    cfg = qwen.QwenConfig(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                          num_key_value_heads=2, vocab_size=151936)
    attn_w = 896 * 896 + 896 * 128 + 896 * 128 + 896 * 896  # q, k, v, o = 1,835,008
    mlp_w = 3 * 896 * 4864  # gate, up, down = 13,074,432
    per_block, head = qwen.forward_flops(cfg, context=100)
    assert per_block == 2 * (attn_w + mlp_w) + 2 * 2 * 896 * 100  # QK^T and AV over 100 keys
    assert head == 2 * 136_134_656  # the tied LM head: 896 x 151,936
    assert 24 * (attn_w + mlp_w) + 136_134_656 == 493_961_216  # ~494M weights that multiply per token
# Faults in reading configs, checkpoints and model names: each test reproduces one (tiny models, no
# network: the hub is offline, its cache an empty folder under tmp_path).

REQUIRED = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "vocab_size")


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """huggingface_hub offline with an empty cache. It reads HF_HUB_OFFLINE and HF_HOME when first
    imported (transformers has imported it already), so its constants are set as well as the env."""
    import huggingface_hub.constants as hub
    home = tmp_path / "hf_home"
    (home / "hub").mkdir(parents=True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "HF_HOME", str(home))
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(home / "hub"))
    return home / "hub"


def one_line_error(fn, *names, kind=(ValueError, OSError)):
    """fn() fails with a one-line error of `kind` naming each of `names`; its message."""
    with pytest.raises(kind) as err:
        fn()
    msg = str(err.value)
    assert "\n" not in msg, msg
    for name in names:
        assert str(name) in msg, (name, msg)
    return msg


def within(seconds, fn):
    """fn() under a wall-clock alarm, so a fault that runs for minutes fails the test in seconds."""
    def expire(*_):
        raise TimeoutError(f"still running after {seconds} s")
    old = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        return fn()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def edit_config(folder, drop=(), **set_fields):
    path = folder / "config.json"
    raw = json.loads(path.read_text())
    for k in drop:
        raw.pop(k, None)
    raw.update(set_fields)
    path.write_text(json.dumps(raw))
    return path


def tensor_offset(path, name) -> int:
    """Where tensor `name`'s bytes start in a safetensors file (8-byte header length, JSON header, data)."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return 8 + n + json.loads(data[8:8 + n])[name]["data_offsets"][0]


def small_cfg(**fields) -> dict:
    return {**{k: v for k, v in tiny_config().items() if k in REQUIRED}, **fields}


# -- defaults are transformers' for Qwen2

def test_qwen_config_defaults_are_transformers_qwen2_defaults():
    from transformers import Qwen2Config
    theirs, ours = Qwen2Config(), qwen.QwenConfig(**small_cfg())
    assert ours.rope_theta == theirs.rope_parameters["rope_theta"]
    for field in ("rms_norm_eps", "tie_word_embeddings", "bos_token_id", "eos_token_id"):
        assert getattr(ours, field) == getattr(theirs, field), field


def test_qwen_config_without_tie_or_rope_theta_loads_as_transformers_does(tmp_path, offline_hub):
    from transformers import Qwen2ForCausalLM
    write_checkpoint(tmp_path, tie=False)
    edit_config(tmp_path, drop=("tie_word_embeddings", "rope_theta", "rope_parameters"))
    ref = Qwen2ForCausalLM.from_pretrained(str(tmp_path)).eval()
    assert not ref.config.tie_word_embeddings and ref.config.rope_parameters["rope_theta"] == 1e4
    ours = qwen.load_model(str(tmp_path))
    ids = torch.randint(0, 300, (2, 40))
    with torch.no_grad():
        assert (ours(ids) - ref(ids).logits).abs().max().item() <= 1e-4


def test_qwen_rope_parameters_theta_wins_over_a_stale_rope_theta(tmp_path):
    # transformers takes rope_parameters.rope_theta when a config has both
    path = tmp_path / "config.json"
    stale = tiny_config(rope_theta=1e6, rope_parameters={"rope_type": "default", "rope_theta": 5e5})
    path.write_text(json.dumps(stale))
    assert qwen.QwenConfig.from_json(str(path)).rope_theta == 5e5


# -- NaN or inf weights

def test_qwen_refuses_nan_weights_naming_tensor_and_file(tmp_path):
    write_checkpoint(tmp_path)
    path, name = tmp_path / "model.safetensors", "model.layers.0.mlp.up_proj.weight"
    with open(path, "r+b") as f:
        f.seek(tensor_offset(path, name))
        f.write(b"\xff" * 1000)  # 250 float32 NaNs
    one_line_error(lambda: qwen.load_model(str(tmp_path)), name, path, "NaN")


def test_qwen_refuses_inf_weights(tmp_path):
    from safetensors.torch import load_file, save_file
    write_checkpoint(tmp_path)
    path = tmp_path / "model.safetensors"
    sd = load_file(path)
    sd["model.norm.weight"][3] = float("inf")
    save_file(sd, path)
    one_line_error(lambda: qwen.load_model(str(tmp_path)), "model.norm.weight", path)



def test_qwen_finite_check_survives_a_sum_that_overflows():
    big = torch.full((10,), 60_000.0, dtype=torch.float16)  # each finite, their sum inf in float16
    assert qwen.all_finite(big) and not qwen.all_finite(torch.tensor([1.0, float("nan")]))
    assert not qwen.all_finite(torch.tensor([float("inf"), -float("inf")]))


# -- files that are not what they say, each named in a one-line error

def corrupt_config(folder):
    (folder / "config.json").write_text('{"hidden_size": 64,')
    return folder / "config.json"


def deep_config(folder):
    (folder / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    return folder / "config.json"


def corrupt_index(folder):
    (folder / "model.safetensors.index.json").write_text('{"weight_map": {"a": ')
    return folder / "model.safetensors.index.json"


def deep_index(folder):
    (folder / "model.safetensors.index.json").write_text('{"weight_map": ' + "[" * 100_000 + "]" * 100_000 + "}")
    return folder / "model.safetensors.index.json"


def index_without_weight_map(folder):
    (folder / "model.safetensors.index.json").write_text('{"metadata": {}}')
    return folder / "model.safetensors.index.json"


def truncated_safetensors(folder):
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    return path


def garbage_header(folder):
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:8] + b"\x00garbage, not JSON" + data[8 + 18:])
    return path


@pytest.mark.parametrize("damage", [corrupt_config, deep_config, corrupt_index, deep_index, index_without_weight_map,
                                    truncated_safetensors, garbage_header])
def test_qwen_unreadable_file_is_one_line_naming_it(tmp_path, damage):
    write_checkpoint(tmp_path, shard="index" in damage.__name__, tie=False)
    path = damage(tmp_path)
    one_line_error(lambda: qwen.load_model(str(tmp_path)), path)


def test_qwen_shard_the_index_lists_but_the_folder_lacks(tmp_path):
    write_checkpoint(tmp_path, shard=True, tie=False)
    index = tmp_path / "model.safetensors.index.json"
    shard = sorted(set(json.loads(index.read_text())["weight_map"].values()))[0]
    os.remove(tmp_path / shard)
    one_line_error(lambda: qwen.load_model(str(tmp_path)), index, shard, kind=FileNotFoundError)



def test_qwen_unreadable_tokenizer_json_is_named(tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": 7}')
    one_line_error(lambda: qwen.load_tokenizer(str(tmp_path)), tmp_path / "tokenizer.json", kind=ValueError)


# -- resource bombs fail before anything is built

@pytest.mark.parametrize("field,value", [("num_hidden_layers", 100_000), ("hidden_size", 10 ** 7),
                                         ("intermediate_size", 10 ** 9), ("vocab_size", 10 ** 9),
                                         ("num_attention_heads", 10 ** 6)])
def test_qwen_config_bomb_fails_fast_naming_the_field(tmp_path, field, value):
    write_checkpoint(tmp_path)
    path = edit_config(tmp_path, **{field: value})
    start = time.perf_counter()
    within(5, lambda: one_line_error(lambda: qwen.load_model(str(tmp_path)), path, field))
    within(5, lambda: one_line_error(lambda: qwen.random_model(qwen.QwenConfig.from_json(str(path))), field))
    assert time.perf_counter() - start < 3


@pytest.mark.parametrize("field,value", [("num_hidden_layers", 900), ("hidden_size", 4096), ("vocab_size", 10 ** 6)])
def test_qwen_config_checked_against_checkpoint_headers_before_building(tmp_path, monkeypatch, field, value):
    write_checkpoint(tmp_path)
    path = edit_config(tmp_path, **{field: value})
    monkeypatch.setattr(qwen, "Qwen2", None)  # building anything at all would fail differently
    within(5, lambda: one_line_error(lambda: qwen.load_model(str(tmp_path)), path, field))


@pytest.mark.parametrize("fields,named", [
    ({"hidden_size": 0}, "hidden_size"), ({"num_key_value_heads": -2}, "num_key_value_heads"),
    ({"vocab_size": 300.0}, "vocab_size"), ({"intermediate_size": "96"}, "intermediate_size"),
    ({"num_hidden_layers": True}, "num_hidden_layers"), ({"num_hidden_layers": 1001}, "num_hidden_layers"),
    ({"num_attention_heads": 5}, "num_attention_heads"),  # 64 is not 5 heads of a whole size
    ({"head_dim": 15}, "head_dim"), ({"rope_theta": 0}, "rope_theta"), ({"rms_norm_eps": "1e-6"}, "rms_norm_eps"),
    ({"tie_word_embeddings": "yes"}, "tie_word_embeddings")])
def test_qwen_config_refuses_bad_numbers_naming_the_field(tmp_path, fields, named):
    one_line_error(lambda: qwen.QwenConfig(**small_cfg(**fields)), named, kind=ValueError)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(tiny_config(**fields)))
    one_line_error(lambda: qwen.QwenConfig.from_json(str(path)), path, named, kind=ValueError)


def test_qwen_config_head_dim_given_needs_no_divisible_hidden_size():
    cfg = qwen.QwenConfig(**small_cfg(num_attention_heads=6, num_key_value_heads=2, head_dim=16))
    assert cfg.head_dim == 16


def test_qwen_parameter_count_is_the_built_models():
    for tie in (True, False):
        cfg = qwen.QwenConfig(**small_cfg(tie_word_embeddings=tie))
        assert qwen.parameter_count(cfg) == sum(p.numel() for p in qwen.Qwen2(cfg).parameters())


def test_qwen_random_model_too_big_for_memory_fails_fast():
    cfg = qwen.QwenConfig(hidden_size=65_536, intermediate_size=1_048_576, num_hidden_layers=1_000,
                          num_attention_heads=512, num_key_value_heads=512, vocab_size=4_194_304)
    within(5, lambda: one_line_error(lambda: qwen.random_model(cfg), "random_model", "GiB", kind=ValueError))


# -- shards named outside the model folder

@pytest.mark.parametrize("entry", ["../other/model.safetensors", "ABSOLUTE", "link.safetensors"])
def test_qwen_index_entry_outside_the_folder_is_refused(tmp_path, entry):
    write_checkpoint(tmp_path / "other")
    outside = tmp_path / "other" / "model.safetensors"
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text((tmp_path / "other" / "config.json").read_text())
    if entry == "ABSOLUTE":
        entry = str(outside)
    if entry == "link.safetensors":
        os.symlink(outside, model / entry)
    from safetensors import safe_open
    with safe_open(str(outside), framework="pt") as f:
        weight_map = {k: entry for k in f.keys()}
    index = model / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    one_line_error(lambda: qwen.load_model(str(model)), index, entry)


def fake_hub_snapshot(cache, ref_folder, repo="org/tiny", rev="0" * 40):
    """The hub cache's layout: snapshots/<rev>/<file> are links into blobs/, refs/main names the revision."""
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "blobs").mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(rev)
    snap = root / "snapshots" / rev
    snap.mkdir(parents=True)
    for i, name in enumerate(sorted(os.listdir(ref_folder))):
        blob = root / "blobs" / f"blob{i}"
        blob.write_bytes((ref_folder / name).read_bytes())
        os.symlink(os.path.join("..", "..", "blobs", blob.name), snap / name)
    return snap


def test_qwen_hub_cache_links_into_blobs_still_load(tmp_path, offline_hub):
    ref = write_checkpoint(tmp_path / "src", shard=True, tie=False)
    fake_hub_snapshot(offline_hub, tmp_path / "src")
    ours = qwen.load_model("org/tiny")  # offline: resolved from the cache, links and all
    ids = torch.randint(0, 300, (1, 9))
    with torch.no_grad():
        assert (ours(ids) - ref(ids).logits).abs().max().item() <= 1e-4


# -- model names: a mistyped local path is not a hub id; a hub id that cannot be fetched says so

@pytest.mark.parametrize("name", ["runs/mdoel", "./x", "a/b/c", "~/no-such-model", "/no/such/model", "../up"])
def test_qwen_mistyped_local_path_is_a_missing_folder(tmp_path, monkeypatch, offline_hub, name):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "runs").mkdir()
    one_line_error(lambda: qwen.resolve(name), name, "no such model folder", kind=FileNotFoundError)
    one_line_error(lambda: qwen.load_model(name), name, "no such model folder", kind=FileNotFoundError)
    one_line_error(lambda: qwen.load_tokenizer(name), name, kind=FileNotFoundError)


@pytest.mark.parametrize("name", ["Qwen/Qwen2.5-0.5B-Instruct", "gpt2"])
def test_qwen_hub_id_offline_is_one_line_saying_what_to_pass(tmp_path, monkeypatch, offline_hub, name):
    monkeypatch.chdir(tmp_path)
    one_line_error(lambda: qwen.load_model(name), f"cannot download {name} from the hub", "--model DIR",
                   kind=OSError)
    one_line_error(lambda: qwen.load_tokenizer(name), f"cannot download {name} from the hub", kind=OSError)


def test_qwen_folder_without_config_is_named(tmp_path):
    (tmp_path / "empty").mkdir()
    one_line_error(lambda: qwen.load_model(str(tmp_path / "empty")), tmp_path / "empty", "config.json",
                   kind=FileNotFoundError)


# -- a checkpoint that does not match config.json: one line

def test_qwen_mismatch_is_one_line_with_the_first_few_problems(tmp_path):
    write_checkpoint(tmp_path)
    edit_config(tmp_path, intermediate_size=97)  # 3 MLP shapes in each of 2 layers
    msg = one_line_error(lambda: qwen.load_model(str(tmp_path)), "does not match config.json",
                         "shape of layers.0.mlp.gate_proj.weight", kind=ValueError)
    assert msg.count("; ") == 5 and msg.endswith("and 1 more"), msg


def test_qwen_untied_config_missing_head_says_how_to_tie(tmp_path):
    from safetensors.torch import load_file, save_file
    write_checkpoint(tmp_path, tie=False)
    sd = load_file(tmp_path / "model.safetensors")
    del sd["lm_head.weight"]
    save_file(sd, tmp_path / "model.safetensors")
    one_line_error(lambda: qwen.load_model(str(tmp_path)), "missing lm_head.weight", "tie_word_embeddings",
                   kind=ValueError)


def test_qwen_cli_prints_one_line(tmp_path, capsys, monkeypatch):
    write_checkpoint(tmp_path)
    truncated_safetensors(tmp_path)
    monkeypatch.delenv("LAYERROUTE_DEBUG", raising=False)
    capsys.readouterr()  # transformers' progress bar from writing the checkpoint
    with pytest.raises(SystemExit) as done:
        qwen.cli(lambda: qwen.load_model(str(tmp_path)))
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model.safetensors" in err and "Error:" not in err, err


# Model families: Qwen3 and Llama checkpoints that transformers saves, against its own classes.

SIZES = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "vocab_size": 300}


def family_config(family: str, tie=True, **extra) -> dict:
    """A tiny config of `family`; qwen3's head_dim (24) is not hidden_size / heads (16), as in Qwen3-0.6B."""
    common = {**SIZES, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": tie,
              "hidden_act": "silu", "max_position_embeddings": 512, "bos_token_id": 1, "eos_token_id": 2}
    if family == "qwen3":
        return {**common, "head_dim": 24, "use_sliding_window": False, **extra}
    return {**common, **extra}


def family_checkpoint(folder, family: str, seed=0, shard=False, **cfg_kwargs):
    """Write a random `family` checkpoint with transformers itself (its key names, layout and config.json)."""
    import transformers
    name = {"qwen3": "Qwen3", "llama": "Llama"}[family]
    config = getattr(transformers, f"{name}Config")(**family_config(family, **cfg_kwargs))
    torch.manual_seed(seed)
    ref = getattr(transformers, f"{name}ForCausalLM")(config).eval()
    with torch.no_grad():  # non-trivial biases and norms (q_norm and k_norm too), so a dropped term would show
        for pname, p in ref.named_parameters():
            if "bias" in pname or "norm" in pname:
                p.add_(torch.randn_like(p) * 0.5)
    ref.save_pretrained(folder, max_shard_size="20KB" if shard else "5GB", safe_serialization=True)
    return ref


def max_diff(ours, ref, ids) -> float:
    with torch.no_grad():
        return (ours(ids) - ref(ids).logits).abs().max().item()


# -- logits against transformers

@pytest.mark.parametrize("family,kwargs", [
    ("qwen3", dict(tie=True)), ("qwen3", dict(tie=False)), ("qwen3", dict(attention_bias=True, num_key_value_heads=4)),
    ("llama", dict(tie=True)), ("llama", dict(tie=False, num_key_value_heads=4)),
    ("llama", dict(attention_bias=True, mlp_bias=True)), ("llama", dict(head_dim=24, tie=False))])
def test_family_logits_match_transformers(tmp_path, family, kwargs):
    ref = family_checkpoint(tmp_path, family, **kwargs)
    ours = qwen.load_model(str(tmp_path))
    names = {k for k, _ in ours.named_parameters()}
    assert ("layers.0.self_attn.q_norm.weight" in names) == (family == "qwen3")
    assert ("layers.0.self_attn.q_proj.bias" in names) == kwargs.get("attention_bias", False)
    assert ("layers.0.self_attn.o_proj.bias" in names) == kwargs.get("attention_bias", False)
    assert ("layers.0.mlp.up_proj.bias" in names) == kwargs.get("mlp_bias", False)
    diff = max_diff(ours, ref, torch.randint(0, 300, (3, 21)))
    print(f"{family} {kwargs}: max |logit diff| {diff:.2e}")
    assert diff <= 1e-4, diff


@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_family_sharded_checkpoint_loads(tmp_path, family):
    ref = family_checkpoint(tmp_path, family, shard=True, tie=False)
    assert (tmp_path / "model.safetensors.index.json").exists()
    diff = max_diff(qwen.load_model(str(tmp_path)), ref, torch.randint(0, 300, (2, 9)))
    print(f"{family} sharded: max |logit diff| {diff:.2e}")
    assert diff <= 1e-4, diff


@pytest.mark.usefixtures("offline_hub")
def test_qwen3_without_head_dim_is_transformers_default_128(tmp_path):
    from transformers import Qwen3ForCausalLM
    family_checkpoint(tmp_path, "qwen3", head_dim=128)
    edit_config(tmp_path, drop=("head_dim",))
    ref = Qwen3ForCausalLM.from_pretrained(str(tmp_path)).eval()
    ours = qwen.load_model(str(tmp_path))
    assert ours.cfg.head_dim == ref.config.head_dim == 128  # not hidden_size / heads = 16
    diff = max_diff(ours, ref, torch.randint(0, 300, (2, 13)))
    print(f"qwen3 head_dim absent: max |logit diff| {diff:.2e}")
    assert diff <= 1e-4, diff


# -- Llama 3's RoPE rescaling

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}


def test_llama3_rope_matches_transformers_where_the_scaling_matters(tmp_path):
    # head_dim 16, theta 1e4: wavelengths 6.3 (below 64 / 4: kept), 20 and 63 (between: smoothed) and
    # 199 to 6300 (above 64 / 1: stretched 8x), over positions up to 95, past the original 64
    ref = family_checkpoint(tmp_path, "llama", tie=False, rope_scaling=LLAMA3)
    ours = qwen.load_model(str(tmp_path))
    theirs = ref.model.rotary_emb.inv_freq
    ours_freq = qwen.rope_inv_freq(ours.cfg, "cpu")
    assert torch.equal(ours_freq, theirs), (ours_freq, theirs)
    plain = qwen.rope_inv_freq(qwen.QwenConfig(**SIZES), "cpu")
    kept, stretched = ours_freq == plain, ours_freq == plain / 8
    assert kept.sum() == 1 and stretched.sum() == 5 and (~kept & ~stretched).sum() == 2  # each regime is there
    ids = torch.randint(0, 300, (2, 96))
    diff = max_diff(ours, ref, ids)
    edit_config(tmp_path, drop=("rope_parameters",))  # the same weights with plain RoPE
    unscaled = qwen.load_model(str(tmp_path))
    assert unscaled.cfg.llama3_rope is None
    with torch.no_grad():
        moved = (ours(ids) - unscaled(ids)).abs().max().item()
    print(f"llama3 RoPE: max |logit diff| {diff:.2e}; scaled vs unscaled {moved:.2e}")
    assert diff <= 1e-4, diff
    assert moved > 1e-3, moved


@pytest.mark.usefixtures("offline_hub")
def test_llama3_rope_in_the_older_rope_scaling_layout(tmp_path):
    """Older exports: rope_scaling with "type", rope_theta at the top level, the original context given
    outside it (a top-level original_max_position_embeddings wins in transformers)."""
    from transformers import LlamaForCausalLM
    family_checkpoint(tmp_path, "llama", rope_scaling=LLAMA3)
    old = {"type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 2.0,
           "original_max_position_embeddings": 500}
    path = edit_config(tmp_path, drop=("rope_parameters",), rope_scaling=old, rope_theta=500.0,
                       original_max_position_embeddings=32)
    cfg = qwen.QwenConfig.from_json(str(path))
    assert cfg.rope_theta == 500.0
    assert cfg.llama3_rope == {"factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 2.0,
                               "original_max_position_embeddings": 32}
    ref = LlamaForCausalLM.from_pretrained(str(tmp_path)).eval()
    ours = qwen.load_model(str(tmp_path))
    assert torch.equal(qwen.rope_inv_freq(ours.cfg, "cpu"), ref.model.rotary_emb.inv_freq)
    diff = max_diff(ours, ref, torch.randint(0, 300, (1, 80)))
    print(f"llama3 RoPE, rope_scaling layout: max |logit diff| {diff:.2e}")
    assert diff <= 1e-4, diff


# -- decoding

def test_qwen3_cached_decoding_equals_full_forward(tmp_path):
    family_checkpoint(tmp_path, "qwen3")
    m = qwen.load_model(str(tmp_path))
    ids = torch.randint(0, 300, (2, 20))
    with torch.no_grad():
        full = m(ids)
        cache = m.new_cache(2, 32)
        assert cache[0].k.shape == (2, 2, 32, 24)  # the cache holds head_dim, not hidden_size / heads
        steps = [m(ids[:, :8], cache=cache), m(ids[:, 8:13], cache=cache)]  # prefill, then a chunk
        steps += [m(ids[:, t:t + 1], cache=cache) for t in range(13, 20)]  # then one token at a time
    assert (torch.cat(steps, 1) - full).abs().max() <= 1e-4


@pytest.mark.parametrize("rope_scaling", [None, LLAMA3])
def test_llama_greedy_generation_matches_transformers(tmp_path, rope_scaling):
    ref = family_checkpoint(tmp_path, "llama", tie=False, rope_scaling=rope_scaling)
    m = qwen.load_model(str(tmp_path))
    ids = torch.randint(3, 300, (1, 60))  # long enough that llama3 RoPE changes the rotation
    theirs = ref.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=None,
                          attention_mask=torch.ones_like(ids))[0, 60:].tolist()
    assert qwen.generate(m, ids, 12)[0] == theirs


# -- config.json: defaults and refusals

@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_family_defaults_are_transformers(tmp_path, family):
    import transformers
    theirs = getattr(transformers, {"qwen3": "Qwen3Config", "llama": "LlamaConfig"}[family])(**SIZES)
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": family, **SIZES}))
    ours = qwen.QwenConfig.from_json(str(path))
    assert ours.rope_theta == theirs.rope_parameters["rope_theta"]
    for field in ("rms_norm_eps", "tie_word_embeddings", "bos_token_id", "eos_token_id", "head_dim"):
        assert getattr(ours, field) == getattr(theirs, field), field
    assert ours.qkv_bias == ours.o_bias == theirs.attention_bias
    assert ours.mlp_bias == getattr(theirs, "mlp_bias", False)
    assert ours.qk_norm == (family == "qwen3") and ours.llama3_rope is None


def test_llama_without_num_key_value_heads_has_one_per_head(tmp_path):
    from transformers import LlamaConfig
    path = tmp_path / "config.json"
    sizes = {k: v for k, v in SIZES.items() if k != "num_key_value_heads"}
    path.write_text(json.dumps({"model_type": "llama", **sizes}))
    assert qwen.QwenConfig.from_json(str(path)).num_key_value_heads == LlamaConfig(**sizes).num_key_value_heads == 4


def test_qwen2_keeps_its_fixed_biases_whatever_attention_bias_says(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "qwen2", "attention_bias": False, "mlp_bias": True, **SIZES}))
    cfg = qwen.QwenConfig.from_json(str(path))
    assert (cfg.qkv_bias, cfg.o_bias, cfg.qk_norm, cfg.mlp_bias) == (True, False, False, False)


@pytest.mark.parametrize("family,fields,named", [
    ("llama", {"rope_scaling": {"type": "yarn", "factor": 4.0}}, "rope_scaling"),
    ("llama", {"rope_parameters": {"rope_type": "linear", "factor": 2.0}}, "rope_parameters"),
    ("qwen3", {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "rope_scaling"),
    ("llama", {"rope_scaling": {**LLAMA3, "low_freq_factor": None}}, "low_freq_factor"),
    ("llama", {"rope_scaling": {**LLAMA3, "high_freq_factor": 1.0}}, "high_freq_factor"),
    ("llama", {"rope_scaling": {**LLAMA3, "factor": -8}}, "factor"),
    ("qwen3", {"use_sliding_window": True}, "use_sliding_window"),
    ("qwen3", {"layer_types": ["full_attention", "sliding_attention"]}, "layer_types"),
    ("llama", {"attention_bias": "yes"}, "attention_bias"), ("llama", {"mlp_bias": 1}, "mlp_bias"),
    ("llama", {"hidden_act": "gelu"}, "hidden_act"), ("gpt2", {}, "model_type"),
    ("mistral", {}, "model_type")])
def test_family_refuses_what_it_does_not_implement(tmp_path, family, fields, named):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**family_config("qwen3" if family == "qwen3" else "llama"), "model_type": family,
                                **fields}))
    one_line_error(lambda: qwen.QwenConfig.from_json(str(path)), path, named, kind=ValueError)


# -- sizes: parameters and FLOPs

@pytest.mark.parametrize("flags", [dict(), dict(qkv_bias=False, qk_norm=True, head_dim=24),
                                   dict(qkv_bias=True, o_bias=True, mlp_bias=True, tie_word_embeddings=True)])
def test_family_parameter_count_is_the_built_models(flags):
    cfg = qwen.QwenConfig(**SIZES, **flags)
    assert qwen.parameter_count(cfg) == sum(p.numel() for p in qwen.Qwen2(cfg).parameters())


def test_qwen3_flops_hand_count():
    """Qwen3-0.6B's shapes: d 1024, 16 query heads and 8 key-value heads of 128 (16 x 128 = 2048, not d),
    ff 3072, 28 layers, vocab 151936, tied."""
    cfg = qwen.QwenConfig(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                          num_key_value_heads=8, vocab_size=151936, head_dim=128, tie_word_embeddings=True,
                          qkv_bias=False, qk_norm=True)
    attn_w = 1024 * 2048 + 1024 * 1024 + 1024 * 1024 + 2048 * 1024  # q, k, v, o = 6,291,456
    mlp_w = 3 * 1024 * 3072  # gate, up, down = 9,437,184
    per_block, head = qwen.forward_flops(cfg, context=100)
    assert per_block == 2 * (attn_w + mlp_w) + 2 * 2 * 2048 * 100  # QK^T and AV: 16 heads x 128 over 100 keys
    assert head == 2 * 1024 * 151936
    assert 28 * (attn_w + mlp_w) == 440_401_920  # the model card's 0.44B non-embedding parameters, less norms


# -- LayerRoute wraps each family

@pytest.mark.parametrize("family,kwargs", [("qwen3", dict(tie=True)),
                                           ("llama", dict(tie=False, attention_bias=True, mlp_bias=True))])
def test_layerroute_wraps_each_family(tmp_path, family, kwargs):
    import layerroute as lr
    family_checkpoint(tmp_path, family, **kwargs)
    base = qwen.load_model(str(tmp_path))
    m = lr.LayerRoute(qwen.load_model(str(tmp_path))).eval()
    assert sum(isinstance(x, lr.LoRALinear) for x in m.modules()) == 7 * base.cfg.num_hidden_layers
    m.open_gates = True  # every gate open, every LoRA B still 0: exactly the base model
    ids = torch.randint(3, 300, (2, 17))
    with torch.no_grad():
        assert torch.equal(m(ids), base(ids))
        assert qwen.generate(m, ids, 6) == qwen.generate(base, ids, 6)
        m.open_gates = False
        logits = m(ids, prompt_lens=torch.tensor([9, 17]))
    assert logits.shape == (2, 17, 300) and torch.isfinite(logits).all()
    assert m.last_gates.shape == (2, base.cfg.num_hidden_layers)


# ---- end qwen ----

# ---- data ----

import itertools  # noqa: E402

import data  # noqa: E402

# Qwen2.5's system turn with tools, written out by hand from its chat_template.
QWEN_TOOLS_HEAD = ("\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
                   "You are provided with function signatures within <tools></tools> XML tags:\n<tools>")
QWEN_TOOLS_TAIL = ("\n</tools>\n\nFor each function call, return a json object with function name and "
                   "arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
                   '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n')
QWEN_DEFAULT = "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"

HERMES = [  # tools and calls as Python-dict literals, two calls in one turn, two results in one tool turn
    {"id": "h-ok", "conversations": [
        {"from": "system", "value": "You are a function calling AI model.\n<tools>\n[{'type': 'function', "
         "'function': {'name': 'get_weather', 'parameters': {'type': 'object', 'properties': {'city': "
         "{'type': 'string'}}}}}, {'type': 'function', 'function': {'name': 'get_time', 'parameters': {}}}]"
         "\n</tools>\nFor each function call return a json object ... {'arguments': <args-dict>, "
         "'name': <function-name>}\n</tool_call>\n"},
        {"from": "human", "value": "Weather and time in Zürich?"},
        {"from": "gpt", "value": "Let me check.\n<tool_call>\n{'arguments': {'city': 'Zürich', 'metric': True},"
         " 'name': 'get_weather'}\n</tool_call>\n<tool_call>\n{'arguments': {}, 'name': 'get_time'}\n</tool_call>\n"},
        {"from": "tool", "value": "<tool_response>\n{\"temp\": 21}\n</tool_response>\n<tool_response>\n10:00\n"
         "</tool_response>\n"},
        {"from": "gpt", "value": "It is 21 degrees."}]},
    {"id": "h-broken", "conversations": [  # an unclosed dict: neither JSON nor a Python literal
        {"from": "human", "value": "x"}, {"from": "gpt", "value": "<tool_call>\n{'name': 'f'\n</tool_call>"}]},
    {"id": "h-text", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]},
]
GLAIVE = [  # arguments as a quoted JSON string; a chat with no call; a record without its chat
    {"system": "SYSTEM: You are a helpful assistant with access to the following functions. Use them if "
     "required -\n{\n    \"name\": \"convert\",\n    \"parameters\": {}\n}\n",
     "chat": "USER: 5 USD in EUR?\n\n\nASSISTANT: <functioncall> {\"name\": \"convert\", \"arguments\": "
     "'{\"amount\": 5, \"to\": \"EUR\"}'} <|endoftext|>\n\n\nFUNCTION RESPONSE: {\"result\": 4.6}\n\n\n"
     "ASSISTANT: 4.6 EUR. <|endoftext|>\n\n\n"},
    {"system": "SYSTEM: You are a helpful assistant, with no access to external functions.",
     "chat": "USER: Hi\n\n\nASSISTANT: Hello! <|endoftext|>"},
    {"system": "SYSTEM: no chat here"},
]
SHAREGPT = [{"conversations": [  # LLaMA-Factory's shape: parallel calls as a list
    {"from": "human", "value": "Add 1+2 and 3+4"},
    {"from": "function_call", "value": "[{\"name\": \"add\", \"arguments\": {\"a\": 1, \"b\": 2}}, "
     "{\"name\": \"add\", \"arguments\": {\"a\": 3, \"b\": 4}}]"},
    {"from": "observation", "value": "3, 7"}, {"from": "gpt", "value": "3 and 7."}],
    "tools": "[{\"name\": \"add\", \"parameters\": {}}]"}]
OPENAI = {"messages": [{"role": "user", "content": "ping"}, {"role": "assistant", "content": None, "tool_calls": [
    {"id": "c1", "type": "function", "function": {"name": "ping", "arguments": "{\"host\": \"a\"}"}}]},
    {"role": "tool", "tool_call_id": "c1", "content": "pong"}, {"role": "assistant", "content": "Up."}],
    "tools": [{"type": "function", "function": {"name": "ping", "parameters": {}}}]}
GSM8K_TRAIN = [{"question": "2+2?", "answer": "2+2=<<2+2=4>>4\n#### 4"},
               {"question": "Big?", "answer": "It is big.\n#### 1,234"}, {"question": "No mark?", "answer": "5"}]
TURING = [{"conversation_id": "t1", "domain": "Physics", "sub-domain": "Mechanics", "question": "g?",
           "answer": "9.81 m/s^2", "code": ""}]


def write_fixtures(root) -> str:
    """Every native format in its own file, plus files a folder of data really holds (README, LICENSE)."""
    (root / "hermes").mkdir()
    (root / "hermes" / "func-calling.json").write_text(json.dumps(HERMES))
    (root / "glaive-function-calling-v2.json").write_text(json.dumps(GLAIVE))
    (root / "my_agent.json").write_text(json.dumps(SHAREGPT))
    (root / "chats.jsonl").write_text(json.dumps(OPENAI) + "\n{broken json\n")
    (root / "gsm8k").mkdir()
    (root / "gsm8k" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in GSM8K_TRAIN))
    (root / "gsm8k" / "test.jsonl").write_text(json.dumps({"question": "1+1?", "answer": "#### 2"}) + "\n")
    (root / "Computational_STEM_QA_Dataset.json").write_text(json.dumps(TURING))
    (root / "README.md").write_text("# data\n")
    (root / "LICENSE").write_text("MIT\n")
    return str(root)


def by_source(steps) -> dict:
    out = {}
    for s in steps:
        out.setdefault(s.source, []).append(s)
    return out


def tiny_tokenizer():
    """A byte-level BPE with no merges (one id per byte) plus ChatML's added tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tok.add_tokens(["<tool_call>", "</tool_call>"])
    return tok


def test_data_hermes_rendering_exact(tmp_path):
    steps, summary = data.load_steps(write_fixtures(tmp_path))
    call, reply = [s for s in by_source(steps)["hermes"] if s.id.startswith("hermes:h-ok:")]
    (text,) = [s for s in by_source(steps)["hermes"] if s.id.startswith("hermes:h-text:")]
    system = ("<|im_start|>system\nYou are a function calling AI model." + QWEN_TOOLS_HEAD +
              '\n{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", '
              '"properties": {"city": {"type": "string"}}}}}\n{"type": "function", "function": {"name": '
              '"get_time", "parameters": {}}}' + QWEN_TOOLS_TAIL)
    assert call.prompt == system + "<|im_start|>user\nWeather and time in Zürich?<|im_end|>\n<|im_start|>assistant\n"
    assert call.target == ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich", '
                           '"metric": true}}\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {}}\n'
                           "</tool_call><|im_end|>")
    assert call.kind == "tool_call" and call.answer == [
        {"name": "get_weather", "arguments": {"city": "Zürich", "metric": True}}, {"name": "get_time", "arguments": {}}]
    # Both results share one user turn; the summary after them is a reply.
    assert reply.prompt == (call.prompt + call.target + "\n<|im_start|>user\n<tool_response>\n{\"temp\": 21}\n"
                            "</tool_response>\n<tool_response>\n10:00\n</tool_response><|im_end|>\n"
                            "<|im_start|>assistant\n")
    assert (reply.target, reply.kind, reply.answer) == ("It is 21 degrees.<|im_end|>", "reply", None)
    assert text.prompt == QWEN_DEFAULT + "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert summary["sources"]["hermes"]["skipped"] == {"tool call is neither JSON nor a Python literal": 1}


# Qwen/Qwen2.5-0.5B-Instruct's chat_template (tokenizer_config.json), verbatim: the reference that
# data.render is held to, through transformers' own apply_chat_template.
QWEN25_CHAT_TEMPLATE = '{%- if tools %}\n    {{- \'<|im_start|>system\\n\' }}\n    {%- if messages[0][\'role\'] == \'system\' %}\n        {{- messages[0][\'content\'] }}\n    {%- else %}\n        {{- \'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.\' }}\n    {%- endif %}\n    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}\n    {%- for tool in tools %}\n        {{- "\\n" }}\n        {{- tool | tojson }}\n    {%- endfor %}\n    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}\n{%- else %}\n    {%- if messages[0][\'role\'] == \'system\' %}\n        {{- \'<|im_start|>system\\n\' + messages[0][\'content\'] + \'<|im_end|>\\n\' }}\n    {%- else %}\n        {{- \'<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n\' }}\n    {%- endif %}\n{%- endif %}\n{%- for message in messages %}\n    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}\n        {{- \'<|im_start|>\' + message.role + \'\\n\' + message.content + \'<|im_end|>\' + \'\\n\' }}\n    {%- elif message.role == "assistant" %}\n        {{- \'<|im_start|>\' + message.role }}\n        {%- if message.content %}\n            {{- \'\\n\' + message.content }}\n        {%- endif %}\n        {%- for tool_call in message.tool_calls %}\n            {%- if tool_call.function is defined %}\n                {%- set tool_call = tool_call.function %}\n            {%- endif %}\n            {{- \'\\n<tool_call>\\n{"name": "\' }}\n            {{- tool_call.name }}\n            {{- \'", "arguments": \' }}\n            {{- tool_call.arguments | tojson }}\n            {{- \'}\\n</tool_call>\' }}\n        {%- endfor %}\n        {{- \'<|im_end|>\\n\' }}\n    {%- elif message.role == "tool" %}\n        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}\n            {{- \'<|im_start|>user\' }}\n        {%- endif %}\n        {{- \'\\n<tool_response>\\n\' }}\n        {{- message.content }}\n        {{- \'\\n</tool_response>\' }}\n        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}\n            {{- \'<|im_end|>\\n\' }}\n        {%- endif %}\n    {%- endif %}\n{%- endfor %}\n{%- if add_generation_prompt %}\n    {{- \'<|im_start|>assistant\\n\' }}\n{%- endif %}\n'


def qwen25_chat():
    from transformers import PreTrainedTokenizerFast
    return PreTrainedTokenizerFast(tokenizer_object=tiny_tokenizer(), chat_template=QWEN25_CHAT_TEMPLATE)


def as_openai(msgs: list[dict]) -> list[dict]:
    """Reader messages ({role, content, calls}) in OpenAI's shape, arguments as objects (the template's input)."""
    return [{"role": m["role"], "content": m["content"]} | ({"tool_calls": [
        {"type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}} for c in m["calls"]]}
        if m["calls"] else {}) for m in msgs]


def check_render_against_template(hf, msgs: list[dict], tools: list[dict]) -> int:
    """Every step's prompt, and the whole conversation, equal apply_chat_template; returns steps checked."""
    if msgs and msgs[0]["role"] == "system" and not msgs[0]["content"]:
        msgs = msgs[1:]  # what to_steps does: an empty system prompt gets Qwen's default
    wrapped = [{"type": "function", "function": t} for t in tools] or None
    steps = data.to_steps("x", "r", "train", msgs, tools, None)
    ends = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
    for step, i in zip(steps, ends, strict=True):
        want = hf.apply_chat_template(as_openai(msgs[:i]), tools=wrapped, tokenize=False, add_generation_prompt=True)
        assert step.prompt == want
        assert data.render(as_openai(msgs[:i]), wrapped, add_generation_prompt=True) == want
    full = hf.apply_chat_template(as_openai(msgs), tools=wrapped, tokenize=False)
    assert data.render(as_openai(msgs), tools) == full
    if ends[-1] == len(msgs) - 1:
        assert steps[-1].prompt + steps[-1].target + "\n" == full
    return len(steps)


def test_render_equals_transformers_chat_template_on_a_tools_conversation():
    hf = qwen25_chat()
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather, °C",
              "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}},
             {"type": "function", "function": {"name": "get_time", "parameters": {}}}]
    convo = [{"role": "system", "content": "You plan trips."},
             {"role": "user", "content": "Weather and time in Zürich? "},
             {"role": "assistant", "content": "Let me check.", "tool_calls": [
                 {"id": "a", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich"}}},
                 {"id": "b", "type": "function", "function": {"name": "get_time", "arguments": {}}}]},
             {"role": "tool", "tool_call_id": "a", "content": "{\"temp\": 21}"},
             {"role": "tool", "tool_call_id": "b", "content": "10:00"},
             {"role": "assistant", "content": "21 degrees at 10:00."},
             {"role": "user", "content": "And tomorrow?"},
             {"role": "assistant", "content": None, "tool_calls": [
                 {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich", "day": 1}}}]},
             {"role": "tool", "content": "{\"temp\": 18}"}]
    for upto in range(1, len(convo) + 1):
        for tools_given in (tools, None):
            for gen in (False, True):
                for head in (0, 1):  # with the system turn, and with Qwen's default in its place
                    msgs = convo[head:upto]
                    if not msgs:
                        continue
                    want = hf.apply_chat_template(msgs, tools=tools_given, tokenize=False, add_generation_prompt=gen)
                    assert data.render(msgs, tools_given, add_generation_prompt=gen) == want
    # what OpenAI clients send: arguments as a JSON string, the developer role, content parts
    sent = [{"role": "developer", "content": "You plan trips."},
            {"role": "user", "content": [{"type": "text", "text": "Weather and time in Zürich? "}]},
            {**convo[2], "tool_calls": [{"type": "function", "function": {"name": "get_weather",
                                         "arguments": "{\"city\": \"Zürich\"}"}}, convo[2]["tool_calls"][1]]}]
    assert data.render(sent, tools, True) == hf.apply_chat_template(convo[:3], tools=tools, tokenize=False,
                                                                    add_generation_prompt=True)
    bare = [t["function"] for t in tools]  # bare function dicts are wrapped as the template expects
    assert data.render(convo[:2], bare) == data.render(convo[:2], tools)
    for bad, why in [([], "non-empty list"), ([{"role": "robot", "content": "x"}], "unknown message role"),
                     ([{"role": "user", "content": 3}], "not text"),
                     ([{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{x"}}]}],
                      "arguments")]:
        with pytest.raises(ValueError, match=why):
            data.render(bad)


def test_render_equals_transformers_chat_template_on_the_fixture_sources(tmp_path):
    hf, checked = qwen25_chat(), 0
    for reader, records in [(data.read_hermes, HERMES[:1] + HERMES[2:]), (data.read_glaive, GLAIVE[:2]),
                            (data.read_sharegpt, SHAREGPT), (data.read_openai, [OPENAI])]:
        for rec in records:
            msgs, tools, _ = reader(rec)
            checked += check_render_against_template(hf, msgs, tools)
    assert checked == 10


SHARED_DATA = Path(__file__).resolve().parent.parent / "shared" / "data"


@pytest.mark.skipif(not (SHARED_DATA / "bfcl-live").is_dir(), reason="the real data copies are not beside the repository")
def test_render_equals_transformers_chat_template_on_real_glaive_and_bfcl_live():
    hf, checked = qwen25_chat(), Counter()
    for reader, path in [(data.read_sharegpt, SHARED_DATA / "glaive-sharegpt" / "glaive_toolcall_en_demo.json"),
                         (data.read_openai, SHARED_DATA / "bfcl-live" / "live_tool_calls.jsonl")]:
        for rec in data.read_records(path):
            try:
                msgs, tools, _ = reader(rec)
                checked[path.name] += check_render_against_template(hf, msgs, tools)
            except data.Skip:
                checked["skipped"] += 1
    assert checked == {"live_tool_calls.jsonl": 1311, "glaive_toolcall_en_demo.json": 957}  # every step of both


def test_data_glaive_sharegpt_openai_calls_exact(tmp_path):
    src = by_source(data.load_steps(write_fixtures(tmp_path))[0])
    call = next(s for s in src["glaive"] if s.kind == "tool_call")
    assert call.prompt == ("<|im_start|>system\nYou are a helpful assistant with access to the following functions."
                           " Use them if required" + QWEN_TOOLS_HEAD + '\n{"type": "function", "function": '
                           '{"name": "convert", "parameters": {}}}' + QWEN_TOOLS_TAIL +
                           "<|im_start|>user\n5 USD in EUR?<|im_end|>\n<|im_start|>assistant\n")
    assert call.target == '<tool_call>\n{"name": "convert", "arguments": {"amount": 5, "to": "EUR"}}\n</tool_call><|im_end|>'
    assert sorted(s.target for s in src["glaive"] if s.kind == "reply") == ["4.6 EUR.<|im_end|>", "Hello!<|im_end|>"]
    sharegpt = src["sharegpt"]
    assert sharegpt[0].target == ('<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>\n'
                                  '<tool_call>\n{"name": "add", "arguments": {"a": 3, "b": 4}}\n</tool_call><|im_end|>')
    assert sharegpt[1].prompt.endswith("<|im_start|>user\n<tool_response>\n3, 7\n</tool_response><|im_end|>\n"
                                       "<|im_start|>assistant\n")
    openai = src["openai"]
    assert [s.kind for s in openai] == ["tool_call", "reply"]
    assert openai[0].answer == [{"name": "ping", "arguments": {"host": "a"}}]
    assert openai[0].target == '<tool_call>\n{"name": "ping", "arguments": {"host": "a"}}\n</tool_call><|im_end|>'


def test_data_planning_answers_and_own_split(tmp_path):
    src = by_source(data.load_steps(write_fixtures(tmp_path))[0])
    gsm = {s.answer: s for s in src["gsm8k"]}
    assert set(gsm) == {"4", "1234", "2"} and all(s.kind == "planning" for s in gsm.values())
    assert gsm["4"].prompt == QWEN_DEFAULT + "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
    assert gsm["4"].target == "2+2=4\n#### 4<|im_end|>"  # calculator annotation dropped
    assert gsm["2"].split == "test" and gsm["4"].split in ("train", "val")  # gsm8k's test file stays test
    (turing,) = src["turing"]
    assert (turing.kind, turing.answer, turing.target) == ("planning", "9.81 m/s^2", "9.81 m/s^2<|im_end|>")
    assert turing.id == "turing:t1:0"


def test_data_skipped_counted_ignored_listed_and_empty_source_fails(tmp_path):
    _, summary = data.load_steps(write_fixtures(tmp_path))
    src = summary["sources"]
    assert src["glaive"]["skipped"] == {"missing or non-str field 'chat'": 1}
    assert src["openai"]["skipped"] == {"line is not a JSON object": 1}
    assert src["gsm8k"]["skipped"] == {"answer has no '#### N' line": 1}
    assert src["openai"]["first_skipped"]["line is not a JSON object"].endswith("chats.jsonl#1")
    assert {os.path.basename(p) for p in summary["ignored_files"]} == {"README.md", "LICENSE"}
    assert summary["steps"] == {"tool_call": 4, "reply": 6, "planning": 4}
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "func-calling.json").write_text(json.dumps(HERMES[1:2]))
    with pytest.raises(ValueError, match="source 'hermes' yielded no steps.*neither JSON nor a Python literal"):
        data.load_steps(str(bad))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "README.md").write_text("x")
    with pytest.raises(FileNotFoundError, match="no recognisable data file"):
        data.load_steps(str(tmp_path / "empty"))


def test_data_splits_deterministic_and_disjoint(tmp_path):
    records = [{"id": f"r{i}", "conversations": [{"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": "a"},
               {"from": "human", "value": "more"}, {"from": "gpt", "value": "b"}]} for i in range(300)]
    (tmp_path / "func-calling.json").write_text(json.dumps(records))
    first, second = data.load_steps(str(tmp_path))[0], data.load_steps(str(tmp_path))[0]
    assert [(s.id, s.split) for s in first] == [(s.id, s.split) for s in second]
    split_of = {}
    for s in first:  # every step of a conversation lands in the conversation's one split
        assert split_of.setdefault(s.id.rsplit(":", 1)[0], s.split) == s.split
    counts = {k: list(split_of.values()).count(k) for k in data.SPLITS}
    assert 200 < counts["train"] < 280 and counts["val"] > 10 and counts["test"] > 10  # ~80/10/10
    capped, summary = data.load_steps(str(tmp_path), max_records=50)  # a stable subset, same splits
    assert summary["sources"]["hermes"]["records"] == 50 and summary["sources"]["hermes"]["capped"] == 250
    assert {(s.id, s.split) for s in capped} <= {(s.id, s.split) for s in first}


def openai_call(rid: str, names: list[str]) -> dict:
    """An OpenAI-shape record whose one assistant turn calls `names`, with those functions as its tools."""
    calls = [{"type": "function", "function": {"name": n, "arguments": "{}"}} for n in names]
    return {"id": rid, "messages": [{"role": "user", "content": f"do {rid}"},
                                    {"role": "assistant", "content": None, "tool_calls": calls}],
            "tools": [{"type": "function", "function": {"name": n, "parameters": {}}} for n in names]}


def test_data_tool_calls_split_by_function(tmp_path):
    names = [f"fn_{i}" for i in range(40)]
    by_split = {k: [n for n in names if data.function_split(n) == k] for k in data.SPLITS}
    assert all(by_split.values())  # 40 names reach every split
    mixed = [by_split["train"][0], by_split["test"][0]]  # a conversation that would share a function
    same = by_split["test"][:2]  # two functions, one split: kept
    records = [openai_call(f"r{i}", [names[i % 40]]) for i in range(200)]  # each function called 5 times
    records += [openai_call("mixed", mixed), openai_call("same", same)]
    (tmp_path / "calls.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    sharegpt = [{"conversations": [{"from": "human", "value": f"q{i}"},  # glaive's copy: a call, then a reply
                                   {"from": "function_call", "value": json.dumps({"name": names[i], "arguments": {}})},
                                   {"from": "observation", "value": "ok"}, {"from": "gpt", "value": "done"}]}
                for i in range(40)]
    sharegpt += [{"conversations": [{"from": "human", "value": f"chat {i}"}, {"from": "gpt", "value": "hi"}]}
                 for i in range(100)]  # no call: split by the conversation's id
    (tmp_path / "glaive_toolcall.json").write_text(json.dumps(sharegpt))
    steps, summary = data.load_steps(str(tmp_path))
    assert [(s.id, s.split) for s in steps] == [(s.id, s.split) for s in data.load_steps(str(tmp_path))[0]]
    where = {}  # function -> the splits of the steps that call it, in every source
    for s in steps:
        for c in s.answer if s.kind == "tool_call" else []:
            where.setdefault(c["name"], set()).add(s.split)
    assert all(len(splits) == 1 for splits in where.values()) and len(where) == 40
    assert {n: sp.pop() for n, sp in where.items()} == {n: data.function_split(n) for n in names}
    conversation = {}  # a conversation's steps (its call and its reply) share one split
    for s in steps:
        assert conversation.setdefault(s.id.rsplit(":", 1)[0], s.split) == s.split
    assert "openai:same:0" in {s.id for s in steps} and not any(":mixed:" in s.id for s in steps)
    assert summary["sources"]["openai"]["skipped"] == {"calls functions of different splits": 1}
    assert "1 x calls functions of different splits at " in data.skip_report(summary)
    chats = [s.split for s in steps if s.kind == "reply" and s.answer is None and "chat" in s.prompt]
    assert len(chats) == 100 and {k: chats.count(k) for k in data.SPLITS}["train"] > 60  # ~80/10/10 by id
    calls = [s.split for s in steps if s.source == "openai"]
    assert 0.15 < calls.count("test") / len(calls) < 0.45  # ~30% of the functions, so of the calls


def test_data_tool_call_too_long_is_dropped_and_counted_never_cut(tmp_path, capsys):
    tok = tiny_tokenizer()
    steps = data.load_steps(write_fixtures(tmp_path))[0]
    lengths = {s.id: sum(map(len, data.encode(s, tok))) for s in steps}
    calls = [s for s in steps if s.kind == "tool_call"]
    max_len = sorted(lengths[s.id] for s in calls)[1]  # the shortest two calls fit, the others not
    kept, dropped = data.fitting(steps, tok, max_len)
    long = [s for s in calls if lengths[s.id] > max_len]
    assert len(long) == len(calls) - 2 and [s.id for s in kept] == [s.id for s in steps if s not in long]
    assert dropped == {k: sum(s.split == k for s in long) for k in data.SPLITS}
    assert any(lengths[s.id] > max_len for s in kept if s.kind != "tool_call")  # the others are cut, as before
    summary = {"sources": {}, "ignored_files": {}, "too_long": {"max_len": max_len, "dropped": dropped}}
    assert f"dropped {len(long)} tool-call steps whose prompt and target do not fit --max-len {max_len} (train " \
        in data.skip_report(summary)
    # train.py drops them too, before it checks that every kind it needs has rows
    with pytest.raises(ValueError, match="no tool_call steps in the train split .* dropped 20 tool-call steps .*"
                                         "--max-len 600 .train 13, val 2, test 5"):  # every split counted
        train.train(train_args(tmp_path / "run", "--steps", "1", "--max-len", "600", "--out", str(tmp_path / "out")))


def test_data_encode_gives_single_special_ids(tmp_path):
    tok = tiny_tokenizer()
    steps = data.load_steps(write_fixtures(tmp_path))[0]
    special = {t: tok.token_to_id(t) for t in ("<|im_start|>", "<|im_end|>", "<tool_call>")}
    for step in steps:
        prompt, target = data.encode(step, tok)
        assert tok.decode(prompt + target, skip_special_tokens=False) == step.prompt + step.target
        assert prompt[0] == special["<|im_start|>"] and target[-1] == special["<|im_end|>"]
        if step.kind == "tool_call" and step.target.startswith("<tool_call>"):
            assert target[0] == special["<tool_call>"]
    assert [e[:2] for e in data.encode_all(steps, tok)] == [data.encode(s, tok) for s in steps]
    for step in steps:  # with max_len: the oldest prompt tokens go, as in training's batches
        prompt, target = data.encode(step, tok)
        cut = data.encode(step, tok, len(target) + 2)
        assert cut == (prompt[-2:], target) and len(prompt) > 2


def test_data_truncate_keeps_target_and_drops_oldest_prompt():
    prompt, target = list(range(10)), [100, 101, 102]
    assert data.truncate(prompt, target, 20) == (prompt, target)
    assert data.truncate(prompt, target, 8) == ([5, 6, 7, 8, 9], target)
    assert data.truncate([1, 2, 3], list(range(100, 120)), 8) == ([3], list(range(100, 107)))


def test_data_batches_pad_only_to_own_longest_and_resume_exactly():
    rng = torch.Generator().manual_seed(0)
    kinds = ["planning"] * 30 + ["tool_call", "reply"] * 5
    encoded = [(list(range(1, 2 + int(torch.randint(0, 12, (1,), generator=rng)))),
                [7] * (1 + int(torch.randint(0, 6, (1,), generator=rng))), k) for k in kinds]
    stream = list(itertools.islice(data.batches(encoded, 4, 12, pad_id=0, seed=3), 25))  # 10 per epoch
    for b in stream:
        lens = b.prompt_lens + (b.labels != -100).sum(1)
        assert b.ids.shape[1] == int(lens.max())  # padded to its own longest row, no further
        assert b.n_target == int((b.labels != -100).sum()) and len(b.kinds) == b.ids.shape[0]
        for r in range(b.ids.shape[0]):
            p, n = int(b.prompt_lens[r]), int(lens[r])
            assert (b.labels[r, :p] == -100).all() and (b.labels[r, n:] == -100).all()
            assert (b.labels[r, p:n] == b.ids[r, p:n]).all() and (b.ids[r, n:] == 0).all()
    again = list(itertools.islice(data.batches(encoded, 4, 12, pad_id=0, seed=3, start=8), 5))
    assert all(torch.equal(a.ids, b.ids) for a, b in zip(again, stream[8:13]))  # resume across an epoch end
    epoch = stream[:10]
    assert sum(k == "tool_call" for b in epoch for k in b.kinds) == 20  # tool_fraction 0.5 of 40 rows
    natural = list(itertools.islice(data.batches(encoded, 4, 12, 0, seed=3, tool_fraction=None), 10))
    assert sorted(k for b in natural for k in b.kinds) == sorted(kinds)


def test_data_cli_json_summary(tmp_path, capsys):
    tiny_tokenizer().save(str(tmp_path / "tok.json"))
    (tmp_path / "d").mkdir()
    data.main(["--data-dir", write_fixtures(tmp_path / "d"), "--json", "--tokenizer", str(tmp_path / "tok.json"),
               "--max-len", "64"])
    out = json.loads(capsys.readouterr().out)
    assert out["sources"]["hermes"]["records"] == 2 and out["steps"]["tool_call"] == 4
    assert sum(out["splits"].values()) == 14 and set(out["lengths"]) == set(data.KINDS)
    assert 0 <= out["padding"]["grouped"] <= out["padding"]["fixed"] < 1
    # at 64 byte tokens no tool call fits: each is dropped, counted in its split, the other kinds kept (cut)
    assert out["too_long"] == {"max_len": 64, "dropped": {"train": 1, "val": 0, "test": 3}}  # by function
    assert out["lengths"]["tool_call"]["over_max_len"] == 4 and not any("tool_call" in k for k in out["kept_steps"])
    assert sum(sum(sp.values()) for sp in out["kept_steps"].values()) == 14 - 4

# Faults in reading files: a bad byte, number, nesting or cut costs its record, not its file; gsm8k's
# test file is found by a whole word; skip reports; offline downloads.

BIG = "9" * 5000  # past Python's 4,300-digit limit: json.loads raises ValueError on it
DEEP = "[" * 100_000 + "]" * 100_000  # past Python's recursion limit: json.loads raises RecursionError


def gsm8k_line(i: int, extra: str = "") -> bytes:
    return (f'{{"question": "q{i}?", "answer": "a\\n#### {i}"{extra}}}\n').encode()


def conversation(i: int, call: str | None = None) -> dict:
    """A sharegpt tool conversation; `call` replaces its function_call text."""
    call = call or json.dumps({"name": "get_time", "arguments": {"city": f"c{i}"}})
    return {"tools": json.dumps([{"name": "get_time", "parameters": {}}]), "conversations": [
        {"from": "human", "value": f"Time in city {i}?"}, {"from": "function_call", "value": call},
        {"from": "observation", "value": f"{i}:00"}, {"from": "gpt", "value": f"It is {i}:00."}]}


def array_file(records: list) -> bytes:
    """A JSON array with one element per line, so a test can corrupt exactly one element."""
    return ("[\n" + ",\n".join(json.dumps(r) for r in records) + "\n]\n").encode()


def load(folder):
    steps, summary = data.load_steps(str(folder))
    return steps, summary["sources"], summary


# -- a bad record costs that record, not its file

def test_jsonl_line_not_utf8_costs_that_line(tmp_path):
    write_tiny_data(tmp_path)
    lines = (tmp_path / "train.jsonl").read_bytes().splitlines(keepends=True)
    lines[3] = lines[3].replace(b"What", b"Wh\xffat")
    (tmp_path / "train.jsonl").write_bytes(b"".join(lines))
    _, src, _ = load(tmp_path)
    assert src["gsm8k"]["records"] == 39 and src["gsm8k"]["skipped"] == {"not UTF-8": 1}
    assert src["gsm8k"]["first_skipped"]["not UTF-8"] == f"{tmp_path / 'train.jsonl'}#3"


def test_json_array_byte_not_utf8_costs_that_record(tmp_path):
    records = [conversation(i) for i in range(5)]
    text = array_file(records).replace(b"Time in city 2?", b"Time in city \xe9?")  # latin-1, not UTF-8
    (tmp_path / "tools.json").write_bytes(text)
    _, src, _ = load(tmp_path)
    assert src["sharegpt"]["records"] == 4 and src["sharegpt"]["skipped"] == {"not UTF-8": 1}
    assert src["sharegpt"]["first_skipped"]["not UTF-8"].endswith("tools.json#2")


def test_escaped_lone_surrogate_is_not_utf8(tmp_path):
    # Valid JSON, but "\ud800" alone is no character: the tokenizer raises on it mid-training.
    (tmp_path / "train.jsonl").write_bytes(gsm8k_line(1) + b'{"question": "q\\ud800?", "answer": "#### 2"}\n')
    steps, src, _ = load(tmp_path)
    assert [s.answer for s in steps] == ["1"] and src["gsm8k"]["skipped"] == {"not UTF-8": 1}


def test_integer_too_long_costs_that_record(tmp_path):
    (tmp_path / "train.jsonl").write_bytes(gsm8k_line(1) + gsm8k_line(2, f', "n": {BIG}') + gsm8k_line(3))
    (tmp_path / "tools.json").write_text(
        "[" + json.dumps(conversation(0)) + ', {"n": -' + BIG + "}, " + json.dumps(conversation(1)) + "]")
    _, src, _ = load(tmp_path)
    assert src["gsm8k"]["records"] == 2 and src["gsm8k"]["skipped"] == {"integer too long": 1}
    assert src["gsm8k"]["first_skipped"]["integer too long"].endswith("train.jsonl#1")
    assert src["sharegpt"]["records"] == 2 and src["sharegpt"]["skipped"] == {"integer too long": 1}


def test_integer_too_long_in_call_arguments_costs_that_record(tmp_path):
    # glaive quotes the arguments as a JSON string, OpenAI writes them as one, sharegpt's call is
    # a string: all three are parsed after reading, where a ValueError used to stop the whole load.
    glaive = [{"system": "SYSTEM: You are a helpful assistant with access to the following functions. "
               "Use them if required -\n{\n    \"name\": \"convert\",\n    \"parameters\": {}\n}\n",
               "chat": f"USER: {amount} USD?\n\n\nASSISTANT: <functioncall> {{\"name\": \"convert\", "
               f"\"arguments\": '{{\"amount\": {amount}}}'}} <|endoftext|>"} for amount in ("5", BIG)]
    (tmp_path / "glaive-function-calling-v2.json").write_text(json.dumps(glaive))
    openai = [{"id": f"o{i}", "messages": [{"role": "user", "content": "ping"}, {"role": "assistant", "tool_calls": [
        {"function": {"name": "ping", "arguments": f'{{"n": {n}}}'}}]}]} for i, n in enumerate(("1", BIG))]
    (tmp_path / "chats.jsonl").write_text("".join(json.dumps(r) + "\n" for r in openai))
    calls = [json.dumps({"name": "get_time", "arguments": {}}), '{"name": "get_time", "arguments": {"n": ' + BIG + "}}"]
    (tmp_path / "tools.json").write_text(json.dumps([conversation(i, c) for i, c in enumerate(calls)]))
    _, src, _ = load(tmp_path)
    for source in ("glaive", "openai", "sharegpt"):
        assert src[source]["records"] == 1 and src[source]["skipped"] == {"integer too long": 1}, source


def test_truncated_json_array_keeps_records_before_the_cut(tmp_path):
    text = array_file([conversation(i) for i in range(5)])
    cut = text[:text.index(b"Time in city 3")]
    (tmp_path / "tools.json").write_bytes(cut)
    steps, src, _ = load(tmp_path)
    reason = f"file truncated at byte {len(cut)}"
    assert src["sharegpt"]["records"] == 3 and src["sharegpt"]["skipped"] == {reason: 1}
    assert src["sharegpt"]["first_skipped"][reason].endswith("tools.json#3")
    # Cut between elements, or just before the closing bracket: every record kept, the cut counted.
    for cut in (text[:text.index(b"\n]")], text[:text.index(b",\n") + 1]):
        (tmp_path / "tools.json").write_bytes(cut)
        _, src, _ = load(tmp_path)
        assert src["sharegpt"]["skipped"] == {f"file truncated at byte {len(cut)}": 1}
        assert src["sharegpt"]["records"] == (5 if cut.endswith(b"}") else 1)


def test_broken_array_element_costs_only_itself(tmp_path):
    # A raw tab inside a string is not JSON; a missing value is not either. Both elements go, their
    # neighbours stay.
    records = [conversation(i) for i in range(5)]
    text = array_file(records).replace(b"Time in city 1?", b"Time in\tcity 1?").replace(b"4:00.", b'4:00.", "x": ,"')
    (tmp_path / "tools.json").write_bytes(text)
    _, src, _ = load(tmp_path)
    assert src["sharegpt"]["records"] == 3 and src["sharegpt"]["skipped"] == {"not valid JSON": 2}
    assert src["sharegpt"]["first_skipped"]["not valid JSON"].endswith("tools.json#1")


def test_json_file_neither_array_nor_object_is_one_skip(tmp_path):
    write_tiny_data(tmp_path)
    (tmp_path / "notes.json").write_text('"just a string"')
    (tmp_path / "numbers.json").write_text("[1, 2, 3]")
    _, _, summary = load(tmp_path)
    ignored = {os.path.basename(p): why for p, why in summary["ignored_files"].items()}
    assert ignored["notes.json"] == "no readable record (1 x not a JSON array or object of records)"
    assert ignored["numbers.json"] == "no readable record (3 x record is not a JSON object)"


def test_deep_nesting_costs_that_record(tmp_path):
    (tmp_path / "train.jsonl").write_bytes(gsm8k_line(1) + DEEP.encode() + b"\n" + gsm8k_line(3))
    (tmp_path / "tools.json").write_text("[" + json.dumps(conversation(0)) + ", " + DEEP + ", "
                                         + json.dumps(conversation(1)) + "]")
    (tmp_path / "chats.jsonl").write_text("".join(json.dumps(
        {"id": f"o{i}", "messages": [{"role": "user", "content": "ping"}, {"role": "assistant", "tool_calls": [
            {"function": {"name": "ping", "arguments": '{"n": ' + a + "}"}}]}]}) + "\n" for i, a in enumerate(("1", DEEP))))
    _, src, _ = load(tmp_path)
    for source in ("gsm8k", "sharegpt", "openai"):
        assert src[source]["skipped"] == {"nested too deeply": 1}, source
    assert (src["gsm8k"]["records"], src["sharegpt"]["records"], src["openai"]["records"]) == (2, 2, 1)


def test_jsonl_splits_lines_at_newlines_only(tmp_path):
    # JSON strings may hold U+2028 and U+0085 raw; str.splitlines() cut those records in two.
    line = json.dumps({"question": "a\u2028b\x85c?", "answer": "#### 7"}, ensure_ascii=False)
    (tmp_path / "train.jsonl").write_text(line + "\r\n" + gsm8k_line(8).decode(), encoding="utf-8")
    steps, src, _ = load(tmp_path)
    assert sorted(s.answer for s in steps) == ["7", "8"] and src["gsm8k"]["skipped"] == {}


def test_jsonl_file_with_no_readable_line_is_ignored_with_why(tmp_path):
    write_tiny_data(tmp_path)
    (tmp_path / "broken.jsonl").write_bytes(b"\xff\xfe\n{oops\n")
    _, _, summary = load(tmp_path)
    (why,) = [w for p, w in summary["ignored_files"].items() if p.endswith("broken.jsonl")]
    assert why == "no readable record (1 x not UTF-8, 1 x line is not a JSON object)"


def test_cut_parquet_file_is_ignored_naming_why(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa
    write_tiny_data(tmp_path)
    pq.write_table(pa.table({"question": ["q?"], "answer": ["#### 1"]}), tmp_path / "test.parquet")
    (tmp_path / "test.parquet").write_bytes((tmp_path / "test.parquet").read_bytes()[:100])
    _, _, summary = load(tmp_path)
    assert summary["ignored_files"][str(tmp_path / "test.parquet")].startswith("not a readable parquet file (")
    with pytest.raises(ValueError, match=f"^{tmp_path / 'test.parquet'}: not a readable parquet file"):
        data.read_records(tmp_path / "test.parquet")  # what download() would raise for a cut hub file


# -- gsm8k's test file, by a whole word of its name

@pytest.mark.parametrize("name, split", [
    ("test.jsonl", "test"), ("gsm8k_test.jsonl", "test"), ("main_test.jsonl", "test"),
    ("test-00000-of-00001.jsonl", "test"), ("gsm8k.test.jsonl", "test"),
    ("gsm8k_latest.jsonl", "train"), ("contest.jsonl", "train"), ("attestation.jsonl", "train"),
    ("train.jsonl", "train")])
def test_gsm8k_test_file_is_a_whole_word(tmp_path, name, split):
    (tmp_path / name).write_bytes(b"".join(gsm8k_line(i) for i in range(40)))
    steps, _, _ = load(tmp_path)
    splits = {s.split for s in steps}
    if split == "test":
        assert splits == {"test"}
    else:  # a train file: 5% of it is val
        assert "train" in splits and splits <= {"train", "val"}


# -- what train.py and eval.py print

def test_skip_report_says_what_was_skipped_and_ignored(tmp_path):
    _, summary = data.load_steps(write_fixtures(tmp_path))
    report = data.skip_report(summary)
    assert report.startswith(f"data: skipped 4 records (openai: 1 x line is not a JSON object at "
                             f"{tmp_path / 'chats.jsonl'}#1; glaive: 1 x missing or non-str field 'chat' at ")
    assert "; hermes: 1 x tool call is neither JSON nor a Python literal at " in report
    assert report.endswith("ignored 2 files (2 x not a .json/.jsonl/.parquet file, first "
                           f"{tmp_path / 'LICENSE'})")
    assert "\n" not in report  # one line: qwen.cli folds an error's text onto one line anyway
    hand = {"sources": {"glaive": {"skipped": {"not UTF-8": 2}, "first_skipped": {"not UTF-8": "g.json#4"}},
                        "gsm8k": {"skipped": {"integer too long": 1}, "first_skipped": {"integer too long": "t.jsonl#0"}}},
            "ignored_files": {"x.txt": "not a .json/.jsonl/.parquet file"}}
    assert data.skip_report(hand) == ("data: skipped 3 records (glaive: 2 x not UTF-8, first at g.json#4; "
                                      "gsm8k: 1 x integer too long at t.jsonl#0), ignored 1 file "
                                      "(x.txt: not a .json/.jsonl/.parquet file)")
    write_tiny_data(tmp_path / "clean")
    assert data.skip_report(data.load_steps(str(tmp_path / "clean"))[1]) == "data: nothing skipped"


def test_skip_report_stays_short_with_many_reasons():
    skipped = {f"reason {i}": 1 for i in range(20)}
    hand = {"sources": {"glaive": {"skipped": skipped, "first_skipped": {r: "g.json#0" for r in skipped}}},
            "ignored_files": {f"f{i}.txt": f"why {i}" for i in range(20)}}
    report = data.skip_report(hand)
    assert report.startswith("data: skipped 20 records (glaive: 1 x reason 0 at g.json#0; ")
    assert "; and 16 more), ignored 20 files (" in report and report.endswith("; and 16 more)")
    assert len(report) < 400


def test_require_kinds_names_missing_kind_split_and_skips(tmp_path):
    write_tiny_data(tmp_path)
    (tmp_path / "tools.json").unlink()  # gsm8k only: planning rows, no tool calls
    (tmp_path / "x.txt").write_text("notes")
    steps, summary = data.load_steps(str(tmp_path))
    data.require_kinds(steps, ("planning",), "train", str(tmp_path))
    with pytest.raises(ValueError) as e:
        data.require_kinds(steps, ("tool_call", "planning"), "train", str(tmp_path), summary)
    msg = str(e.value)
    assert msg.startswith(f"{tmp_path}: no tool_call steps in the train split (this run needs tool_call and "
                          "planning rows; add hermes, glaive, sharegpt or openai files whose conversations make calls)")
    assert msg.endswith(
        f"; data: nothing skipped, ignored 1 file ({tmp_path / 'x.txt'}: not a .json/.jsonl/.parquet file)")
    with pytest.raises(ValueError, match=r"^DATA: no planning steps in the test split \(.*gsm8k or Turing files\)$"):
        data.require_kinds([s for s in steps if s.split != "test"], ("planning",), "test", "DATA")


# -- offline

def test_offline_download_says_what_and_to_pass_data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    hub = pytest.importorskip("huggingface_hub.constants")
    # Imported earlier in this process, the hub read its settings then: point its cache here too.
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))

    def no_network(*args, **kwargs):
        raise AssertionError("the network was touched")
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    with pytest.raises(OSError) as e:
        data.load_steps(None)
    msg = str(e.value)
    repo, name = data.HUB_FILES[0][1:]
    assert f"could not download {name} from the hub dataset {repo}" in msg
    assert "HF_HUB_OFFLINE" in msg and "pass --data-dir FOLDER" in msg and "\n" not in msg


# -- the printed summary

def test_print_summary_lists_new_reasons(tmp_path, capsys):
    write_tiny_data(tmp_path)
    with open(tmp_path / "train.jsonl", "ab") as f:
        f.write(b'{"question": "\xff", "answer": "#### 1"}\n' + gsm8k_line(2, f', "n": {BIG}'))
    _, summary = data.load_steps(str(tmp_path))
    data.print_summary(summary)
    out = capsys.readouterr().out
    assert f"gsm8k: 1 x not UTF-8 (first: {tmp_path / 'train.jsonl'}#40)" in out
    assert f"gsm8k: 1 x integer too long (first: {tmp_path / 'train.jsonl'}#41)" in out
    json.dumps(summary)  # --json still prints it


def test_own_data_states_its_step_type_and_developer_is_system(tmp_path):
    recs = [{"step_type": "planning", "messages": [
        {"role": "developer", "content": "Think step by step."}, {"role": "user", "content": f"Plan trip {i}"},
        {"role": "assistant", "content": f"First, book {i}."},
        {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "book", "arguments": "{}"}}]}]}
        for i in range(3)]
    recs.append({"messages": [{"role": "user", "content": "Why?"},
                              {"role": "assistant", "content": "Because.", "step_type": "planning"}]})
    recs.append({"step_type": "plan", "messages": [{"role": "user", "content": "x"},
                                                   {"role": "assistant", "content": "y"}]})
    recs.append({"messages": [{"role": "user", "content": "x"},
                              {"role": "assistant", "content": "y", "step_type": "tool_call"}]})
    (tmp_path / "mine.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    steps, summary = data.load_steps(str(tmp_path))
    kinds = sorted(s.kind for s in steps)
    assert kinds == ["planning"] * 4 + ["tool_call"] * 3  # a call stays a tool call; the rest as stated
    assert all(s.prompt.startswith("<|im_start|>system\nThink step by step.<|im_end|>") for s in steps
               if "Plan trip" in s.prompt)
    skipped = summary["sources"]["openai"]["skipped"]
    assert skipped["record step_type not one of tool_call, planning, reply"] == 1
    assert skipped["step_type tool_call needs tool calls, and only it may have them"] == 1


# ---- end data ----

# ---- layerroute ----

import layerroute as lr  # noqa: E402


def tiny_routed(tmp_path, seed=0, **kw) -> tuple[qwen.Qwen2, lr.LayerRoute]:
    """A tiny base model and a LayerRoute wrapped around a second copy of it."""
    write_checkpoint(tmp_path, seed=seed, layers=4)
    return qwen.load_model(str(tmp_path)), lr.LayerRoute(qwen.load_model(str(tmp_path)), **kw)


def set_routers(model, biases, weight_std=0.0, seed=0):
    """Hand-set routers: a bias per layer, optionally random weights so rows get different gates."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for r, b in zip(model.routers, biases):
            r.weight.normal_(std=weight_std) if weight_std else r.weight.zero_()
            r.bias.fill_(b)


def test_layerroute_counts_on_qwen25_config():
    cfg = qwen.QwenConfig(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                          num_key_value_heads=2, vocab_size=151936)
    with torch.device("meta"):
        c = lr.LayerRoute(qwen.Qwen2(cfg), rank=8, alpha=16, targets="attn").counts()
    # LoRA r=8 per block: q 8*(896+896) + k 8*(896+128) + v 8*(896+128) + o 8*(896+896) = 45,056
    assert c["lora"] == 24 * 45_056 == 1_081_344
    assert c["routers"] == 24 * (896 + 1) == 21_528
    assert c["trainable"] == 1_102_872
    with torch.device("meta"):
        c = lr.LayerRoute(qwen.Qwen2(cfg), rank=8, alpha=16, targets="all").counts()
    # plus the MLP: gate and up 8*(896+4864) each, down 8*(4864+896): 138,240 per block
    assert c["lora"] == 24 * (45_056 + 138_240) == 4_399_104
    with torch.device("meta"):
        c = lr.LayerRoute(qwen.Qwen2(cfg)).counts()  # the defaults: rank 32 on attention and MLP
    assert c["lora"] == 4 * 4_399_104 and c["trainable"] == 17_617_944
    with pytest.raises(ValueError, match="targets='mlp'"):
        lr.LayerRoute(qwen.Qwen2(cfg), targets="mlp")


@pytest.mark.parametrize("targets", ["attn", "all"])
def test_layerroute_at_init_with_open_gates_equals_base_exactly(tmp_path, targets):
    base, model = tiny_routed(tmp_path, router_bias=-3.0, targets=targets)  # routers would close everything...
    model.open_gates = True  # ...but the switch opens every gate without touching them
    ids = torch.randint(0, 300, (2, 12))
    with torch.no_grad():
        assert torch.equal(model.eval()(ids), base(ids))
        at = torch.rand(2, 12) < 0.5  # the head at chosen positions only: the same rows, in row-major order
        assert torch.allclose(model(ids, logits_at=at), base(ids)[at], atol=1e-5)
        model.train()  # the training path (mixing) too, dropout active: B = 0 makes LoRA exactly 0
        assert torch.allclose(model(ids), base(ids), atol=1e-5)
    assert model.routers[0].bias.item() == -3.0


def test_layerroute_skipped_block_is_exactly_gate_zero(tmp_path):
    base, model = tiny_routed(tmp_path, dropout=0.0)
    set_routers(model, [5.0, -5.0, 5.0, -5.0])  # blocks 1 and 3 closed for every input
    ids = torch.randint(0, 300, (2, 10))
    with torch.no_grad():
        h = base.embed_tokens(ids)
        cos, sin = base.rope(0, 10, ids.device, h.dtype)
        for i in (0, 2):  # by hand: only blocks 0 and 2
            h = base.layers[i](h, cos, sin)
        expected = base.lm_head(base.norm(h))
        assert torch.equal(model.eval()(ids), expected)  # evaluation does not compute blocks 1, 3
        assert model.last_gates.tolist() == [[1.0, 0.0, 1.0, 0.0]] * 2
        assert torch.equal(model.train()(ids), expected)  # training computes all, mixes: same value
        model.straight_through = False  # measured gate gradients: training runs the open blocks only
        assert torch.equal(model(ids), expected)


def by_hand(base: qwen.Qwen2, ids: torch.Tensor, gates: list, gate_unit: str = "block") -> torch.Tensor:
    """Logits (B, T, vocab) through the open units only, written out from the block's own parts: gates
    has one entry a block, or two (attention, MLP) with sublayer gates."""
    with torch.no_grad():
        h = base.embed_tokens(ids)
        cos, sin = base.rope(0, ids.shape[1], ids.device, h.dtype)
        per = 1 if gate_unit == "block" else 2
        for i, b in enumerate(base.layers):
            attn, mlp = (gates[i], gates[i]) if per == 1 else (gates[2 * i], gates[2 * i + 1])
            if attn:
                h = h + b.self_attn(b.input_layernorm(h), cos, sin)
            if mlp:
                h = h + b.mlp(b.post_attention_layernorm(h))
        return base.lm_head(base.norm(h))


def test_layerroute_sublayer_gates_skip_attention_and_mlp_apart(tmp_path):
    base, model = tiny_routed(tmp_path, dropout=0.0, gate_unit="sublayer")
    assert len(model.routers) == 8 and model.counts()["routers"] == 8 * 65  # two routers a block
    # closed: block 0's MLP, block 2's attention, block 3's MLP, for every input
    set_routers(model, [5.0, -5.0, 5.0, 5.0, -5.0, 5.0, 5.0, -5.0])
    ids = torch.randint(0, 300, (2, 10))
    gates = [1, 0, 1, 1, 0, 1, 1, 0]
    expected = by_hand(base, ids, gates, "sublayer")
    with torch.no_grad():
        assert torch.equal(model.eval()(ids), expected)  # evaluation computes the open halves only
        assert model.last_gates.tolist() == [gates] * 2
        assert torch.equal(model.train()(ids), expected)  # training, measured gates: the open halves only
        model.straight_through = True  # every half computed, the gate mixes: the same value
        assert torch.equal(model(ids), expected)
        at = torch.arange(20) % 3 > 0
        losses = model.train_forward(ids, torch.tensor([4, 6]), at.nonzero().squeeze(1), ids.flatten()[at], fixed=True)[0]
        assert torch.allclose(losses, torch.nn.functional.cross_entropy(expected.flatten(0, 1)[at], ids.flatten()[at], reduction="none"),
                              atol=1e-5)
        model.open_gates = True
        assert torch.equal(model.eval()(ids), base(ids))  # every gate open: the base model (LoRA B = 0)
    # A router of each half reads that half's own norm
    assert [u.norm for u in model.units[:2]] == [base_block.input_layernorm for base_block in model.base.layers[:1]] + \
        [model.base.layers[0].post_attention_layernorm]
    with pytest.raises(ValueError, match="gate_unit='layer'"):
        lr.LayerRoute(base, gate_unit="layer")


def test_layerroute_threshold_opens_gates_above_it_only(tmp_path):
    base, model = tiny_routed(tmp_path, dropout=0.0)
    set_routers(model, [0.0] * 4, weight_std=3.0, seed=3)  # scores spread around 0.5, rows differ
    ids = torch.randint(0, 300, (4, 10))
    with torch.no_grad():
        for t in (0.5, 0.3, 0.1):
            model.threshold = t
            model.eval()(ids)
            assert torch.equal(model.last_gates, (model.last_scores > t).float())
        assert model.last_gates.sum() > 0 and (model.last_gates == 0).any()  # both kinds of gate seen
        model.threshold = 0.0  # no score is 0: nothing closes, the routed model is the LoRA-only one
        routed = model(ids)
        assert model.last_gates.min() == 1
        model.open_gates = True
        assert torch.equal(routed, model(ids))


@pytest.mark.parametrize("gate_unit", ["block", "sublayer"])
def test_layerroute_flip_losses_equal_a_rerun_with_that_gate_flipped(tmp_path, gate_unit):
    # LoRA B = 0: the routed model is base with units dropped
    base, model = tiny_routed(tmp_path, dropout=0.0, gate_unit=gate_unit)
    U = len(model.routers)
    set_routers(model, [0.0] * U, weight_std=3.0, seed=3)  # rows get different gates
    torch.manual_seed(0)
    ids, prompt_lens = torch.randint(3, 300, (3, 10)), torch.tensor([4, 6, 5])
    at = torch.arange(10) >= prompt_lens[:, None] - 1  # predict every token after the prompt...
    at[:, -1] = False  # ...the last position has nothing to predict
    targets = ids[:, 1:][at[:, :-1]]
    target_idx = at.flatten().nonzero().squeeze(1)
    model.eval()
    with torch.no_grad():
        _, _, g, inputs = model.train_forward(ids, prompt_lens, target_idx, targets, keep_inputs=True)
    gates = g.bool()
    assert 0 < gates.sum() < gates.numel() and len({tuple(r) for r in gates.tolist()}) > 1
    for k, fixed in [(k, fixed) for k in range(U) for fixed in (False, True)]:
        got = model.flip_losses(k, inputs, g, target_idx, targets, target_idx // 10, fixed)
        for b in range(3):
            flipped = [int(gates[b, i].item() != (i == k)) for i in range(U)]  # row b's gates, unit k flipped
            logits = by_hand(base, ids[b:b + 1], flipped, gate_unit)[0, at[b]]
            expected = torch.nn.functional.cross_entropy(logits, ids[b, 1:][at[b, :-1]])  # mean over the row's targets
            assert got[b].item() == pytest.approx(expected.item(), rel=1e-5), (k, b)


def margins_by_hand(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Target logit minus the best other one, from a sort: the lead of a right argmax, else the gap to it."""
    top = logits.sort(1, descending=True).values
    own = logits[torch.arange(len(targets)), targets]
    return torch.where(logits.argmax(1) == targets, top[:, 0] - top[:, 1], own - top[:, 0])


@pytest.mark.parametrize("margin", [0.0, 0.5])
def test_layerroute_argmax_cost_counts_the_argmaxes_a_skip_breaks(tmp_path, margin):
    base, model = tiny_routed(tmp_path, dropout=0.0)  # LoRA B = 0: the routed model is base with blocks dropped
    set_routers(model, [0.0] * 4, weight_std=3.0, seed=3)  # rows get different gates
    torch.manual_seed(0)
    ids, prompt_lens = torch.randint(3, 300, (3, 10)), torch.tensor([4, 6, 5])
    at = torch.arange(10) >= prompt_lens[:, None] - 1
    at[:, -1] = False
    target_idx = at.flatten().nonzero().squeeze(1)
    rows = target_idx // 10
    model.eval()

    def logits_with(b, gates_b):  # row b through the blocks whose gate is 1, at its target positions
        with torch.no_grad():
            h = base.embed_tokens(ids[b:b + 1])
            cos, sin = base.rope(0, 10, ids.device, h.dtype)
            for i in range(4):
                h = base.layers[i](h, cos, sin) if gates_b[i] else h
            return base.lm_head(base.norm(h))[0, at[b]]
    with torch.no_grad():
        _, _, g, _ = model.train_forward(ids, prompt_lens, target_idx, ids[:, 1:][at[:, :-1]])
    # Targets: the pass's own argmax at odd positions (right, so a skip can break them), the data's elsewhere
    greedy = torch.cat([logits_with(b, g[b].tolist()).argmax(1) for b in range(3)])
    targets = torch.where(torch.arange(len(greedy)) % 2 == 1, greedy, ids[:, 1:][at[:, :-1]])
    expected = torch.zeros(3, 4)  # broken positions per row, had block k been flipped
    for b in range(3):
        now = margins_by_hand(logits_with(b, g[b].tolist()), targets[rows == b])
        for k in range(4):
            flipped = margins_by_hand(logits_with(b, [x if i != k else 1 - x for i, x in enumerate(g[b].tolist())]),
                                      targets[rows == b])
            on, off = (now, flipped) if g[b, k] else (flipped, now)
            expected[b, k] = ((on > 0) & (off <= margin) & (off < on)).sum()
    assert 0 < (expected > 0).sum() < expected.numel()  # some flips break a right argmax, some none
    for fixed in (False, True):
        _, scores, gates, inputs = model.train_forward(ids, prompt_lens, target_idx, targets, fixed, keep_inputs=True)
        assert torch.equal(gates, g) and len(inputs) == 5  # each block's input, and the last block's output
        own = lr.target_margins(base.norm, base.lm_head, inputs[-1], target_idx, targets)
        for k in range(4):
            flip = model.flip_margins(k, inputs, gates, target_idx, targets, fixed)
            on, off = torch.where(gates[rows, k] > 0, own, flip), torch.where(gates[rows, k] > 0, flip, own)
            assert torch.equal(lr.broken_targets(on, off, rows, 3, margin), expected[:, k]), (fixed, k)
        # train.py's measured path with --cost argmax: the labels of the blocks it draws, and their loss
        x = {"ids": ids, "target_idx": target_idx, "targets": targets, "target_rows": rows}
        blocks = train.flipped_blocks(4, 3, torch.Generator().manual_seed(7))
        loss, keep = train.measured_router_loss(model, x, None, scores, gates, inputs, 0.02, 3,
                                                torch.Generator().manual_seed(7), contextlib.nullcontext(),
                                                fixed, "argmax", margin)
        assert torch.equal(keep, (expected[:, blocks] > 0).float())
        bce = sum(torch.nn.functional.binary_cross_entropy(scores[:, k], (expected[:, k] > 0).float()) for k in blocks)
        assert loss.item() == pytest.approx(bce.item(), rel=1e-6)


def test_layerroute_gradients_reach_lora_and_routers_only(tmp_path):
    _, model = tiny_routed(tmp_path, targets="attn")
    set_routers(model, [1.0, -1.0, 1.0, -1.0])
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.01)
    ids = torch.randint(0, 300, (2, 10))
    model.train()
    model.straight_through = True  # the paper's gradient: every block computed, the gate mixes
    logits = model(ids, torch.tensor([4, 6]))
    (logits.square().mean() + lr.gate_loss(model.last_scores)).backward()
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert p.grad is None, n  # the backbone is frozen
        elif n.startswith("base.layers.1.") or n.startswith("base.layers.3."):
            assert p.grad.abs().sum() == 0, n  # LoRA of a closed block: its output is not used
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, n  # open LoRA, every router
    assert len(model.trainable()) == 4 * 4 * 2 + 4 * 2  # A, B on q/k/v/o; router weight, bias


def test_layerroute_gates_depend_on_prompt_real_tokens_only(tmp_path):
    _, model = tiny_routed(tmp_path)
    set_routers(model, [0.0] * 4, weight_std=3.0)
    model.eval()
    ids = torch.randint(3, 300, (3, 16))
    lens = torch.tensor([5, 9, 16])
    with torch.no_grad():
        model(ids, lens)
        scores = model.last_scores.clone()
        changed = ids.clone()
        for b, n in enumerate(lens.tolist()):
            changed[b, n:] = torch.randint(3, 300, (16 - n,))  # new targets (and padding)
        model(changed, lens)
        assert torch.equal(model.last_scores, scores)  # target tokens never move a gate
        model(ids[1:2, :9])  # row 1 alone, unpadded, as a generation prefill sees it
        assert torch.allclose(model.last_scores[0], scores[1], atol=1e-6)


@pytest.mark.parametrize("gate_unit", ["block", "sublayer"])
def test_layerroute_routed_generation_equals_teacher_forcing(tmp_path, gate_unit):
    _, model = tiny_routed(tmp_path, gate_unit=gate_unit)
    set_routers(model, [0.0] * len(model.routers), weight_std=3.0, seed=3)
    model.eval()
    prompt = torch.randint(3, 300, (4, 7))
    with torch.no_grad():
        cache = model.new_cache(4, 12)
        logits = [model(prompt, cache=cache)]
        gates = model.last_gates
        assert 0 < gates.sum() < gates.numel() and len({tuple(g) for g in gates.tolist()}) > 1  # mixed gates
        full = torch.cat([prompt, torch.randint(3, 300, (4, 5))], 1)
        for t in range(7, 12):
            logits.append(model(full[:, t:t + 1], cache=cache))
        teacher = model(full, torch.full((4,), 7))
    assert torch.equal(model.last_gates, gates)
    assert (torch.cat(logits, 1) - teacher).abs().max() <= 1e-4
    for i, (kv, unit) in enumerate(zip(cache.layers, model.units)):  # KV only for the rows that ran attention
        open_rows = gates[:, i].nonzero().squeeze(-1)
        assert torch.equal(cache.rows[i], open_rows)
        if unit.attends:
            assert (kv is None and len(open_rows) == 0) or torch.equal(kv.rows, open_rows)
        else:
            assert kv is None  # an MLP half keeps no cache
    assert qwen.generate(model, prompt[:1], 5) == qwen.generate(model, prompt[:2], 5)[:1]


def mixed_routed(tmp_path) -> lr.LayerRoute:
    """A tiny LayerRoute whose random routers give MIXED's prompts different gates."""
    _, model = tiny_routed(tmp_path)
    set_routers(model, [0.0] * 4, weight_std=3.0, seed=3)
    with torch.no_grad():  # LoRA on too (B is 0 at init), so the adapted layers are the ones that run
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.05)
    return model.eval()


def test_layerroute_left_padded_row_is_routed_as_alone(tmp_path):
    """A generation prefill pools each row over its own prompt, its first real token excluded: left
    padding moves neither a score nor a gate, nor a row's logits through the layers that run it."""
    model = mixed_routed(tmp_path)
    prompts, more = prompts_of(MIXED), torch.randint(3, 300, (len(MIXED), 4))
    pad = qwen.left_pad(prompts, "cpu")[1]
    logits, cache, scores = prefill_then_steps(model, prompts, more)
    for b, p in enumerate(prompts):
        alone, one, own = prefill_then_steps(model, [p], more[b:b + 1])
        torch.testing.assert_close(scores[b], own[0], atol=1e-6, rtol=1e-6)
        assert torch.equal(cache.gates[b], one.gates[0])
        torch.testing.assert_close(logits[b, pad[b]:], alone[0], atol=1e-5, rtol=1e-5)
    assert len({tuple(g) for g in cache.gates.tolist()}) > 1  # rows close different blocks...
    subsets = [kv for kv in cache.layers if kv is not None and 0 < len(kv.rows) < len(prompts)]
    assert any(len(set(kv.pad.tolist())) > 1 for kv in subsets)  # ...and a layer runs padded rows of a subset
    for kv in subsets:
        assert torch.equal(kv.pad, pad[kv.rows])


def test_layerroute_left_padded_batch_generates_what_each_prompt_does_alone(tmp_path):
    model = mixed_routed(tmp_path)
    prompts = prompts_of(MIXED)
    assert qwen.generate(model, prompts, 8) == [qwen.generate(model, [p], 8)[0] for p in prompts]
    model.pooling = "reference"  # pools the padding itself: a padded row cannot get its own gates
    with pytest.raises(ValueError, match="pooling='reference'"):
        qwen.generate(model, prompts, 8)


def test_layerroute_merge_is_w_plus_scaled_ba(tmp_path):
    _, model = tiny_routed(tmp_path)
    q = model.base.layers[0].self_attn.q_proj
    with torch.no_grad():
        q.lora_B.normal_()
    w0 = q.weight.clone()
    x = torch.randn(3, q.weight.shape[1])
    q.eval()
    before = q(x)
    q.merge()
    assert torch.allclose(q.weight, w0 + q.scale * q.lora_B @ q.lora_A)
    assert torch.allclose(q(x), before, atol=1e-5)


def test_layerroute_merged_model_keeps_lora_once_and_base_as_base(tmp_path):
    base, model = tiny_routed(tmp_path, dropout=0.0)
    set_routers(model, [1.0, -1.0, 1.0, 1.0])
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.05)
    model.eval()
    ids = torch.randint(3, 300, (2, 9))
    with torch.no_grad():
        lora, base_logits = model(ids), base(ids)
        for m in model.modules():
            if isinstance(m, lr.LoRALinear):
                m.merge()
                m.merge()  # a second merge changes nothing
        assert (model(ids) - lora).abs().max() <= 1e-4
        model.lora(False)
        model.open_gates = True
        assert torch.equal(model(ids), base_logits)  # base is base: not a trace of the adapter
        model.lora(True)
        model.open_gates = False
        assert (model(ids) - lora).abs().max() <= 1e-4  # switched back on: applied once, not twice


def test_layerroute_adapters_round_trip(tmp_path):
    _, model = tiny_routed(tmp_path / "m")
    set_routers(model, [0.5, -0.5, 1.0, 2.0], weight_std=1.0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    lr.save_adapters(model, str(tmp_path / "run"), {"note": "test"})
    other = lr.LayerRoute(qwen.load_model(str(tmp_path / "m")))
    lr.load_adapters(other, str(tmp_path / "run" / "adapters.safetensors"))
    for (n, p), (_, q) in zip(model.trainable().items(), other.trainable().items()):
        assert torch.equal(p, q), n
    assert json.loads((tmp_path / "run" / "run.json").read_text()) == {"note": "test"}
    with pytest.raises(ValueError, match="adapters do not match"):
        lr.load_adapters(lr.LayerRoute(qwen.load_model(str(tmp_path / "m")), rank=4),
                         str(tmp_path / "run" / "adapters.safetensors"))
@pytest.mark.parametrize("fixed", [False, True])
@pytest.mark.parametrize("straight_through", [False, True])
def test_layerroute_checkpointed_blocks_give_the_same_loss_and_gradients(tmp_path, monkeypatch, fixed,
                                                                        straight_through):
    calls = []
    real = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    _, model = tiny_routed(tmp_path)  # LoRA dropout 0.05: the recomputation must replay its masks
    set_routers(model, [0.0] * 4, weight_std=3.0, seed=15)  # rows get different gates
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.05, generator=torch.Generator().manual_seed(len(n)))
    model.train()
    model.straight_through = straight_through
    ids, T = torch.randint(3, 300, (3, 10), generator=torch.Generator().manual_seed(1)), 10
    prompt_lens = torch.tensor([4, 6, 3])
    idx = [(b, t) for b in range(3) for t in range(int(prompt_lens[b]) - 1, T - 1)]
    target_idx = torch.tensor([b * T + t for b, t in idx])
    targets = torch.tensor([int(ids[b, t + 1]) for b, t in idx])
    results = []
    for checkpointed in (False, True):
        model.checkpoint_blocks = checkpointed
        model.zero_grad(set_to_none=True)
        torch.manual_seed(7)
        losses, scores, _, _ = model.train_forward(ids, prompt_lens, target_idx, targets, fixed=fixed)
        (losses.mean() + scores.mean()).backward()
        results.append((losses.detach(), {n: p.grad.clone() for n, p in model.trainable().items()
                                          if p.grad is not None}))
    (l0, g0), (l1, g1) = results
    assert len(calls) == 4  # each of the 4 blocks, in the checkpointed pass only
    assert torch.allclose(l0, l1, atol=1e-6) and g0.keys() == g1.keys() and len(g0) > 0
    assert all(torch.allclose(g0[n], g1[n], atol=1e-6) for n in g0)


@pytest.mark.parametrize("targets", ["attn", "all"])
def test_peft_export_loads_in_peft_with_our_lora_only_logits(tmp_path, targets):
    import peft  # test-only, as transformers: the adapter's reference
    from transformers import Qwen2ForCausalLM
    write_checkpoint(tmp_path / "m", tie=False)
    model = lr.LayerRoute(qwen.load_model(str(tmp_path / "m")), rank=4, alpha=8, targets=targets)
    set_routers(model, [-3.0] * 4)  # closed gates: the export is the LoRA-only model all the same
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.05)
    model.eval()
    model.open_gates = True
    lr.export_peft(model, str(tmp_path / "m"), str(tmp_path / "peft"))
    theirs = peft.PeftModel.from_pretrained(Qwen2ForCausalLM.from_pretrained(str(tmp_path / "m")),
                                            str(tmp_path / "peft")).eval()
    ids = torch.randint(3, 300, (2, 9))
    with torch.no_grad():
        ours, ref = model(ids), theirs(input_ids=ids).logits
        assert (ours - ref).abs().max() <= 1e-4
        model.lora(False)
        assert (model(ids) - ref).abs().max() > 1e-3  # the adapter is in there: base logits differ


@pytest.mark.parametrize("tie,gate_unit", [(True, "block"), (False, "block"), (True, "sublayer")])
def test_merged_export_loads_in_qwen_and_transformers_and_routes_again(tmp_path, tie, gate_unit):
    from transformers import Qwen2ForCausalLM
    write_checkpoint(tmp_path / "m", tie=tie)
    write_tiny_tokenizer(tmp_path / "m")
    model = lr.LayerRoute(qwen.load_model(str(tmp_path / "m")), rank=4, alpha=8, gate_unit=gate_unit)
    set_routers(model, [0.0] * len(model.routers), weight_std=3.0, seed=15)  # rows get different gates
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.05)
    model.eval()
    lr.export_merged(model, str(tmp_path / "m"), str(tmp_path / "merged"))
    assert (tmp_path / "merged" / "tokenizer.json").exists()
    ids, lens = torch.randint(3, 300, (4, 9)), torch.tensor([5, 7, 4, 9])
    with torch.no_grad():
        routed, gates = model(ids, lens), model.last_gates
        model.open_gates = True
        lora_only = model(ids)
        assert (qwen.load_model(str(tmp_path / "merged"))(ids) - lora_only).abs().max() <= 1e-4
        theirs = Qwen2ForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
        assert (theirs(input_ids=ids).logits - lora_only).abs().max() <= 1e-4
        again = lr.load_merged(str(tmp_path / "merged"))
        assert (again(ids, lens) - routed).abs().max() <= 1e-4 and torch.equal(again.last_gates, gates)
        assert 0 < gates.mean() < 1  # some blocks skipped, some run


# ---- end layerroute ----

# ---- train ----

import train  # noqa: E402

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>",
           "<tool_response>", "</tool_response>"]


def write_tiny_tokenizer(folder):
    """A byte-level tokenizer (256 bytes + ChatML specials = 263 ids) in the tokenizer.json format."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    # Sorted: alphabet() comes in a different order in every process, and so would every token id.
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL)
    tok.save(str(folder / "tokenizer.json"))
    return tok


def test_one_tokenizer_loader_for_a_file_a_folder_or_a_name(tmp_path):
    tok = write_tiny_tokenizer(tmp_path)
    for source in (str(tmp_path / "tokenizer.json"), str(tmp_path)):
        assert qwen.load_tokenizer(source).encode("hi <|im_end|>").ids == tok.encode("hi <|im_end|>").ids
    with pytest.raises(FileNotFoundError, match="nowhere/tokenizer.json"):
        qwen.load_tokenizer(str(tmp_path / "nowhere" / "tokenizer.json"))


# write_tiny_data's tool calls are 674-676 byte tokens long, its replies up to 730: the calls fit (a tool
# call that does not fit is dropped), the replies are cut.
TINY_LEN = "712"


def write_tiny_data(folder, n_math=40, n_tool=20):
    """gsm8k lines and sharegpt tool conversations, in their native formats."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "train.jsonl", "w") as f:
        for i in range(n_math):
            f.write(json.dumps({"question": f"What is {i} plus {i}?", "answer": f"{i} + {i} = {2 * i}\n#### {2 * i}"}) + "\n")
    # A function of its own per conversation, so that the split by function spreads them (13/2/5)
    tools = [json.dumps([{"name": f"get_time_{i}", "description": "time in a city",
                          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}])
             for i in range(n_tool)]
    convs = [{"tools": tools[i], "conversations": [
        {"from": "human", "value": f"What time is it in city {i}?"},
        {"from": "function_call", "value": json.dumps({"name": f"get_time_{i}", "arguments": {"city": f"c{i}"}})},
        {"from": "observation", "value": json.dumps({"time": f"{i}:00"})},
        {"from": "gpt", "value": f"It is {i}:00."}]} for i in range(n_tool)]
    (folder / "tools.json").write_text(json.dumps(convs))


def train_args(tmp_path, *extra):
    model = tmp_path / "model"
    if not (model / "config.json").exists():
        write_checkpoint(model, layers=2)
        write_tiny_tokenizer(model)
        write_tiny_data(tmp_path / "data")
    return train.parse_args(["--model", str(model), "--data-dir", str(tmp_path / "data"), "--device", "cpu",
                             "--max-len", TINY_LEN, "--batch-size", "2", "--grad-accum", "2", "--warmup", "2",
                             "--log-every", "1", "--save-every", "3", *extra])


def adapters_of(run) -> dict:
    """The trained tensors of a run's newest checkpoint."""
    from safetensors.torch import load_file
    return load_file(os.path.join(lr.latest_checkpoint(str(run)), "adapters.safetensors"))


def test_train_steps_zero_prints_counts(tmp_path, capsys):
    train.train(train_args(tmp_path, "--steps", "0", "--out", str(tmp_path / "run")))
    err = capsys.readouterr().err
    # Rank 32, 2 blocks of 64-wide q/k/v/o: q 32*(64+64) + k 32*(64+32) + v 32*(64+32) + o 32*(64+64)
    # = 14,336, plus the MLP (96 wide): gate, up, down 3 * 32*(64+96) = 15,360 per block; routers 2 * (64 + 1)
    assert "lora 59,392" in err and "routers 130" in err and "trainable 59,522" in err
    assert not (tmp_path / "run").exists()


def test_lora_alpha_follows_the_rank():
    # The adapter's scale alpha / rank stays the paper's 2 whatever the rank, unless alpha is given.
    def scale(*argv):
        args = train.parse_args(list(argv))
        return args.lora_alpha / args.lora_rank
    assert scale() == scale("--lora-rank", "8") == 2.0
    assert scale("--lora-rank", "8", "--lora-alpha", "8") == 1.0


def test_default_flips_measure_each_router_about_60_times():
    # The CPU budget: 30 layers, 300 micro-batches: 60 * 30 / 300 = 6 flips, 6 * 300 / 30 = 60 each.
    assert train.default_flips(30, 300) == 6
    # The paper's scale: 24 layers, 3,000 steps of one pass: 0.48 rounds up to 1, the floor is 2 (250 each).
    assert train.default_flips(24, 3_000) == 2
    assert train.default_flips(2, 10) == 2  # never more blocks than the model has
    assert train.default_flips(10, 200) == 3 and train.default_flips(10, 199) == 4  # rounded up, never under 60
    # A short trial run measures each router fewer times instead of rerunning every block.
    assert train.default_flips(30, 4) == train.default_flips(30, 299) == train.MAX_DEFAULT_FLIPS == 6


def qwen25_on_meta():
    with torch.device("meta"):
        return qwen.Qwen2(qwen.QwenConfig.from_json(os.path.join(os.path.dirname(__file__), "configs",
                                                                 "qwen2.5-0.5b-instruct.json")))


@pytest.mark.parametrize("recipe,expected", [
    ("layerroute", dict(gate_grad="measured", lora_rank=32, lora_alpha=64.0, lora_targets="all", pooling="prompt",
                        router_init="neutral", router_lr_mult=300.0, router_bias=0.3, trainable=17_617_944)),
    # the paper's count: LoRA r 8 on q/k/v/o 1,081,344 + 24 routers of 896 + 1
    ("paper", dict(gate_grad="ste", lora_rank=8, lora_alpha=16.0, lora_targets="attn", pooling="prompt",
                   router_init="neutral", router_lr_mult=30.0, router_bias=1.0, trainable=1_102_872)),
    ("reference", dict(gate_grad="ste", lora_rank=8, lora_alpha=16.0, lora_targets="attn", pooling="reference",
                       router_init="band", router_lr_mult=30.0, router_bias=1.0, trainable=1_102_872))])
def test_recipes_set_their_defaults_and_each_flag_overrides(recipe, expected):
    args = train.parse_args(["--recipe", recipe])
    trainable = expected.pop("trainable")
    assert {k: getattr(args, k) for k in expected} == expected
    model = train.wrap(qwen25_on_meta(), args)
    assert model.counts()["trainable"] == trainable
    assert model.straight_through == (expected["gate_grad"] == "ste")
    biases = [r.bias.item() for r in train.wrap(qwen.Qwen2(qwen.QwenConfig(**{
        k: v for k, v in tiny_config(layers=6).items() if k in {"hidden_size", "intermediate_size",
        "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size"}})), args).routers]
    closed = [-1.0] * 2 if recipe == "reference" else [1.0] * 2  # band: the middle third starts closed
    assert biases == pytest.approx([1.0, 1.0, *closed, 1.0, 1.0] if expected["gate_grad"] == "ste" else [0.3] * 6)
    over = train.parse_args(["--recipe", recipe, "--lora-rank", "4", "--gate-grad", "measured", "--pooling", "prompt"])
    assert (over.lora_rank, over.lora_alpha, over.gate_grad, over.router_lr_mult, over.pooling) == \
        (4, 8.0, "measured", 300.0, "prompt")
    assert over.lora_targets == expected["lora_targets"] and over.router_init == expected["router_init"]


def test_layerroute_defaults_are_the_default_recipe():
    args = train.parse_args([])
    assert args.recipe == "layerroute"
    defaults = {k: p.default for k, p in inspect.signature(lr.LayerRoute).parameters.items() if k != "base"}
    assert defaults == dict(rank=args.lora_rank, alpha=args.lora_alpha, dropout=args.lora_dropout,
                            router_bias=args.router_bias, pooling=args.pooling, targets=args.lora_targets,
                            gate_unit=args.gate_unit)
    assert lr.LayerRoute(qwen25_on_meta()).straight_through == (args.gate_grad == "ste")


@pytest.mark.parametrize("module", ["train", "eval", "data", "qwen", "chat"])
def test_help_shows_every_default(module, capsys, monkeypatch):
    """Every flag's help gives its default, or the rule that sets it, as it will be used."""
    monkeypatch.setenv("COLUMNS", "1000")  # one line per flag (or two, where its name is long)
    mod = {"train": train, "eval": ev, "data": data, "qwen": qwen, "chat": chat}[module]
    with pytest.raises(SystemExit):
        mod.main(["--help"])
    text = capsys.readouterr().out.split("options:")[1]
    blocks = re.split(r"\n  (?=-)", text)[1:]
    assert len(blocks) >= {"train": 34, "eval": 20, "data": 7, "qwen": 7, "chat": 15}[module]
    switches = ("--help", "--resume", "--overwrite", "--check-syncs", "--json", "--chat", "--run ", "--runs", "--prompt",
                "--serve", "--quiet") + (("--model",) if module == "chat" else ())  # chat: --run or --model
    for block in blocks:
        if block.startswith("-h") or block.startswith(switches):
            continue  # off unless given, or required
        assert "default" in block, f"{module}: {block}"


@pytest.mark.parametrize("mode", ["measured", "ste"])
def test_train_lowers_the_loss(tmp_path, mode):
    out = tmp_path / "run"
    train.train(train_args(tmp_path, "--steps", "30", "--lr", "2e-2", "--gate-grad", mode, "--gate-lambda", "0.1",
                           "--out", str(out)))
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 31))
    first, last = sum(r["loss"] for r in log[:5]) / 5, sum(r["loss"] for r in log[-10:]) / 10
    # starts near ln(300) = 5.70 nats, a uniform guess; a step's loss moves about 0.05 from batch to batch,
    # so these two means differ by about 0.03 by chance. The CPU thread count moves the straight-through
    # run's gates, and with them its last steps by about 0.05 (one thread: 0.10 lower; two: 0.15).
    assert last < first - 0.08, (first, last)
    run = lr.read_settings(str(out))[1]
    assert run["step"] == 30 and run["model"] == str(tmp_path / "model")
    assert run["recipe"] == "layerroute" and run["gate_grad"] == mode and run["lora_rank"] == 32  # as used
    # the default, recorded as used: both blocks of this 2-layer model; straight-through flips none
    assert run["flips"] == (2 if mode == "measured" else None)
    model, _, _ = lr.load_run(str(out))  # eval needs nothing but the folder
    assert model.counts()["trainable"] == 59_522  # q/k/v/o and MLP LoRA plus routers, as counted above


def test_data_router_only_steps_follow_their_functions():
    def step(kind, *names):
        return data.Step("x:1:0", "openai", kind, "train", "", "", [{"name": n, "arguments": {}} for n in names]
                         if kind == "tool_call" else "4")
    names = [f"fn_{i}" for i in range(60)]
    side = {n: data.router_only_step(step("tool_call", n), 0.3) for n in names}
    assert 8 < sum(side.values()) < 30  # about 30% of the functions
    assert not any(data.router_only_step(step("tool_call", n), 0.0) for n in names)
    assert all(data.router_only_step(step("tool_call", n), 1.0) for n in names)
    assert not data.router_only_step(step("planning"), 1.0)
    mine, lora = next(n for n in names if side[n]), next(n for n in names if not side[n])
    assert data.router_only_step(step("tool_call", lora, mine), 0.3)  # a call of any router-only function
    # its own salt: the router side is not the test split's functions again
    assert {n for n in names if side[n]} != {n for n in names if data.function_split(n) == "test"}


def test_train_router_only_rows_teach_the_routers_alone(tmp_path):
    import types
    _, model = tiny_routed(tmp_path, dropout=0.0)
    model.straight_through = False
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.05)
    torch.manual_seed(0)
    rows = [(torch.randint(3, 300, (n_p,)).tolist(), torch.randint(3, 300, (n_t,)).tolist())
            for n_p, n_t in [(5, 4), (7, 5), (4, 6), (6, 3)]]
    kinds, only = ["tool_call", "tool_call", "planning", "tool_call"], [False, True, False, False]
    args = types.SimpleNamespace(grad_accum=1, router_only=0.3, flips=4, fast=False, cost="loss", margin=0.0, distill=0.0,
                                 open_loss=0.0)

    def run(b, a):
        x = train.on_device(b, "cpu")
        return x, train.micro_loss(model, x, b.n_target, 0.02, a, torch.Generator().manual_seed(7), contextlib.nullcontext())
    b = data.collate(rows, kinds, 0, router_only=only)
    assert b.n_target == 4 + 6 + 3 and b.router_only.tolist() == only  # the router-only row's 5 not counted
    x, (lm, gate, gates, keep) = run(b, args)
    keep_rows = [0, 2, 3]  # the LM loss is the one of the other rows alone
    plain = data.collate([rows[i] for i in keep_rows], [kinds[i] for i in keep_rows], 0)
    _, (lm_ref, *_) = run(plain, types.SimpleNamespace(**{**vars(args), "router_only": 0.0}))
    assert lm.item() == pytest.approx(lm_ref.item(), rel=1e-5)
    # The routers learn from the router-only call and the planning row, never from the calls LoRA fits:
    # each flipped block's loss is the mean over the 4 rows of the BCE of rows 1 and 2 only.
    scores = model.last_scores
    by_hand = sum(-(keep[b, j] * scores[b, k].log() + (1 - keep[b, j]) * (1 - scores[b, k]).log()) / 4
                  for j, k in enumerate(train.flipped_blocks(4, 4, torch.Generator().manual_seed(7))) for b in (1, 2))
    assert gate.item() == pytest.approx(by_hand.item(), rel=1e-5)
    assert train.TOOL_CALL == data.KINDS.index("tool_call")


def test_layerroute_block_drop_skips_blocks_at_random_in_training_only(tmp_path):
    base, model = tiny_routed(tmp_path, dropout=0.0)
    set_routers(model, [5.0] * 4)  # every router opens its block: what closes is block_drop's alone
    model.block_drop = 0.5
    torch.manual_seed(0)
    ids, prompt_lens = torch.randint(3, 300, (6, 9)), torch.full((6,), 4)
    target_idx = torch.tensor([b * 9 + t for b in range(6) for t in range(3, 8)])
    targets = ids.flatten()[target_idx + 1]
    model.train()
    runs = {}
    for fixed in (False, True):
        torch.manual_seed(1)
        runs[fixed] = model.train_forward(ids, prompt_lens, target_idx, targets, fixed)
    (loss, _, gates, _), (loss_fixed, _, gates_fixed, _) = runs[False], runs[True]
    assert torch.equal(gates, gates_fixed) and 0.2 < (1 - gates).mean() < 0.8  # the same draw in both passes
    torch.testing.assert_close(loss, loss_fixed)
    with torch.no_grad():  # by hand: each row through the blocks its draw kept
        h = base.embed_tokens(ids)
        cos, sin = base.rope(0, 9, ids.device, h.dtype)
        for i in range(4):
            h = torch.where(gates[:, i, None, None] > 0, base.layers[i](h, cos, sin), h)
        ref = torch.nn.functional.cross_entropy(base.lm_head(base.norm(h)).flatten(0, 1)[target_idx], targets,
                                                reduction="none")
    torch.testing.assert_close(loss.detach(), ref)
    with torch.no_grad():
        model(ids, prompt_lens)
    assert model.last_gates.min() == 1  # no gradient: no drop
    model.eval()
    model.train_forward(ids, prompt_lens, target_idx, targets)
    assert model.last_gates.min() == 1  # eval mode: no drop


def half_closed_batch(tmp_path):
    """A tiny routed model with LoRA not zero and blocks 1 and 3 closed (the routed pass is not LoRA alone's),
    and a micro-batch of a tool call and a planning step: (model, the batch, its tensors)."""
    _, model = tiny_routed(tmp_path, dropout=0.0)
    set_routers(model, [5.0, -5.0, 5.0, -5.0])
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.05)
    torch.manual_seed(0)
    rows = [(torch.randint(3, 300, (n_p,)).tolist(), torch.randint(3, 300, (n_t,)).tolist()) for n_p, n_t in [(5, 4), (7, 5)]]
    b = data.collate(rows, ["tool_call", "planning"], 0)
    x = train.on_device(b, "cpu")
    return model, b, x


def test_train_distill_mixes_the_gates_open_distribution_into_the_targets(tmp_path, capsys):
    import types
    model, b, x = half_closed_batch(tmp_path)  # the routed pass is not the teacher
    args = types.SimpleNamespace(grad_accum=1, router_only=0.0, flips=2, fast=False, cost="loss", margin=0.0,
                                 open_loss=0.0)
    model.train()

    def lm(a):
        out = train.micro_loss(model, x, b.n_target, 0.02, types.SimpleNamespace(**vars(args), distill=a),
                               torch.Generator().manual_seed(7), contextlib.nullcontext())
        assert model.open_gates is False and model.training and model.last_gates[:, 1].max() == 0  # restored
        return out[0].item()
    with torch.no_grad():  # by hand: the teacher is LoRA-only (every block on), the student the routed model
        logp = {}
        for name in ("lora", "routed"):
            with ev.mode(model, name):
                logp[name] = model(x["ids"], x["prompt_lens"]).flatten(0, 1)[x["target_idx"]].float().log_softmax(-1)
    ce = -logp["routed"].gather(1, x["targets"][:, None]).squeeze(1)
    soft = -(logp["lora"].exp() * logp["routed"]).sum(1)  # cross-entropy against the teacher's distribution
    assert lm(0.0) == pytest.approx(ce.sum().item() / b.n_target, rel=1e-5)
    assert lm(0.3) == pytest.approx((0.7 * ce + 0.3 * soft).sum().item() / b.n_target, rel=1e-5)
    with pytest.raises(SystemExit):
        train.parse_args(["--distill", "0.3", "--gate-grad", "measured", "--cost", "argmax"])
    assert "--distill with --cost argmax" in capsys.readouterr().err


def test_train_open_loss_adds_lora_alone_loss_and_leaves_the_routers_to_the_routed_pass(tmp_path):
    import types
    model, b, x = half_closed_batch(tmp_path)
    model.block_drop = 0.5  # drops blocks in the routed pass only
    args = types.SimpleNamespace(grad_accum=1, router_only=0.0, flips=2, cost="loss", margin=0.0, distill=0.0)
    model.train()
    with torch.no_grad():  # LoRA alone's loss by hand: every block on
        with ev.mode(model, "lora"):
            logits = model(x["ids"], x["prompt_lens"]).flatten(0, 1)[x["target_idx"]].float()
        alone = torch.nn.functional.cross_entropy(logits, x["targets"], reduction="sum").item() / b.n_target

    def step(w, straight_through, fixed):
        model.straight_through = straight_through
        model.zero_grad()
        torch.manual_seed(3)  # the same block_drop draw in the routed pass every time
        lm, gate, gates, _ = train.micro_loss(model, x, b.n_target, 0.02, types.SimpleNamespace(
            **vars(args), fast=fixed, open_loss=w), torch.Generator().manual_seed(7), contextlib.nullcontext())
        (lm + gate).backward()
        assert (model.open_gates, model.block_drop, model.straight_through) == (False, 0.5, straight_through)
        assert gates[:, 1].max() == 0  # the routed pass's gates come back, not the open pass's
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return lm.item(), grads
    for straight_through in (False, True):
        for fixed in (False, True):
            lm0, g0 = step(0.0, straight_through, fixed)
            lm1, g1 = step(0.7, straight_through, fixed)
            assert lm1 == pytest.approx(lm0 + 0.7 * alone, rel=1e-5)
            routers = [n for n in g0 if n.startswith("routers.")]
            assert routers and all(torch.equal(g0[n], g1[n]) for n in routers)  # the open pass moves no router
            assert any(not torch.allclose(g0[n], g1[n]) for n in g0 if "lora_" in n)
    both, one = (train.memory_use(model, train.parse_args(f), torch.bfloat16) for f in (["--open-loss", "1"], []))
    assert both["activations"] == 2 * one["activations"]  # the open pass's activations wait for the same backward


def test_train_router_only_and_block_drop_run_and_are_recorded(tmp_path, capsys):
    out = tmp_path / "run"
    train.train(train_args(tmp_path, "--steps", "2", "--gate-grad", "measured", "--router-only", "0.5", "--out", str(out)))
    said = re.search(r"router-only: (\d+) of the (\d+) training tool calls", capsys.readouterr().err)
    assert said and 0 < int(said[1]) < int(said[2])
    assert lr.read_settings(str(out))[1]["router_only"] == 0.5
    train.train(train_args(tmp_path, "--steps", "2", "--block-drop", "0.3", "--distill", "0.5", "--out", str(tmp_path / "drop")))
    assert lr.read_settings(str(tmp_path / "drop"))[1]["block_drop"] == 0.3
    with pytest.raises(SystemExit):
        train.parse_args(["--router-only", "0.5", "--gate-grad", "ste"])
    assert "--router-only needs --gate-grad measured" in capsys.readouterr().err


@pytest.mark.parametrize("price,init,skipped,dtype", [(100.0, "neutral", 100.0, "float32"),
                                                      (-100.0, "band", 0.0, "bfloat16")])  # + the autocast path
def test_train_measured_gates_follow_the_price(tmp_path, price, init, skipped, dtype):
    # Skipping a block of this model costs far less than 100 nats/token and far more than -100:
    # the measured gradient must close every gate in the first case and open every one in the second.
    out = tmp_path / "run"
    train.train(train_args(tmp_path, "--steps", "8", "--gate-grad", "measured", "--price", str(price),
                           "--router-init", init, "--router-lr-mult", "1000", "--dtype", dtype, "--out", str(out)))
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    def skips(rec):
        return {rec[k] for k in rec if k.startswith("skip_")}
    assert skips(log[0]) == ({0.0} if init == "neutral" else {50.0})  # band: one of the 2 blocks closed at first
    assert skips(log[-1]) == {skipped}, log[-1]


@pytest.mark.parametrize("mode,start,step", [("ste", 1.0, "--no-fast"), ("measured", 0.03, "--no-fast"),
                                             ("measured", 0.03, "--fast")])  # compiled: its own dropout masks
def test_train_resume_equals_uninterrupted(tmp_path, mode, start, step):
    whole, cut = tmp_path / "whole", tmp_path / "cut"

    def run(out, *extra, **kw):
        train.train(train_args(tmp_path, "--steps", "6", "--skip-target", "0.3", "--gate-grad", mode,
                               "--out", str(out), step, *extra), **kw)
    run(whole)
    run(cut, stop_at=3)  # "interrupted"
    assert lr.read_settings(str(cut))[1]["step"] == 3
    run(cut, "--resume")
    a, b = (adapters_of(d) for d in (whole, cut))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    lam = [lr.read_settings(str(d))[1]["lambda_now"] for d in (whole, cut)]
    assert lam[0] == lam[1] != start  # the dual-ascent lambda (or price) moved, and resumed where it was
    with pytest.raises(ValueError, match="--resume: --lr 1.0 but the run"):
        run(cut, "--resume", "--lr", "1")
def test_train_stops_when_a_step_type_has_no_training_rows(tmp_path, capsys):
    args = train_args(tmp_path, "--steps", "2", "--out", str(tmp_path / "run"))
    (tmp_path / "data" / "tools.json").write_bytes(b'[{"tools": "[]", "conversations": [\xff')  # cut, not UTF-8
    with pytest.raises(ValueError, match="no tool_call steps in the train split") as err:
        train.train(args)
    assert "tools.json" in str(err.value)  # and the report says what became of the file
    assert not (tmp_path / "run" / "log.jsonl").exists()


def test_train_refuses_a_run_in_out_unless_told(tmp_path, capsys):
    out = tmp_path / "run"
    train.train(train_args(tmp_path, "--steps", "2", "--out", str(out)))
    before = adapters_of(out)
    (out / "report.json").write_text("{}")  # an evaluation of the adapters about to be replaced
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="--resume continues it, --overwrite replaces it"):
        train.train(train_args(tmp_path, "--steps", "2", "--seed", "1", "--out", str(out)))
    assert all(torch.equal(before[k], v) for k, v in adapters_of(out).items())  # untouched
    train.train(train_args(tmp_path, "--steps", "2", "--seed", "1", "--out", str(out), "--overwrite"))
    log = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert log == [1, 2] and not (out / "report.json").exists() and (out / "notes.txt").read_text() == "mine"
    assert not all(torch.equal(before[k], v) for k, v in adapters_of(out).items())
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        train.train(train_args(tmp_path, "--steps", "2", "--out", str(tmp_path / "new"), "--resume"))


def test_train_checkpoint_is_whole_or_absent_after_a_fault(tmp_path, monkeypatch):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    train.train(train_args(tmp_path, "--steps", "6", "--out", str(whole)))
    real = train.save_file

    def disk_full_at_step_6(tensors, path):
        if "checkpoint-000006" in path and path.endswith("adapters.safetensors"):
            raise OSError(28, "No space left on device")
        real(tensors, path)
    monkeypatch.setattr(train, "save_file", disk_full_at_step_6)
    with pytest.raises(OSError, match="No space"):
        train.train(train_args(tmp_path, "--steps", "6", "--out", str(cut)))
    monkeypatch.setattr(train, "save_file", real)
    assert sorted(os.listdir(cut)) == ["checkpoint-000003", "log.jsonl"]  # no half-written checkpoint
    # A kill mid-save leaves a hidden partial folder: never taken for a checkpoint.
    (cut / ".checkpoint-000006.x").mkdir()
    (cut / ".checkpoint-000006.x" / "run.json").write_text('{"step": 6}')
    assert lr.latest_checkpoint(str(cut)).endswith("checkpoint-000003")
    train.train(train_args(tmp_path, "--steps", "6", "--out", str(cut), "--resume"))
    a, b = adapters_of(whole), adapters_of(cut)
    assert all(torch.equal(a[k], b[k]) for k in a)  # the result of the uninterrupted run
    steps = [json.loads(line)["step"] for line in (cut / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]  # lines past the checkpoint resumed from are logged once
    assert [os.path.basename(c) for c in lr.checkpoints(str(cut))] == ["checkpoint-000003", "checkpoint-000006"]


@pytest.mark.parametrize("flag,value", [("--warmup", "3"), ("--price", "0.05"), ("--lora-dropout", "0.1"),
                                        ("--pooling", "reference"), ("--router-init", "band"),
                                        ("--tool-fraction", "0.3"), ("--data-dir", None), ("--recipe", "paper"),
                                        ("--cost", "argmax")])
def test_train_resume_refuses_a_changed_setting(tmp_path, flag, value):
    out = tmp_path / "run"
    train.train(train_args(tmp_path, "--steps", "4", "--out", str(out)), stop_at=3)
    if flag == "--data-dir":
        import shutil
        value = str(shutil.copytree(tmp_path / "data", tmp_path / "other"))
    with pytest.raises(ValueError, match=f"--resume: {flag} {value} but the run in"):
        train.train(train_args(tmp_path, "--steps", "4", "--out", str(out), "--resume", flag, value))
    train.train(train_args(tmp_path, "--steps", "4", "--out", str(out), "--resume", "--log-every", "2"))
    assert lr.read_settings(str(out))[1]["step"] == 4  # what does not change the result may change


@pytest.mark.parametrize("argv,message", [
    (["--steps", "-5"], "--steps: must be >= 0"), (["--max-len", "1"], "--max-len: must be >= 8"),
    (["--tool-fraction", "2"], "--tool-fraction: must be <= 1"), (["--batch-size", "-2"], "--batch-size: must be >= 1"),
    (["--batch-size", "0"], "--batch-size: must be >= 1"), (["--grad-accum", "0"], "--grad-accum: must be >= 1"),
    (["--lora-rank", "0"], "--lora-rank: must be >= 1"), (["--save-every", "0"], "--save-every: must be >= 1"),
    (["--lr", "nan"], "--lr: must be > 0"), (["--lora-dropout", "1"], "--lora-dropout: must be < 1"),
    (["--steps", "ten"], "--steps: expected an integer, got 'ten'"), (["--margin", "-1"], "--margin: must be >= 0"),
    (["--cost", "argmax", "--gate-grad", "ste"], "--cost argmax needs --gate-grad measured"),
    (["--cost", "argmax", "--skip-target", "0.2"], "dual ascent moves the price, which the argmax cost does not use")])
def test_train_refuses_nonsense_numbers_at_parse_time(argv, message, capsys):
    with pytest.raises(SystemExit):
        train.parse_args(argv)
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_train_never_writes_through_a_planted_link(tmp_path):
    out, outside = tmp_path / "run", tmp_path / "outside.txt"
    outside.write_text("keep")
    train.train(train_args(tmp_path, "--steps", "6", "--out", str(out)), stop_at=3)
    (out / "run.json.tmp").symlink_to(outside)  # the old temporary name
    (out / "log.jsonl").rename(tmp_path / "log.jsonl")
    (out / "log.jsonl").symlink_to(outside)
    with pytest.raises(OSError, match="log.jsonl: a symbolic link"):
        train.append_line(str(out / "log.jsonl"), "{}\n")
    train.train(train_args(tmp_path, "--steps", "6", "--out", str(out), "--resume"))
    assert outside.read_text() == "keep" and not (out / "log.jsonl").is_symlink()  # the resume wrote its own
    lr.write_json(str(out / "report.json"), {"a": 1})
    (out / "report.json").unlink()
    (out / "report.json").symlink_to(outside)
    lr.write_json(str(out / "report.json"), {"a": 2})  # replaces the link, never writes its target
    assert outside.read_text() == "keep" and json.loads((out / "report.json").read_text()) == {"a": 2}


def fast_and_eager_steps(tmp_path, mode, gate_unit="block"):
    """One micro-batch's loss and gradients through train.micro_loss, eager and fixed-shape (compiled)."""
    if not (tmp_path / "model" / "config.json").exists():
        write_checkpoint(tmp_path / "model", layers=4)
        write_tiny_tokenizer(tmp_path / "model")
        write_tiny_data(tmp_path / "data")
    out = {}
    for fast in (False, True):
        args = train.parse_args(["--model", str(tmp_path / "model"), "--data-dir", str(tmp_path / "data"),
                                 "--device", "cpu", "--max-len", TINY_LEN, "--batch-size", "4", "--gate-grad", mode,
                                 "--flips", "3", "--lora-dropout", "0", "--out", str(tmp_path / "run"),
                                 "--gate-unit", gate_unit, "--fast" if fast else "--no-fast"])
        model, _ = train.build(args)
        model.straight_through = mode == "ste"
        # rows get 2 patterns of gates, and some blocks are closed for every row
        set_routers(model, [0.0] * len(model.routers), weight_std=3.0, seed=38 if gate_unit == "block" else 68)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(std=0.05, generator=torch.Generator().manual_seed(len(n)))
        if args.compile:
            model.compile_training()
        model.train()
        b = next(train.training_batches(args, model, 0))
        lam = torch.tensor(0.02 if mode == "measured" else 1.0, dtype=torch.float64)
        lm, gate, gates, _ = train.micro_loss(model, train.on_device(b, "cpu"), b.n_target, lam, args,
                                              torch.Generator().manual_seed(0), torch.autocast("cpu", enabled=False))
        (lm + gate).backward()
        grads = {n: torch.zeros_like(p) if p.grad is None else p.grad for n, p in model.trainable().items()}
        out[fast] = lm.item(), gate.item(), gates, grads, b.ids.shape
    return out


@pytest.mark.parametrize("mode,gate_unit", [("ste", "block"), ("measured", "block"), ("measured", "sublayer")])
def test_train_fast_step_equals_eager_step(tmp_path, mode, gate_unit):
    # The fixed-shape step computes every block for every row, keeps it by the gate, runs compiled and pads
    # rows to 16 tokens; the eager step (measured: closed blocks not computed at all) is the reference.
    out = fast_and_eager_steps(tmp_path, mode, gate_unit)
    (lm0, gate0, gates0, grads0, shape0), (lm1, gate1, gates1, grads1, shape1) = out[False], out[True]
    assert shape1[1] % 16 == 0 and shape1[1] > shape0[1]  # padded: the same loss from more positions
    assert 0 < gates0.sum() < gates0.numel() and len({tuple(r) for r in gates0.tolist()}) > 1  # mixed gates
    assert torch.equal(gates0, gates1)
    assert lm1 == pytest.approx(lm0, rel=1e-6) and gate1 == pytest.approx(gate0, rel=1e-5, abs=1e-7)
    for n, g in grads0.items():
        assert torch.allclose(grads1[n], g, rtol=1e-4, atol=1e-6 * g.abs().max().item() + 1e-9), n
    per = gates0.shape[1] // 4  # gates a block: a block every row skips (both halves) has LoRA that learns nothing
    closed = [i for i in range(4) if gates0[:, per * i:per * (i + 1)].sum() == 0]
    assert closed and all(grads1[n].abs().max() == 0 for n in grads1 if any(f"layers.{i}." in n for i in closed))
    if mode == "ste":
        assert all(g.abs().sum() > 0 for n, g in grads0.items() if n.startswith("routers."))
    else:  # measured: a router learns from its flips only, and some of the three flipped blocks moved
        assert sum(g.abs().sum() > 0 for n, g in grads0.items() if n.startswith("routers.")) >= 2


@pytest.mark.parametrize("gate_unit", ["block", "sublayer"])
def test_train_fixed_shape_pass_compiles_as_one_graph(tmp_path, gate_unit):
    # fullgraph=True fails on anything that waits for the device (.item(), nonzero(), a boolean mask):
    # the whole fixed-shape pass and a flip rerun trace as single graphs, so neither syncs with the host.
    _, model = tiny_routed(tmp_path, dropout=0.0, gate_unit=gate_unit)
    set_routers(model, [0.0] * len(model.routers), weight_std=3.0, seed=3)
    ids, lens = torch.randint(3, 300, (3, 16)), torch.tensor([5, 9, 12])
    target_idx = torch.tensor([5, 6, 7, 25, 26, 41, 42, 43, 44])
    targets, rows = ids.flatten()[target_idx + 1], target_idx // 16
    model.train()

    def fixed_pass(ids, lens):
        losses, scores, gates, inputs = model.train_forward(ids, lens, target_idx, targets, fixed=True,
                                                            keep_inputs=True)
        return losses, scores, gates, model.flip_losses(1, inputs, gates, target_idx, targets, rows, fixed=True)
    compiled = torch.compile(fixed_pass, fullgraph=True, backend="aot_eager")
    got, expected = compiled(ids, lens), fixed_pass(ids, lens)
    for a, b in zip(got, expected):
        assert torch.allclose(a, b, atol=1e-5)
    got[0].sum().backward()  # and the backward of the compiled pass runs


# Several processes: torchrun --nproc-per-node 2 (gloo on the CPU) trains what one process trains.

import subprocess  # noqa: E402
import sys  # noqa: E402

from safetensors.torch import load_file  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))

# train.train(args, stop_at=N) under torchrun: a run interrupted after step N, as test_layerroute's are.
STOP_AT = """import sys
sys.path.insert(0, {here!r})
import qwen, train
stop = int(sys.argv.pop(1))
qwen.cli(lambda: train.train(train.parse_args(sys.argv[1:]), stop_at=stop))
"""

# train.py with a fault on rank 1 in step 2: an exception, or a hang that never reaches the next collective.
FAULTY = """import os, sys, time
sys.path.insert(0, {here!r})
import qwen, train
fault, real, calls = sys.argv.pop(1), train.micro_loss, []
def micro_loss(*args, **kwargs):
    calls.append(1)
    if os.environ["RANK"] == "1" and len(calls) == 3:  # step 2's first micro-batch (--grad-accum 2)
        if fault == "raises":
            raise RuntimeError("a fault injected on rank 1")
        time.sleep(600)
    return real(*args, **kwargs)
train.micro_loss = micro_loss
qwen.cli(train.main)
"""


def tiny_run_argv(tmp_path, *extra) -> list[str]:
    """train_args' tiny setup with 4 blocks (so 2 flips are a real draw) and 4 rows a micro-batch (2 a rank)."""
    model = tmp_path / "model"
    if not (model / "config.json").exists():
        write_checkpoint(model, layers=4)
        write_tiny_tokenizer(model)
        write_tiny_data(tmp_path / "data")
    return ["--model", str(model), "--data-dir", str(tmp_path / "data"), "--device", "cpu", "--max-len", TINY_LEN,
            "--batch-size", "4", "--grad-accum", "2", "--warmup", "2", "--log-every", "1", "--save-every", "3",
            *extra]


def torchrun(tmp_path, script, *argv, timeout=120, **env) -> tuple[subprocess.CompletedProcess, float]:
    """`torchrun --nproc-per-node 2 script argv` (a free port, one thread a process); (result, seconds)."""
    if script in (STOP_AT, FAULTY):
        path = tmp_path / ("stop_at.py" if script is STOP_AT else "faulty.py")
        path.write_text(script.format(here=HERE))
        script = str(path)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", script, *argv]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LAYERROUTE_DIST_TIMEOUT": "60", **env}
    t0 = time.time()
    done = subprocess.run(cmd, cwd=HERE, env=env, capture_output=True, text=True, timeout=timeout)
    return done, time.time() - t0


def logged(run) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def adapters_at(run, step: int) -> dict:
    return load_file(str(run / f"checkpoint-{step:06d}" / "adapters.safetensors"))


def largest_difference(a: dict, b: dict, atol=1e-6) -> float:
    """Two checkpoints' adapters equal to round-off, trained away from the init; their largest difference."""
    assert a.keys() == b.keys()
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    assert diff <= atol, diff
    assert sum(a[k].abs().sum().item() for k in a if k.startswith("routers.")) > 0  # trained, not the init
    return diff


def one_process(args):
    """train.train in this process, on one thread (a second one waits for a busy core on a shared machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train.train(args)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("mode,how", [("measured", ["--no-fast"]), ("ste", ["--no-fast", "--router-bias", "0.02"]),
                                       ("measured", ["--fast", "--no-compile"]),  # ste: gates that move
                                       ("measured", ["--fast", "--no-compile", "--cost", "argmax", "--margin", "1"])])
def test_two_processes_train_what_one_process_trains(tmp_path, mode, how):
    # Dropout 0: each rank draws LoRA dropout masks for its own rows, one process for all of them.
    target = [] if "argmax" in how else ["--skip-target", "0.3"]  # the argmax cost has no price to move
    flags = ["--steps", "6", "--gate-grad", mode, "--flips", "2", *target, "--lora-dropout", "0", *how]
    one, two = tmp_path / "one", tmp_path / "two"
    args = train.parse_args(tiny_run_argv(tmp_path, *flags, "--out", str(one)))
    stream = train.training_batches(args, None, 0)
    assert min(len(next(stream).kinds) for _ in range(12)) == 1  # an epoch's last micro-batch: a rank gets no row
    one_process(args)
    # 2 processes, interrupted after step 3 (train.train(args, stop_at=3)), then resumed: both under torchrun
    done, _ = torchrun(tmp_path, STOP_AT, "3", *tiny_run_argv(tmp_path, *flags, "--out", str(two)))
    assert done.returncode == 0, done.stderr[-3000:]
    assert lr.read_settings(str(two))[1]["step"] == 3
    diff = largest_difference(adapters_at(one, 3), adapters_at(two, 3))
    done, _ = torchrun(tmp_path, "train.py", *tiny_run_argv(tmp_path, *flags, "--out", str(two), "--resume"))
    assert done.returncode == 0, done.stderr[-3000:]
    diff = max(diff, largest_difference(adapters_at(one, 6), adapters_of(two)))
    settings = lr.read_settings(str(two))[1]
    assert settings["step"] == 6 and settings["processes"] == 2 and settings["checkpoint_blocks"] is False
    # rank 0 alone logs, each step once, the metrics summed over both ranks' rows
    for x, y in zip(logged(one), logged(two), strict=True):
        assert x["step"] == y["step"] and x["loss"] == pytest.approx(y["loss"], rel=1e-5)
        assert {k: v for k, v in x.items() if k.startswith(("skip_", "cheap_"))} == \
            pytest.approx({k: v for k, v in y.items() if k.startswith(("skip_", "cheap_"))})
    assert [r["step"] for r in logged(two)] == [1, 2, 3, 4, 5, 6]
    print(f"{mode} {how[0]}: largest adapter difference, 2 processes against 1: {diff:.2e}")


@pytest.mark.parametrize("fault", ["raises", "hangs"])
def test_a_failing_rank_ends_the_whole_run(tmp_path, fault):
    # An exception on rank 1 ends it, and torchrun stops rank 0, waiting in the step's all_reduce. A rank that
    # hangs instead fails rank 0's all_reduce after the timeout, and torchrun then stops the hung one.
    out = tmp_path / "run"
    done, seconds = torchrun(tmp_path, FAULTY, fault, *tiny_run_argv(tmp_path, "--steps", "4", "--no-fast",
                                                                     "--out", str(out)),
                             LAYERROUTE_DIST_TIMEOUT="10")
    assert done.returncode != 0 and seconds < 60, (seconds, done.stderr[-3000:])
    failed = "rank 1 of 2 failed" if fault == "raises" else "rank 0 of 2 failed"
    assert failed in done.stderr, done.stderr[-3000:]
    if fault == "raises":
        assert "a fault injected on rank 1" in done.stderr
    assert [r["step"] for r in logged(out)] == [1]  # the step before the fault, logged once


def test_resume_in_another_process_count_refused_while_dropout_masks_are_per_process(tmp_path):
    for dropout in ("0.05", "0"):
        out, flags = tmp_path / f"run{dropout}", ["--steps", "1", "--flips", "2", "--lora-dropout", dropout]
        one_process(train.parse_args(tiny_run_argv(tmp_path, *flags, "--out", str(out))))
        args = train.parse_args(tiny_run_argv(tmp_path, *flags, "--out", str(out), "--resume"))
        model, _ = train.build(args)
        opt = train.make_optimizer(model, args)
        if dropout == "0":  # the same run to round-off: allowed
            assert train.restore(model, opt, args, processes=2)[0] == 1
        else:
            with pytest.raises(ValueError, match=r"--resume: 2 processes but the run in .* used 1, and the LoRA "
                                                 r"dropout masks are drawn per process"):
                train.restore(model, opt, args, processes=2)


def test_torchrun_refuses_a_batch_that_does_not_share(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ValueError, match="--batch-size 3: not a multiple of the 2 processes"):
        train.join_ranks(train.parse_args(["--batch-size", "3", "--device", "cpu"]))
    monkeypatch.setenv("LAYERROUTE_DIST_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="LAYERROUTE_DIST_TIMEOUT=soon: expected a number of seconds"):
        train.join_ranks(train.parse_args(["--batch-size", "4", "--device", "cpu"]))
    monkeypatch.setenv("WORLD_SIZE", "1")  # torchrun with one process: one process, as without torchrun
    assert train.join_ranks(train.parse_args(["--device", "cpu"])) == train.Ranks(0, 1, 0)


def test_memory_estimate_and_checkpoint_blocks_flag(tmp_path):
    # The frozen backbone is stored in the compute dtype; LoRA and routers stay float32.
    argv = tiny_run_argv(tmp_path, "--dtype", "bfloat16", "--out", str(tmp_path / "run"))
    model, dtype = train.build(train.parse_args(argv))
    assert dtype == torch.bfloat16 and {p.dtype for p in model.base.parameters() if not p.requires_grad} == {dtype}
    assert {p.dtype for p in model.trainable().values()} == {torch.float32}
    # --checkpoint-blocks: off by default, plumbed to the attribute layerroute.py's training pass reads
    args = train.parse_args(["--checkpoint-blocks"])
    assert args.checkpoint_blocks and not train.parse_args([]).checkpoint_blocks
    assert "checkpoint_blocks" in train.RESUME_FREE  # recomputing gives the same values: a resume may switch it
    model = train.wrap(qwen25_on_meta().to(torch.bfloat16), args)
    assert model.checkpoint_blocks is True
    # Qwen2.5-0.5B in bf16: 494,032,768 backbone parameters (the head tied) x 2 bytes, 17,617,944 trained x 16
    line = train.memory_estimate(model, args, torch.bfloat16)
    assert "\n" not in line and "backbone 0.92 GiB (bfloat16 0.92)" in line, line
    assert f"trainable {17_617_944 * 16 / 2 ** 30:.2f} GiB (17,617,944 x 16 bytes" in line, line
    # checkpointed, a block keeps d = 896 values a token of its own, plus one block recomputed
    full = train.memory_estimate(model, train.parse_args([]), torch.bfloat16)
    assert "16 rows x 512 tokens" in line and "checkpointed" in line and "checkpointed" not in full
    gib = {text: float(text.split("activations at most ")[1].split(" GiB")[0]) for text in (line, full)}
    assert gib[line] < gib[full] / 2, gib
    assert "20 bytes" in train.memory_estimate(model, args, torch.bfloat16, processes=2)  # + the all-reduce copy


# ---- end train ----

# ---- eval ----

import eval as ev  # noqa: E402  (as ev: a bare `import eval` would shadow the builtin here)


@pytest.fixture
def one_thread():
    """Tiny models on a shared 2-core machine: a second OpenMP thread waiting for a busy core costs
    milliseconds per op (1000x the op itself). Restored afterwards; results do not depend on it."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_eval_flops_skipped_hand_count():
    """tiny_config: d 64, 4 heads x 16 (q 64), 2 kv heads (kv 32), ff 96, vocab 300; 4 blocks, 2 closed."""
    cfg = qwen.QwenConfig(**{k: v for k, v in tiny_config(layers=4).items()
                             if k in {"hidden_size", "intermediate_size", "num_hidden_layers",
                                      "num_attention_heads", "num_key_value_heads", "vocab_size"}})
    weights = 64 * 64 + 64 * 32 + 64 * 32 + 64 * 64 + 3 * 64 * 96  # q, k, v, o, gate/up/down = 30,720
    block = lambda ctx: 2 * weights + 2 * 2 * 64 * ctx  # noqa: E731  (QK^T and AV over ctx keys)
    head = 2 * 64 * 300
    # Length 3: positions see 1, 2, 3 keys. Full = 4 blocks + head per position; 2 blocks closed.
    blocks3 = block(1) + block(2) + block(3)  # 185,856
    expected = 100 * 2 * blocks3 / (4 * blocks3 + 3 * head)  # 371,712 / 858,624 = 43.29%
    assert ev.flops_skipped_pct(cfg, [1, 0, 1, 0], 3) == pytest.approx(expected, rel=1e-12)
    # Decode phase of a 5-token prompt + 2 new tokens: positions 5 and 6 (6 and 7 keys).
    tail = block(6) + block(7)
    assert ev.flops_skipped_pct(cfg, [0, 0, 0, 1], 7, start=5) == pytest.approx(100 * 3 * tail / (4 * tail + 2 * head))
    # A generation: blocks at 3 positions, the head at the last only (its prefill keeps one row of logits).
    assert ev.flops_skipped_pct(cfg, [1, 0, 1, 0], 3, heads=1) == pytest.approx(100 * 2 * blocks3 / (4 * blocks3 + head))
    assert ev.flops_skipped_pct(cfg, [1, 1, 1, 1], 9) == 0.0
    # Sublayer gates, (attention, MLP) per block: attention is q/k/v/o plus QK^T and AV, the MLP gate/up/down.
    attention = lambda ctx: 2 * (64 * 64 + 64 * 32 + 64 * 32 + 64 * 64) + 2 * 2 * 64 * ctx  # noqa: E731
    mlp = 2 * 3 * 64 * 96
    attn3 = attention(1) + attention(2) + attention(3)
    assert attn3 + 3 * mlp == blocks3
    closed = 2 * attn3 + 3 * mlp  # two attention halves and one MLP closed, each at 3 positions
    assert ev.flops_skipped_pct(cfg, [0, 1, 1, 0, 0, 1, 1, 1], 3) == pytest.approx(
        100 * closed / (4 * blocks3 + 3 * head), rel=1e-12)
    assert ev.flops_skipped_pct(cfg, [0, 0] * 4, 3) == ev.flops_skipped_pct(cfg, [0] * 4, 3)  # both halves: the block
    with pytest.raises(ValueError, match="5 gates: expected 4"):
        ev.flops_skipped_pct(cfg, [1] * 5, 3)


def test_eval_skips_and_perplexities_match_a_direct_computation(tmp_path, one_thread):
    base, model = tiny_routed(tmp_path, dropout=0.0)
    set_routers(model, [5.0, -5.0, 5.0, -5.0])  # blocks 1 and 3 closed for every input
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.05)  # LoRA that changes the output, so base != lora != routed
    model.eval()
    torch.manual_seed(1)
    examples = [(torch.randint(3, 300, (n_p,)).tolist(), torch.randint(3, 300, (n_t,)).tolist(), kind)
                for n_p, n_t, kind in [(5, 4, "tool_call"), (9, 3, "planning"), (4, 6, "tool_call")]]
    recs = ev.teacher_forced(model, examples, batch_size=2)
    assert model.open_gates is False and all(m.enabled for m in model.modules() if isinstance(m, lr.LoRALinear))
    # Independent reference: a plain Qwen2 with LoRA merged by hand (W + s B A), blocks chosen by hand.
    merged = qwen.load_model(str(tmp_path))
    with torch.no_grad():
        for blk, mine in zip(merged.layers, model.base.layers):
            for part, names in lr.LORA_TARGETS["all"]:
                for name in names:
                    lo = getattr(getattr(mine, part), name)
                    getattr(getattr(blk, part), name).weight += lo.scale * lo.lora_B @ lo.lora_A

    def target_logits(net, p, t, blocks):
        ids = torch.tensor([p + t])
        with torch.no_grad():
            h = net.embed_tokens(ids)
            cos, sin = net.rope(0, ids.shape[1], ids.device, h.dtype)
            for i in blocks:
                h = net.layers[i](h, cos, sin)
            return net.lm_head(net.norm(h))[0, len(p) - 1:-1]

    def nll(net, p, t, blocks):
        return torch.nn.functional.cross_entropy(target_logits(net, p, t, blocks), torch.tensor(t), reduction="sum").item()

    def wrong(net, p, t, blocks):
        return int((target_logits(net, p, t, blocks).argmax(-1) != torch.tensor(t)).sum())

    for (p, t, _), r in zip(examples, recs):
        assert r["gates"] == [1.0, 0.0, 1.0, 0.0] and r["prompt_len"] == len(p)
        assert r["nll"]["base"] == pytest.approx(nll(base, p, t, range(4)), rel=1e-4)
        assert r["nll"]["lora"] == pytest.approx(nll(merged, p, t, range(4)), rel=1e-4)
        assert r["nll"]["routed"] == pytest.approx(nll(merged, p, t, [0, 2]), rel=1e-4)
        assert r["wrong"] == {"base": wrong(base, p, t, range(4)), "lora": wrong(merged, p, t, range(4)),
                              "routed": wrong(merged, p, t, [0, 2])}
    tool = ev.type_summary(model.base.cfg, [r for r in recs if r["kind"] == "tool_call"])
    ref_base = sum(nll(base, p, t, range(4)) for p, t, k in examples if k == "tool_call") / 10  # 4 + 6 tokens
    assert tool["ppl_base"] == pytest.approx(float(torch.tensor(ref_base).exp()), rel=1e-4)
    assert tool["blocks_skipped_pct"] == 50.0 and tool["per_layer_skip_pct"] == [0.0, 100.0, 0.0, 100.0]
    assert tool["flops_skipped_pct"] == pytest.approx(
        (ev.flops_skipped_pct(model.base.cfg, [1, 0, 1, 0], 9) + ev.flops_skipped_pct(model.base.cfg, [1, 0, 1, 0], 10)) / 2)
    ref_ratio = math.exp(sum(nll(merged, p, t, [0, 2]) - nll(merged, p, t, range(4))
                             for p, t, k in examples if k == "tool_call") / 10)
    assert tool["ppl_routed_vs_lora"] == pytest.approx(ref_ratio, rel=1e-4)


def test_eval_teacher_forced_exact_is_greedy_decoding_reproducing_the_target(tmp_path, one_thread):
    """wrong == 0 exactly when greedy generation (KV cache, gates decided at prefill) gives the target:
    targets that are each model's own greedy continuation, and the same with one token changed."""
    _, model = tiny_routed(tmp_path, dropout=0.0)
    set_routers(model, [5.0, -5.0, 5.0, -5.0])
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.05)
    model.eval()
    torch.manual_seed(2)
    prompts = [torch.randint(3, 300, (n,)).tolist() for n in (5, 8)]
    for name in ev.MODES:
        with ev.mode(model, name):
            own = [qwen.generate(model, torch.tensor([p]), 6)[0] for p in prompts]
        bent = [t[:3] + [(t[3] + 1) % 300] + t[4:] for t in own]  # the 4th token no longer the argmax
        recs = ev.teacher_forced(model, [(p, t, "tool_call") for p, t in zip(prompts * 2, own + bent)], batch_size=3)
        assert [r["wrong"][name] for r in recs[:2]] == [0, 0]
        assert all(r["wrong"][name] >= 1 for r in recs[2:])
        assert ev.forced_exact(recs)[name] == 0.5


def test_eval_perplexity_ratio_ci_resamples_whole_steps():
    # Every step pays the same nats per token: every resample gives exactly that ratio.
    same = [{"nll": {"lora": 2.0 * n, "routed": 2.1 * n}, "n_target": n} for n in (3, 40, 7)]
    assert ev.ratio_ci(same, 200, 0) == pytest.approx([math.exp(0.1)] * 2)
    # Two steps, 1 token each, ratios e^0 and e^1: a resample is both, or either one twice.
    two = [{"nll": {"lora": 1.0, "routed": 1.0}, "n_target": 1}, {"nll": {"lora": 1.0, "routed": 2.0}, "n_target": 1}]
    assert ev.ratio_ci(two, 2000, 0) == pytest.approx([1.0, math.e])


def test_eval_mcnemar_by_hand():
    assert ev.mcnemar_p(4, 0) == 2 / 2 ** 4 and ev.mcnemar_p(0, 6) == 2 / 2 ** 6
    assert ev.mcnemar_p(5, 3) == 2 * (1 + 8 + 28 + 56) / 2 ** 8  # C(8, k) for k <= 3
    assert ev.mcnemar_p(1, 1) == 1.0 and ev.mcnemar_p(0, 0) == 1.0


def test_eval_differential_and_length_matched_pairs_by_hand():
    # Prompt lengths in bins of 16: tool 10, 12 | 40, 41 | 100; planning 11, 13, 14 | 45 | 300.
    pairs = ev.length_matched_pairs([10, 12, 40, 41, 100], [11, 13, 14, 45, 300], width=16)
    # Bin 0: both tool steps, with planning ranks 0 and 2 of 3 (spread); bin 2: the one planning step
    # with the shorter tool step; bins 6 and 18 have one side only.
    assert pairs == [(0, 0), (1, 2), (2, 3)]
    rec = lambda kind, gates, plen: {"kind": kind, "gates": gates, "scores": [0.5 * g + 0.1 * plen / 100 for g in gates],  # noqa: E731
                                     "prompt_len": plen}
    recs = [rec("tool_call", [1, 0, 0, 0], 10), rec("tool_call", [1, 0, 1, 0], 40),
            rec("planning", [1, 1, 1, 0], 11), rec("planning", [1, 1, 1, 1], 300)]
    out = ev.across_types(recs, n_boot=200, width=16, seed=0)
    assert out["differential"]["points"] == pytest.approx((75 + 50) / 2 - (25 + 0) / 2)  # 50 points
    lo, hi = out["differential"]["ci95"]
    assert 0 < lo <= 50 <= hi <= 75  # every resample: tool in [50, 75], planning in [0, 25]
    # One pair (10 with 11, bin 0); 40 and 300 have no partner.
    assert out["length_matched"]["pairs"] == 1 and out["length_matched"]["points"] == 75 - 25
    assert out["length_matched"]["ci95"] == [50.0, 50.0]
    assert ev.pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0) and ev.pearson([1, 2, 3], [5, 5, 5]) is None


def test_eval_cut_matched_gates_are_the_cut_tool_prompts_own(tmp_path, one_thread):
    _, model = tiny_routed(tmp_path)
    set_routers(model, [0.0] * 4, weight_std=3.0)
    model.eval()
    g = torch.Generator().manual_seed(1)
    tool = [torch.randint(3, 300, (n,), generator=g).tolist() for n in (20, 14)]
    plan = [{"kind": "planning", "prompt_len": n, "gates": [1, 1, 1, 1], "scores": [0.9] * 4} for n in (7, 12, 3, 20)]
    recs = [{"kind": "tool_call", "prompt_len": 20, "gates": [0, 0, 1, 1], "scores": [0.1] * 4}] + plan
    ev.cut_tool_gates(model, recs, tool, batch_size=2, pad_id=0)
    # Planning j is paired with tool prompt j mod 2, cut to its newest prompt_len tokens; routed alone,
    # unpadded, that cut prompt must give the same gates as in the padded batch.
    for j, r in enumerate(plan[:3]):
        with torch.no_grad():
            model(torch.tensor([tool[j % 2][-r["prompt_len"]:]]))
        assert r["cut_gates"] == model.last_gates[0].tolist()
    assert "cut_gates" not in plan[3] and "cut_gates" not in recs[0]  # 20 tokens: not shorter than tool 1 (14)
    out = ev.across_types(recs, n_boot=100, width=16, seed=0)  # the planning step without cut gates is left out
    expect = [100 * (1 - sum(r["cut_gates"]) / 4) for r in plan[:3]]  # planning skips 0
    assert out["cut_matched"]["pairs"] == 3 and out["cut_matched"]["points"] == pytest.approx(sum(expect) / 3)


def test_eval_task_answers_scored_as_specified():
    gold = [{"name": "f", "arguments": {"a": 1, "b": [1, 2]}}, {"name": "g", "arguments": {}}]
    two = '<tool_call>\n{"name": "g", "arguments": {}}\n</tool_call>\n<tool_call>\n{"arguments": {"b": [1, 2], "a": 1}, "name": "f"}\n</tool_call>'
    assert ev.answer_correct("tool_call", two, gold)  # call order and key order do not matter
    assert not ev.answer_correct("tool_call", two.replace("[1, 2]", "[2, 1]"), gold)  # values do
    assert not ev.answer_correct("tool_call", two.split("\n<tool_call>\n{\"arg")[0], gold)  # one call missing
    assert not ev.answer_correct("tool_call", two + "\n<tool_call>\n{\"name\": ", gold)  # cut-off block
    assert ev.answer_correct("tool_call", '<tool_call>{"name": "g", "arguments": "{}"}</tool_call>', gold[1:])
    assert ev.answer_correct("planning", "so 3 + 4 = 7 apples\n#### 1,200", "1200")
    assert ev.answer_correct("planning", "She has 12 then 1,200.5 dollars.", "1200.5")  # last number
    assert not ev.answer_correct("planning", "#### 12\nor 1200", "1200")
    assert ev.answer_correct("planning", "anything", "Newton's second law") is None  # free text: unscored
    assert ev.answer_correct("reply", "hi", None) is None


class IdsText:
    """A tokenizer stand-in for a random model's ids: decode shows them, `stop` is its end-of-turn marker."""

    def __init__(self, stop: int):
        self.stop = stop

    def decode(self, ids, skip_special_tokens=False) -> str:
        return " ".join(map(str, ids))

    def token_to_id(self, token: str) -> int | None:
        return self.stop if token == "<|im_end|>" else None


def test_eval_batched_greedy_answers_are_the_one_at_a_time_ones(tmp_path, one_thread):
    model = mixed_routed(tmp_path)
    prompts = prompts_of(MIXED + (5,), seed=1)
    with ev.mode(model, "lora"):
        stop = qwen.generate(model, prompts[:1], 1)[0][0]  # the tiny model repeats it: prompt 0 ends at once
    tok, items, lengths = IdsText(stop), [(p, "planning", "7") for p in prompts], {}
    for name in ev.MODES:
        with ev.mode(model, name):
            one = ev.greedy_answers(model, tok, items, 6, gen_batch=1)
            assert ev.greedy_answers(model, tok, items, 6, gen_batch=4) == one, name  # batches of 4 and 2
        lengths[name] = [len(t.split()) for t in one[1]]
    assert lengths["lora"][0] == 1 and 6 in lengths["lora"]  # a row that stopped, in a batch that went on
    with ev.mode(model, "routed"):  # the gates returned are each prompt's own prefill decision
        gates = ev.greedy_answers(model, tok, items, 6, gen_batch=4)[2]
        for p, g in zip(prompts, gates):
            model(torch.tensor([p]))
            assert model.last_gates[0].tolist() == g
    assert len({tuple(g) for g in gates}) > 1  # routed apart, so a row's gates cannot stand in for another's
    model.pooling = "reference"  # its gates depend on padding: generated one at a time, whatever gen_batch says
    assert ev.greedy_answers(model, tok, items, 6, gen_batch=4) == ev.greedy_answers(model, tok, items, 6, gen_batch=1)


def test_eval_aggregate_two_reports(tmp_path):
    def report(skip, diff, lm):
        return {"types": {"tool_call": {"n": 10, "blocks_skipped_pct": skip, "per_layer_skip_pct": [skip, 0.0],
                                        "task_accuracy": {"base": 0.5, "lora": None, "n": 10, "lost": 3, "gained": 1}}},
                "differential": {"points": diff, "ci95": [diff - 1, diff + 1]},
                "length_matched": {"points": lm, "ci95": None, "pairs": 0}, "settings": {"n": 99},
                "examples": [{"prompt_len": 5}]}
    for name, r in (("s0", report(10.0, 5.0, None)), ("s1", report(20.0, -1.0, 2.0))):
        (tmp_path / name).mkdir()
        (tmp_path / name / "report.json").write_text(json.dumps(r))
    agg = ev.main(["--runs", str(tmp_path / "s0"), str(tmp_path / "s1")])
    s = agg["stats"]
    assert s["types.tool_call.blocks_skipped_pct"] == {"mean": 15.0, "std": pytest.approx(50 ** 0.5), "n": 2}
    assert s["types.tool_call.per_layer_skip_pct.0"]["mean"] == 15.0
    assert s["differential.ci95.1"]["mean"] == 3.0 and s["length_matched.points"] == {"mean": 2.0, "std": 0.0, "n": 1}
    assert "settings.n" not in s and "examples.0.prompt_len" not in s and "types.tool_call.task_accuracy.lora" not in s
    assert agg["differential_positive"] == 1 and agg["length_matched_positive"] == 1
    assert agg["answers_pooled"]["tool_call"] == {"runs": 2, "n": 20, "lost": 6, "gained": 2,
                                                  "mcnemar_p": ev.mcnemar_p(6, 2)}
    assert json.loads((tmp_path / "aggregate.json").read_text())["runs"] == 2
    with pytest.raises(FileNotFoundError, match="eval.py --run .*s2"):
        ev.main(["--runs", str(tmp_path / "s0"), str(tmp_path / "s2")])


def test_eval_cli_end_to_end(tmp_path, capsys, one_thread):
    """Train 2 steps on the train section's tiny model and data, then the whole eval: report, table, plots."""
    train.train(train_args(tmp_path, "--steps", "2", "--out", str(tmp_path / "run")))
    rep = ev.main(["--run", str(tmp_path / "run"), "--split", "all", "--n", "6", "--gen-n", "2",
                   "--max-new-tokens", "6", "--latency-n", "1", "--latency-tokens", "3",
                   "--latency-repeats", "1", "--bootstrap", "50"])
    assert json.loads((tmp_path / "run" / "report.json").read_text())["types"].keys() == rep["types"].keys()
    assert {"tool_call", "planning"} <= rep["types"].keys()
    for t in rep["types"].values():
        assert 0 < t["n"] <= 6 and len(t["per_layer_skip_pct"]) == 2
        assert 0 <= t["blocks_skipped_pct"] <= 100 and t["ppl_base"] > 1
    acc = rep["types"]["tool_call"]["task_accuracy"]
    assert acc["n"] == 2 and all(0 <= acc[m] <= 1 for m in ("base", "lora", "routed"))
    assert acc["lost"] - acc["gained"] == round(2 * (acc["lora"] - acc["routed"])) and acc["lost"] + acc["gained"] <= 2
    assert rep["latency"]["planning"]["ms_per_token_full"] > 0 and rep["differential"]["ci95"] is not None
    assert (tmp_path / "run" / "report_per_layer.png").exists() and (tmp_path / "run" / "report_gate_vs_length.png").exists()
    printed = capsys.readouterr().out
    assert "skip differential" in printed and "tool_call: routed / LoRA-only perplexity x" in printed
    # The figures say which run and threshold they show; skip rates on a 0-100% axis, whatever the data.
    rep["settings"]["threshold"] = 0.3
    figs = ev.figures(rep, [{"kind": k, "prompt_len": 5, "scores": [0.2, 0.9]} for k in rep["types"]])
    bars, scatter = (f.axes[0] for f in figs.values())
    assert bars.get_ylim() == (0, 100) and scatter.get_ylim() == (0, 1)
    assert bars.get_title().startswith("run (all split): ") and "threshold 0.3" in bars.get_title()
    assert scatter.get_title().startswith("run (all split): ")
    assert "gate threshold 0.3" in [t.get_text() for t in scatter.get_legend().get_texts()]
# ---- end eval ----

def test_export_cli_writes_a_peft_adapter_of_a_run(tmp_path, capsys):
    train.train(train_args(tmp_path, "--steps", "1", "--out", str(tmp_path / "run")))
    lr.main(["export", "--run", str(tmp_path / "run"), "--peft", str(tmp_path / "peft"), "--merged",
             str(tmp_path / "merged")])
    assert lr.load_merged(str(tmp_path / "merged")).pooling == "prompt"
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["peft_type"]) == (32, 64.0, "LORA")
    assert config["base_model_name_or_path"] == str(tmp_path / "model")
    assert "LoRA only" in capsys.readouterr().out


@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_train_and_eval_run_on_each_family(tmp_path, family, one_thread):
    family_checkpoint(tmp_path / "model", family, tie=False)
    write_tiny_tokenizer(tmp_path / "model")
    write_tiny_data(tmp_path / "data")
    train.train(train_args(tmp_path, "--steps", "2", "--out", str(tmp_path / "run")))  # train_args keeps this model
    assert qwen.QwenConfig.from_json(str(tmp_path / "model" / "config.json")).qk_norm == (family == "qwen3")
    rep = ev.main(["--run", str(tmp_path / "run"), "--split", "all", "--n", "4", "--gen-n", "1",
                   "--max-new-tokens", "4", "--latency-n", "0", "--bootstrap", "10", "--kinds", "tool_call,planning",
                   "--no-base"])
    assert rep["types"].keys() == {"tool_call", "planning"}  # --kinds: the reply steps left out
    tool = rep["types"]["tool_call"]  # --no-base: LoRA-only and routed alone
    assert tool["ppl_base"] is None and "base" not in tool["forced_exact"] and "base" not in tool["task_accuracy"]
    assert all(t["ppl_routed"] > 1 and len(t["per_layer_skip_pct"]) == 2 for t in rep["types"].values())


def test_train_and_eval_with_sublayer_gates(tmp_path, one_thread):
    run = str(tmp_path / "run")
    train.train(train_args(tmp_path, "--steps", "2", "--gate-unit", "sublayer", "--out", run))
    settings = lr.read_settings(run)[1]
    assert settings["gate_unit"] == settings["lora"]["gate_unit"] == "sublayer"
    model = lr.load_run(run)[0]
    assert len(model.routers) == 4 and [u.attends for u in model.units] == [True, False, True, False]
    rep = ev.main(["--run", run, "--split", "all", "--n", "4", "--gen-n", "1", "--max-new-tokens", "4",
                   "--latency-n", "0", "--bootstrap", "10", "--kinds", "tool_call,planning", "--no-base"])
    assert all(len(t["per_layer_skip_pct"]) == 4 for t in rep["types"].values())  # 2 blocks, 2 halves each
    assert rep["settings"]["run"]["gate_unit"] == "sublayer"
    # refused naming the flag, and --flips, whose default follows the routers' count (4 halves, 2 blocks)
    with pytest.raises(ValueError, match="--flips 2 but the run in .* used 4; --gate-unit block but the run in .* "
                                         "used sublayer"):
        train.train(train_args(tmp_path, "--steps", "2", "--out", run, "--resume"))


def test_eval_checks_its_output_before_the_work_and_prints_before_writing(tmp_path, capsys, monkeypatch, one_thread):
    train.train(train_args(tmp_path, "--steps", "1", "--out", str(tmp_path / "run")))
    argv = ["--run", str(tmp_path / "run"), "--split", "all", "--n", "2", "--gen-n", "0", "--latency-n", "0",
            "--bootstrap", "10"]
    monkeypatch.setattr(lr, "load_run", lambda *a, **k: pytest.fail("the work began"))
    with pytest.raises(OSError, match="nowhere: no such folder"):
        ev.main(argv + ["--out", str(tmp_path / "nowhere" / "report.json")])
    if os.path.isdir("/proc/self"):  # a folder nobody can write, not even root
        with pytest.raises(OSError, match="cannot write there"):
            ev.main(argv + ["--out", "/proc/self/report.json"])
    monkeypatch.undo()

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(lr, "write_json", disk_full)
    with pytest.raises(OSError, match="No space"):
        ev.main(argv)
    assert "skip differential" in capsys.readouterr().out  # the table came first: nothing computed is lost
    with pytest.raises(SystemExit):
        ev.parse_args(["--run", "x", "--n", "-1"])
    assert "--n: must be >= 1" in capsys.readouterr().err


def test_cli_errors_are_one_line_naming_the_input(tmp_path):
    import subprocess
    import sys
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "run.json").write_text("{not json")
    env = {**os.environ, "LAYERROUTE_DEBUG": ""}
    done = subprocess.run([sys.executable, "eval.py", "--run", str(tmp_path / "run")], capture_output=True,
                          text=True, cwd=os.path.dirname(os.path.abspath(__file__)), env=env)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(f"eval.py: error: {tmp_path / 'run' / 'run.json'}: "
                                                          "not valid JSON (line 1, column 2")



# ---- chat ----

import chat  # noqa: E402

TIME_TOOLS = [{"type": "function", "function": {"name": "get_time", "parameters": {}}}]
ASK = [{"role": "user", "content": "Time in Oslo?"}]
CALL = {"role": "assistant", "content": None, "tool_calls": [
    {"id": "call_0", "type": "function", "function": {"name": "get_time", "arguments": "{\"city\": \"Oslo\"}"}}]}
ANSWERED = ASK + [CALL, {"role": "tool", "tool_call_id": "call_0", "content": "10:00"}]
CALL_TEXT = '<tool_call>\n{"name": "get_time", "arguments": {"city": "Oslo"}}\n</tool_call>'
REPLY_TEXT = "It is 10:00 in Oslo."


def memorise(model, tok, examples: list[tuple[list[dict], str]], steps: int = 400):
    """Train every weight but the routers until greedy decoding gives each conversation's turn exactly:
    a tiny model that really calls a tool, routed as it will be served."""
    for p in model.base.parameters():
        p.requires_grad_(True)
    opt = torch.optim.Adam([p for n, p in model.named_parameters() if not n.startswith("routers.")], lr=3e-3)
    rows = [(tok.encode(data.render(m, TIME_TOOLS, True), add_special_tokens=False).ids,
             tok.encode(t + "<|im_end|>", add_special_tokens=False).ids) for m, t in examples]
    model.train()
    for _ in range(steps):
        loss = sum(torch.nn.functional.cross_entropy(model(torch.tensor([p + t]))[0, len(p) - 1:-1], torch.tensor(t))
                   for p, t in rows)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < 0.02:
            break
    model.eval()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A tiny routed model that calls get_time and answers from its result (block 1 of 4 closed), exported
    merged (the folder chat.py serves), and a server on a free port of 127.0.0.1 in this process."""
    import threading
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("chat")
    write_checkpoint(root / "model", layers=4, max_position_embeddings=1024)
    tok = write_tiny_tokenizer(root / "model")
    tok.add_tokens([data.DEFAULT_SYSTEM, data.TOOLS_HEAD, data.TOOLS_TAIL])  # shorter rows, quicker to learn
    tok.save(str(root / "model" / "tokenizer.json"))
    model = lr.LayerRoute(qwen.load_model(str(root / "model")), rank=4, alpha=8.0, dropout=0.0)
    set_routers(model, [5.0, -5.0, 5.0, 5.0])
    torch.manual_seed(0)
    memorise(model, tok, [(ASK, CALL_TEXT), (ANSWERED, REPLY_TEXT)])
    lr.export_merged(model, str(root / "model"), str(root / "merged"))
    model, tok = chat.load(str(root / "merged"))
    server = chat.Server(("127.0.0.1", 0), model, tok, "tiny", max_tokens=64, max_body=64 << 10, quiet=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield {"root": root, "model": model, "tok": tok, "url": f"http://127.0.0.1:{server.server_address[1]}/v1"}
    server.shutdown()
    server.server_close()
    torch.set_num_threads(n)


def client(served):
    import openai
    return openai.OpenAI(base_url=served["url"], api_key="unused", max_retries=0, timeout=60)


def test_chat_complete_calls_the_tool_then_answers_from_its_result(served):
    model, tok = served["model"], served["tok"]
    call = chat.complete(model, tok, ASK, TIME_TOOLS, max_tokens=60)
    assert (call.content, call.tool_calls, call.finish_reason) == (None, [{"name": "get_time", "arguments": {"city": "Oslo"}}],
                                                                    "tool_calls")
    assert call.routing["skipped"] == [1] and call.routing["blocks"] == 4 and call.routing["blocks_skipped_pct"] == 25.0
    assert 0 < call.routing["flops_skipped_pct"] < 25.0  # the LM head is never skipped
    assert call.prompt_tokens == len(tok.encode(data.render(ASK, TIME_TOOLS, True), add_special_tokens=False).ids)
    reply = chat.complete(model, tok, ANSWERED, TIME_TOOLS, max_tokens=60)
    assert (reply.content, reply.tool_calls, reply.finish_reason) == (REPLY_TEXT, [], "stop")
    assert reply.completion_tokens == len(REPLY_TEXT) + 1  # a byte a token, and <|im_end|>
    pieces = list(chat.stream(model, tok, ANSWERED, TIME_TOOLS, max_tokens=60))
    assert "".join(pieces[:-1]) == REPLY_TEXT and len(pieces) > 3  # it streams, and the pieces add up
    assert chat.complete(model, tok, ANSWERED, TIME_TOOLS, max_tokens=5).finish_reason == "length"
    stopped = chat.complete(model, tok, ANSWERED, TIME_TOOLS, max_tokens=60, stop=(" in",))
    assert (stopped.content, stopped.finish_reason) == ("It is 10:00", "stop")
    as_text = chat.complete(model, tok, ASK, TIME_TOOLS, max_tokens=60, parse_tools=False)
    assert as_text.content == CALL_TEXT and as_text.tool_calls == []
    with chat.every_block(model):
        assert chat.complete(model, tok, ASK, TIME_TOOLS, max_tokens=8).routing["skipped"] == []
    with pytest.raises(ValueError, match="exceed the model's context of 1024 tokens"):
        chat.complete(model, tok, ASK, TIME_TOOLS, max_tokens=1000)


def test_chat_held_back_text_never_streams_a_stop_or_a_call():
    assert chat.held_from("It is 10", ("<tool_call>",)) == 8
    assert chat.held_from("Sure <tool_", ("<tool_call>",)) == 4  # and the space before it
    assert chat.held_from("Sure.\n", ("<tool_call>",)) == 5
    assert chat.held_from("caf\ufffd", ("END",)) == 3
    assert chat.held_from("ab EN", ("END",)) == 2


def test_chat_cli_from_a_merged_export_a_run_and_a_bare_checkpoint(served, tmp_path, capsys, monkeypatch):
    import io
    root = served["root"]
    (tmp_path / "ask.json").write_text(json.dumps({"messages": ASK, "tools": TIME_TOOLS}))
    chat.main(["--run", str(root / "merged"), str(tmp_path / "ask.json"), "--max-tokens", "60"])
    out, err = capsys.readouterr()
    assert json.loads(out) == {"content": None, "tool_calls": [{"name": "get_time", "arguments": {"city": "Oslo"}}],
                               "finish_reason": "tool_calls"}
    assert "skipped 1 of 4 blocks (1) at threshold 0.5" in err and "ms/token with every block on" in err
    monkeypatch.setattr("sys.stdin", io.StringIO(json.dumps(ANSWERED)))  # a bare list, tools left out
    chat.main(["--run", str(root / "merged"), "--max-tokens", "3", "--threshold", "0.0"])
    out, err = capsys.readouterr()
    assert json.loads(out)["finish_reason"] == "length" and "skipped 0 of 4 blocks (none) at threshold 0" in err
    chat.main(["--model", str(root / "model"), str(tmp_path / "ask.json"), "--max-tokens", "3"])
    assert "every block runs (no routers)" in capsys.readouterr().err
    train.train(train_args(tmp_path, "--steps", "1", "--out", str(tmp_path / "run")))  # its context: 512
    (tmp_path / "hi.json").write_text(json.dumps([{"role": "user", "content": "hi"}]))
    chat.main(["--run", str(tmp_path / "run"), str(tmp_path / "hi.json"), "--max-tokens", "3"])
    assert json.loads(capsys.readouterr().out)["finish_reason"] in ("length", "stop")
    with pytest.raises(ValueError, match="the prompt's 514 tokens exceed the model's context of 512"):
        chat.main(["--run", str(tmp_path / "run"), str(tmp_path / "ask.json"), "--max-tokens", "3"])
    (tmp_path / "bad.json").write_text("{\"messages\": [")
    with pytest.raises(ValueError, match="bad.json: not JSON"):
        chat.main(["--run", str(root / "merged"), str(tmp_path / "bad.json")])
    (tmp_path / "bad.json").write_text(json.dumps({"messages": [{"role": "robot", "content": "x"}]}))
    with pytest.raises(ValueError, match="unknown message role"):
        chat.main(["--run", str(root / "merged"), str(tmp_path / "bad.json")])


def test_endpoint_tool_call_round_trip_with_the_openai_client(served):
    c = client(served)
    assert [m.id for m in c.models.list().data] == ["tiny"]
    first = c.chat.completions.create(model="tiny", messages=ASK, tools=TIME_TOOLS, temperature=0)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (called,) = choice.message.tool_calls
    assert called.function.name == "get_time" and json.loads(called.function.arguments) == {"city": "Oslo"}
    assert first.usage.total_tokens == first.usage.prompt_tokens + first.usage.completion_tokens
    assert first.routing["skipped"] == [1] and first.routing["flops_skipped_pct"] > 0
    # the client sends back its own assistant message, then the tool's result
    follow = ASK + [choice.message.model_dump(exclude_none=True),
                    {"role": "tool", "tool_call_id": called.id, "content": "10:00"}]
    second = c.chat.completions.create(model="tiny", messages=follow, tools=TIME_TOOLS, temperature=0)
    assert (second.choices[0].message.content, second.choices[0].finish_reason) == (REPLY_TEXT, "stop")
    assert second.choices[0].message.tool_calls is None


def test_endpoint_streams_text_and_calls(served):
    c = client(served)
    chunks = list(c.chat.completions.create(model="tiny", messages=ANSWERED, tools=TIME_TOOLS, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == REPLY_TEXT and sum(bool(ch.choices and ch.choices[0].delta.content) for ch in chunks) > 3
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason] == ["stop"]
    assert chunks[-1].usage.completion_tokens == len(REPLY_TEXT) + 1 and not chunks[-1].choices
    calls = [tc for ch in c.chat.completions.create(model="tiny", messages=ASK, tools=TIME_TOOLS, temperature=0,
                                                    stream=True) if ch.choices
             for tc in ch.choices[0].delta.tool_calls or []]
    assert [(tc.function.name, json.loads(tc.function.arguments)) for tc in calls] == [("get_time", {"city": "Oslo"})]


def test_endpoint_answers_bad_requests_with_json_errors_and_keeps_serving(served):
    import http.client
    import openai
    c = client(served)
    for kwargs, kind, says in [
            ({"model": "nope"}, openai.NotFoundError, "'nope' does not exist"),
            ({"messages": []}, openai.BadRequestError, "'messages' must be a non-empty list"),
            ({"max_tokens": 5000}, openai.BadRequestError, "exceed the model's context of 1024"),
            ({"temperature": "hot"}, openai.BadRequestError, "'temperature' must be a number from 0 to 2"),
            ({"messages": [{"role": "robot", "content": "x"}]}, openai.BadRequestError, "unknown message role"),
            ({"n": 2}, openai.BadRequestError, "'n' is not supported"),
            ({"tool_choice": "required"}, openai.BadRequestError, "tool_choice")]:
        with pytest.raises(kind, match=says):
            c.chat.completions.create(**{"model": "tiny", "messages": ASK, **kwargs})
    host, port = served["url"].split("//")[1].split("/")[0].split(":")

    def raw(method, path, body=b"", headers=None):
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        conn.request(method, path, body, headers or {})
        resp = conn.getresponse()
        out = resp.status, json.loads(resp.read())["error"]["message"]
        conn.close()
        return out

    assert raw("POST", "/v1/chat/completions", b"{\"model\": ")[0] == 400
    assert raw("POST", "/v1/chat/completions", b"[1, 2]") == (400, "the body must be a JSON object")
    status, says = raw("POST", "/v1/chat/completions", b"x" * (65 << 10))
    assert status == 413 and "over this server's limit of 65,536" in says
    assert raw("GET", "/v1/nothing")[0] == 404 and raw("POST", "/v1/completions", b"{}")[0] == 404
    long = [{"role": "user", "content": "x" * 720}]  # leaves under the server's default 64 tokens
    fits = c.chat.completions.create(model="tiny", messages=long, tools=TIME_TOOLS, temperature=0)
    assert fits.usage.total_tokens <= 1024 and fits.usage.completion_tokens < 64  # no max_tokens: what fits
    ok = c.chat.completions.create(model="tiny", messages=ANSWERED, tools=TIME_TOOLS, temperature=0)
    assert ok.choices[0].message.content == REPLY_TEXT


def test_endpoint_16_concurrent_clients_each_get_their_own_answer(served):
    from concurrent.futures import ThreadPoolExecutor
    asks = [[{"role": "user", "content": f"Time in city {i}?"}] for i in range(16)]
    want = [chat.complete(served["model"], served["tok"], a, TIME_TOOLS, max_tokens=4 + i) for i, a in enumerate(asks)]

    def ask(i):
        r = client(served).chat.completions.create(model="tiny", messages=asks[i], tools=TIME_TOOLS, temperature=0,
                                                   max_tokens=4 + i)
        return r.choices[0].message.content, r.usage.prompt_tokens, r.usage.completion_tokens

    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(ask, range(16)))
    assert got == [(w.content, w.prompt_tokens, w.completion_tokens) for w in want]
    assert len({g[2] for g in got}) > 8  # replies of many lengths: a mix-up would show


def test_endpoint_process_stops_cleanly_on_sigterm(served):
    import subprocess
    import sys
    import openai
    proc = subprocess.Popen([sys.executable, "chat.py", "--run", str(served["root"] / "merged"), "--serve",
                             "--port", "0", "--name", "tiny"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=os.path.dirname(os.path.abspath(__file__)),
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        line = proc.stdout.readline()
        assert line.startswith("serving tiny at http://127.0.0.1:"), line + proc.stderr.read()
        url = line.split(" at ")[1].split()[0]
        c = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=60)
        assert c.chat.completions.create(model="tiny", messages=ANSWERED, tools=TIME_TOOLS,
                                         temperature=0).choices[0].message.content == REPLY_TEXT
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=30)
    finally:
        proc.kill()
    err = proc.stderr.read()
    assert rc == 0 and "Traceback" not in err and err.strip().endswith("stopped"), err


def test_readme_python_example_runs_as_written(served, capsys):
    (code,) = re.findall(r"```python\n(.*?)```", (Path(__file__).parent / "README.md").read_text(), re.S)
    assert code.count('"runs/layerroute"') == 1
    exec(compile(code.replace('"runs/layerroute"', repr(str(served["root"] / "merged"))), "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert out.count("<|im_start|>") == 3 and "get_weather" in out and "tensor([[1., 0., 1., 1.]])" in out
    assert re.search(r"\n\[1\] \d+\.\d% of the FLOPs skipped\n", out)


def bench_script(name: str):
    """A script under bench/ imported as a module (bench/ is no package)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(f"bench_{name}", Path(__file__).parent / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_threshold_saves_a_sweep_and_plots_answers_against_flops(tmp_path, capsys, one_thread):
    bench = bench_script("threshold")
    train.train(train_args(tmp_path, "--steps", "1", "--out", str(tmp_path / "run")))
    rows = bench.main(["--runs", str(tmp_path / "run"), "--split", "val", "--n", "3", "--thresholds", "0.5,0.0",
                       "--max-new-tokens", "3", "--generate", "--label", "ours", "--out", str(tmp_path / "ours.json")])
    assert [r["threshold"] for r in rows] == [0.5, 0.0] and rows[1]["tool_call"] == 0.0 == rows[1]["tool_call_flops"]
    assert rows[1]["broke"] == rows[1]["fixed"] == 0 == rows[1]["greedy_broke"]  # every gate open: LoRA-only itself
    assert rows[0]["greedy_lora_right"] <= rows[0]["calls"] and rows[0]["right"] <= rows[0]["calls"]
    # Gates pooled over the prompt alone: generation decides what teacher forcing does, at the same FLOPs.
    assert all(r["greedy_tool_call_flops"] == pytest.approx(r["tool_call_flops"]) for r in rows)
    assert [p["exact"] for p in bench.pooled(rows, greedy=True)] == [r["greedy_right"] / r["calls"] for r in rows]
    saved = json.loads((tmp_path / "ours.json").read_text())
    assert saved["label"] == "ours" and saved["rows"] == rows
    (tmp_path / "other.json").write_text(json.dumps({**saved, "label": "other", "runs": ["a", "b"],
                                                     "rows": rows + [{**r, "run": "b"} for r in rows]}))
    (point,) = [p for p in bench.pooled(json.loads((tmp_path / "other.json").read_text())["rows"]) if p["threshold"] == 0.5]
    assert point["calls"] == 2 * rows[0]["calls"] and point["exact"] == rows[0]["right"] / rows[0]["calls"]
    (tmp_path / "more.json").write_text(json.dumps({**saved, "runs": ["c"], "rows": [{**r, "run": "c"} for r in rows]}))
    joined = bench.by_label([str(tmp_path / n) for n in ("ours.json", "other.json", "more.json")])
    assert joined["ours"]["runs"] == [str(tmp_path / "run"), "c"] and len(joined["ours"]["rows"]) == 2 * len(rows)
    (tmp_path / "later.json").write_text(json.dumps({**saved, "rows": [{**r, "threshold": 0.7} for r in rows[:1]]}))
    later = bench.by_label([str(tmp_path / "ours.json"), str(tmp_path / "later.json")])["ours"]
    assert later["runs"] == [str(tmp_path / "run")] and len(later["rows"]) == len(rows) + 1  # one run, swept twice
    for seed, rights in enumerate([[True, False], [True, True, False]]):  # LoRA alone's records, two seeds
        (tmp_path / f"alone{seed}.json").write_text(json.dumps({"exact_match": {"right": {
            f"call{i}": {"lora_only": r} for i, r in enumerate(rights)}}}))
    alone = [str(tmp_path / "alone0.json"), str(tmp_path / "alone1.json")]
    assert bench.alone_exact(alone) == (3 / 5, 5)  # pooled by call, not averaged by seed (which gives 7/12)
    bench.main(["--plot", str(tmp_path / "curves.png"), str(tmp_path / "ours.json"), str(tmp_path / "other.json"),
                str(tmp_path / "more.json"), "--alone", *alone])
    assert (tmp_path / "curves.png").stat().st_size > 10_000 and "wrote" in capsys.readouterr().out


def test_bench_answers_trains_evaluates_sweeps_and_carries_on_where_it_stopped(tmp_path, capsys, one_thread):
    bench = bench_script("answers")
    train_args(tmp_path)  # the tiny model and data
    argv = ["--model", str(tmp_path / "model"), "--data-dir", str(tmp_path / "data"), "--recipes", "defaults,router-only",
            "--seeds", "0", "--budget", f"--steps 2 --max-len {TINY_LEN} --batch-size 2 --warmup 1 --save-every 1",
            "--eval", "--n 4 --gen-n 1 --max-new-tokens 3 --latency-n 0 --kinds tool_call,planning --no-base --bootstrap 10",
            "--thresholds", "0.5,0.0", "--split", "val", "--out", str(tmp_path / "answers"), "--plot", str(tmp_path / "curves.png")]
    rows = bench.main(argv)
    assert [r["recipe"] for r in rows] == ["defaults", "router-only"] and all(r["seeds"] == 1 for r in rows)
    assert all(r["broke"] + r["fixed"] <= r["calls"] and len(r["differential"]) == 1 for r in rows)
    report = json.loads((tmp_path / "answers" / "router-only-s0" / "report.json").read_text())
    assert report["settings"]["run"]["router_only"] == 0.25 and (tmp_path / "curves.png").stat().st_size > 10_000
    first = capsys.readouterr().out
    assert first.count("trained in") == 2 and first.count("evaluated in") == 2 and "net %" in first
    # The yardstick: LoRA trained alone, its calls scored on the eval's steps, as eval.py scores LoRA-only
    alone = json.loads((tmp_path / "answers" / "lora-alone-s0" / "fixed_gates.json").read_text())["exact_match"]
    assert first.count("trained and scored in") == 1 and set(alone["right"]) == {g["id"] for g in report["generations"]["tool_call"]}
    ev.main(["--run", str(tmp_path / "answers" / "lora-alone-s0"), "--split", "val", "--n", "4", "--gen-n", "1",
             "--max-new-tokens", "3", "--latency-n", "0", "--kinds", "tool_call", "--no-base", "--bootstrap", "10",
             "--out", str(tmp_path / "alone.json")])
    assert json.loads((tmp_path / "alone.json").read_text())["types"]["tool_call"]["task_accuracy"]["lora"] == alone["lora_only"]
    for r in rows:  # call by call: routed right minus LoRA-alone right is fixed minus broke
        assert r["calls"] * (r["exact_routed"] - r["exact_alone"]) == pytest.approx(r["fixed_vs_alone"] - r["broke_vs_alone"])
    assert bench.main(argv) == rows  # the second time, everything is there: nothing trains or evaluates again
    again = capsys.readouterr().out
    assert "trained in" not in again and "evaluated in" not in again and "scored in" not in again
    # A seed added later is trained and swept on its own, and joins its recipe's curve; seed 0 is not swept again
    swept = tmp_path / "answers" / "threshold-defaults-s0.json"
    before = swept.stat().st_mtime_ns
    seeds = argv.index("--seeds") + 1
    more = bench.main([*argv[:seeds], "0,1", *argv[seeds + 1:]])
    assert [r["seeds"] for r in more] == [2, 2] and swept.stat().st_mtime_ns == before
    assert capsys.readouterr().out.count("trained in") == 2
    added = json.loads((tmp_path / "answers" / "threshold-defaults-s1.json").read_text())
    assert added["label"] == "defaults" and added["runs"] == [str(tmp_path / "answers" / "defaults-s1")]


def test_endpoint_a_failure_mid_stream_ends_that_stream_with_an_error_event(served, monkeypatch):
    import openai
    decode = qwen.decode

    def failing(*args, **kwargs):
        for i, t in enumerate(decode(*args, **kwargs)):
            if i == 3:
                raise RuntimeError("device lost")
            yield t

    monkeypatch.setattr(qwen, "decode", failing)
    c = client(served)
    with pytest.raises(openai.APIError, match="RuntimeError: device lost"):
        list(c.chat.completions.create(model="tiny", messages=ANSWERED, tools=TIME_TOOLS, temperature=0, stream=True))
    with pytest.raises(openai.InternalServerError, match="device lost"):
        c.chat.completions.create(model="tiny", messages=ANSWERED, tools=TIME_TOOLS, temperature=0)
    monkeypatch.undo()
    ok = c.chat.completions.create(model="tiny", messages=ANSWERED, tools=TIME_TOOLS, temperature=0)
    assert ok.choices[0].message.content == REPLY_TEXT


def test_bench_ceiling_closes_the_most_blocks_that_keep_the_answer(tmp_path, one_thread):
    bench = bench_script("block_cost")
    write_checkpoint(tmp_path, layers=6)
    model = qwen.load_model(str(tmp_path)).eval()
    # Blocks 0 and 2 add nothing to the stream, the others less than they did: several can close, and
    # which depends on those closed before (a search that measured a block without them would add 4).
    with torch.no_grad():
        for i, scale in {0: 0.0, 1: 0.3, 2: 0.0, 3: 0.5, 4: 0.5, 5: 0.7}.items():
            for proj in (model.layers[i].self_attn.o_proj, model.layers[i].mlp.down_proj):
                proj.weight.mul_(scale)
                if proj.bias is not None:
                    proj.bias.mul_(scale)
        prompt, target = list(range(3, 40)), []
        for _ in range(6):  # the model's own greedy continuation: right with every block on
            target.append(model(torch.tensor([prompt + target]))[0, -1].argmax().item())
        logits = model(torch.tensor([prompt + target]))[0, len(prompt) - 1:-1]
    want = logits[range(6), target] - logits.scatter(1, torch.tensor(target)[:, None], -math.inf).max(1).values
    full = bench.skipping(model, prompt, target, set())
    assert torch.allclose(bench.margins(model, full, target), want, atol=1e-4) and (want > 0).all()
    # Every set of blocks, each a full pass with no reuse: the largest that keeps the answer right.
    right = [set(s) for k in range(7) for s in itertools.combinations(range(6), k)
             if bench.answers(model, [(prompt, target)], set(s))[0][1]]
    assert max(right, key=len) == {0, 1, 2} and max(map(len, right)) == 3 and {0, 1, 2, 4} not in right
    assert bench.most_closed(model, prompt, target) == (True, [0, 1, 2])
    assert {0, 2, 4} in right and {3, 4, 5} not in right
    assert bench.most_closed(model, prompt, target, start=[4]) == (True, [0, 2, 4])  # grown from a start that keeps it
    assert bench.most_closed(model, prompt, target, start=[3, 4, 5]) == (True, [0, 1, 2])  # one that breaks it: from none
    wrong = target[:-1] + [(target[-1] + 1) % 300]
    assert bench.most_closed(model, prompt, wrong) == (False, [])


def test_bench_ceiling_reads_the_routers_blocks_and_adds_them_on_the_calls_wrong_anyway(tmp_path, capsys):
    bench = bench_script("block_cost")
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"examples": [{"id": "a", "gates": [1.0, 0.0, 0.0]}, {"id": "b", "gates": [1.0] * 3}]}))
    assert bench.routers_closed(str(report)) == {"a": [1, 2], "b": []}
    report.write_text(json.dumps({"types": {}}))
    with pytest.raises(SystemExit, match=re.escape(str(report)) + ": not an eval.py report"):
        bench.routers_closed(str(report))
    calls = [{"right": True, "closed": [0, 1], "flops_pct": 20.0, "start": [1], "start_flops_pct": 10.0},
             {"right": False, "closed": [], "flops_pct": 0.0, "start": [1, 2], "start_flops_pct": 18.0}]
    bench.summarize(calls)
    out = capsys.readouterr().out
    assert "1 of 2 tool calls right" in out and "15% of their FLOPs or more and stay right: 1 of 1" in out
    assert "on the other 1: 19.0% of tool-call FLOPs, none broken; the start blocks on every call: 14.0%" in out


def test_bench_ceiling_router_routes_as_the_model_does(tmp_path, one_thread):
    bench = bench_script("ceiling_router")
    _, model = tiny_routed(tmp_path)
    model.eval()
    set_routers(model, [0.0] * 4, weight_std=8.0)
    seen = set()
    for seed in range(6):
        g = torch.Generator().manual_seed(seed)
        prompt, target = torch.randint(3, 300, (20,), generator=g).tolist(), []
        for _ in range(4):  # the routed model's greedy continuation, its last token then made wrong
            with torch.no_grad():
                target.append(model(torch.tensor([prompt + target]), torch.tensor([len(prompt)]))[0, -1].argmax().item())
        target[-1] = (target[-1] + 1) % 300
        for t, right in ((target[:3], True), (target, False)):
            with torch.no_grad():
                model(torch.tensor([prompt + t]), torch.tensor([len(prompt)]))
            want = [i for i, g in enumerate(model.last_gates[0].tolist()) if g == 0]
            assert bench.routed(model.base, model.routers, prompt, t, 0.5) == (want, right)
            seen.add(tuple(want))
        # the features are what each router reads on the stream that skips the blocks the routers closed
        x = bench.features(model.base, prompt, target, want)
        for i, r in enumerate(model.routers):
            assert torch.allclose(torch.sigmoid(r(x[i]))[0], model.last_scores[0, i], atol=1e-5)
    assert len(seen) > 2  # the routers choose blocks per prompt
    # reading the prompt's last token instead: block 0 reads the embedding there
    ids = torch.tensor([prompt + target])
    with torch.no_grad():
        want = torch.nn.functional.normalize(model.base.layers[0].input_layernorm(model.base.embed_tokens(ids))[0, 19], dim=-1)
    assert torch.allclose(bench.features(model.base, prompt, target, [], "last")[0], want, atol=1e-6)


def test_bench_ceiling_router_fits_what_tells_prompts_apart(tmp_path):
    bench = bench_script("ceiling_router")
    torch.manual_seed(0)
    # Unit vectors that share most of their direction; the label is in a small part of one coordinate.
    x = torch.nn.functional.normalize(torch.ones(400, 32) + 0.02 * torch.randn(400, 32), dim=-1)
    y = (x[:, 5] > x[:, 5].median()).float()
    router = bench.fit_one(x[:300], y[:300], 1e-2)  # on the raw features: standardising is folded in
    held = ((router(x[300:])[:, 0] > 0).float() == y[300:]).float().mean()
    assert held > 0.9
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps({"calls": [{"id": "a", "right": True, "closed": [2, 3]},
                                            {"id": "b", "right": False, "closed": []}]}))
    assert bench.read_labels(str(labels)) == {"a": [2, 3]}
    labels.write_text(json.dumps({"examples": []}))
    with pytest.raises(SystemExit, match=re.escape(str(labels)) + ": not a block_cost.py --ceiling"):
        bench.read_labels(str(labels))

