"""Tests for layerroute: each checks behaviour against an independent reference or an invariant.

The decoder is compared with transformers' Qwen2ForCausalLM on tiny random checkpoints written
here in the official layout; data fixtures are written here in each source's native format.
Nothing is downloaded. Run: python -m pytest -q test_layerroute.py
"""
import json
import os

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


@pytest.mark.parametrize("field,value", [("model_type", "llama"), ("rope_scaling", {"type": "yarn", "factor": 4.0}),
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
# ---- end qwen ----

# ---- data ----
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
        c = lr.LayerRoute(qwen.Qwen2(cfg)).counts()
    # LoRA r=8 per block: q 8*(896+896) + k 8*(896+128) + v 8*(896+128) + o 8*(896+896) = 45,056
    assert c["lora"] == 24 * 45_056 == 1_081_344
    assert c["routers"] == 24 * (896 + 1) == 21_528
    assert c["trainable"] == 1_102_872


def test_layerroute_at_init_with_open_gates_equals_base_exactly(tmp_path):
    base, model = tiny_routed(tmp_path, router_bias=-3.0)  # routers would close everything...
    model.open_gates = True  # ...but the switch opens every gate without touching them
    ids = torch.randint(0, 300, (2, 12))
    with torch.no_grad():
        assert torch.equal(model.eval()(ids), base(ids))
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
        assert torch.allclose(model.train()(ids), expected, atol=1e-5)  # training mixes: same value


def test_layerroute_gradients_reach_lora_and_routers_only(tmp_path):
    _, model = tiny_routed(tmp_path)
    set_routers(model, [1.0, -1.0, 1.0, -1.0])
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.01)
    ids = torch.randint(0, 300, (2, 10))
    model.train()
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


def test_layerroute_routed_generation_equals_teacher_forcing(tmp_path):
    _, model = tiny_routed(tmp_path)
    set_routers(model, [0.0] * 4, weight_std=3.0, seed=3)
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
    for i, kv in enumerate(cache.layers):  # KV only for the rows that ran the block
        open_rows = gates[:, i].nonzero().squeeze(-1)
        assert (kv is None and len(open_rows) == 0) or torch.equal(kv.rows, open_rows)
    assert qwen.generate(model, prompt[:1], 5) == qwen.generate(model, prompt[:2], 5)[:1]


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
# ---- end layerroute ----

# ---- train ----
# ---- end train ----

# ---- eval ----
# ---- end eval ----
