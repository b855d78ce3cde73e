"""Our Llama against Hugging Face's on a tiny random checkpoint, and the serving paths against each other.

fp32 throughout the HF comparisons (relative Frobenius error of the logits <= 1e-4). Decode steps go
through our paged cache; HF recomputes every sequence from scratch, or uses its own cache in
`generate`.
"""

from __future__ import annotations

import dataclasses

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from dlora_gpu.kv_cache import PagedKVCache  # noqa: E402
from dlora_gpu.model import Llama, LlamaConfig  # noqa: E402
from dlora_gpu.weights import load_checkpoint, random_weights  # noqa: E402
from runtime_helpers import hf_last_logits, load_hf, rel, step  # noqa: E402

PROMPTS = {"p": [5, 17, 200, 3, 99, 42, 7, 150, 8], "q": [1, 2, 250, 64, 31, 77]}


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_prefill_and_greedy_decode_match_hf(hf_checkpoint, backend: str, device: str) -> None:
    hf = load_hf(hf_checkpoint)
    ours = load_checkpoint(hf_checkpoint, dtype=torch.float32, device=device)
    kv = PagedKVCache(16, 4, ours.cfg, torch.float32, device)  # blocks of p and q interleave
    tokens = {s: list(p) for s, p in PROMPTS.items()}
    logits = step(ours, kv, prefills=[(s, t, -1) for s, t in tokens.items()], backend=backend)
    for _ in range(5):
        assert rel(logits.cpu(), hf_last_logits(hf, list(tokens.values()))) < 1e-4
        for s, row in zip(tokens, logits):
            tokens[s].append(int(row.argmax()))
        logits = step(ours, kv, decodes=[(s, t[-1], len(t), -1) for s, t in tokens.items()],
                      backend=backend)
    assert rel(logits.cpu(), hf_last_logits(hf, list(tokens.values()))) < 1e-4
    generated = hf.generate(torch.tensor([PROMPTS["p"]]), max_new_tokens=5, do_sample=False,
                            attention_mask=torch.ones(1, len(PROMPTS["p"]), dtype=torch.long))
    assert generated[0].tolist() == tokens["p"]


def test_mixed_batch_matches_each_sequence_alone(hf_checkpoint, device: str) -> None:
    """Two prefills and two decodes of different lengths in one batch = each sequence run alone."""
    ours = load_checkpoint(hf_checkpoint, dtype=torch.float32, device=device)
    a, b = PROMPTS["q"], PROMPTS["p"] + [11, 12]
    c, d = [9, 8, 7, 6, 5, 4, 3], [100, 101, 102]
    kv = PagedKVCache(24, 4, ours.cfg, torch.float32, device)
    step(ours, kv, prefills=[("a", a, -1), ("b", b, -1)])
    mixed = step(ours, kv, prefills=[("c", c, -1), ("d", d, -1)],
                 decodes=[("a", 17, len(a) + 1, -1), ("b", 42, len(b) + 1, -1)])
    alone = []
    for seq, prompt, nxt in (("c", c, None), ("d", d, None), ("a", a, 17), ("b", b, 42)):
        solo = PagedKVCache(8, 4, ours.cfg, torch.float32, device)
        logits = step(ours, solo, prefills=[(seq, prompt, -1)])
        if nxt is not None:
            logits = step(ours, solo, decodes=[(seq, nxt, len(prompt) + 1, -1)])
        alone.append(logits[0])
    assert rel(mixed, torch.stack(alone)) < 1e-5
    hf = load_hf(hf_checkpoint)
    assert rel(mixed.cpu(), hf_last_logits(hf, [c, d, a + [17], b + [42]])) < 1e-4


def test_recompute_and_swap_resume_the_same_greedy_tokens(device: str) -> None:
    """Preempting by recompute (prefill of prompt + generated) or by swapping changes no token."""
    model = random_weights(LlamaConfig.preset("tiny"), seed=3, dtype=torch.float32, device=device)

    def run(preempt_at: int | None) -> dict[str, list[int]]:
        kv = PagedKVCache(12, 4, model.cfg, torch.float32, device, host_blocks=6)
        toks = {"r": [3, 1, 4, 1, 5], "s": [2, 7, 1, 8, 2, 8, 1]}
        logits = step(model, kv, prefills=[(k, list(t), -1) for k, t in toks.items()])
        for i in range(8):
            for k, row in zip(toks, logits):
                toks[k].append(int(row.argmax()))
            if i == preempt_at:
                kv.release("r")  # r will be recomputed
                kv.swap_out("s")
                kv.check()
                kv.swap_in("s")
                logits = step(model, kv, prefills=[("r", toks["r"], -1)],
                              decodes=[("s", toks["s"][-1], len(toks["s"]), -1)])
            else:
                logits = step(model, kv, decodes=[(k, t[-1], len(t), -1) for k, t in toks.items()])
        return toks

    assert run(None) == run(3)


def test_state_dict_hf_round_trips_hf_names(hf_checkpoint) -> None:
    hf_sd = load_hf(hf_checkpoint).state_dict()
    ours = load_checkpoint(hf_checkpoint, dtype=torch.float32).state_dict_hf()
    assert set(ours) == set(hf_sd)
    assert all(torch.equal(ours[k], hf_sd[k]) for k in ours)
    empty = Llama(LlamaConfig.from_hf(load_hf(hf_checkpoint).config.to_dict()), torch.float32)
    empty.load_hf_state_dict(hf_sd)
    assert all(torch.equal(empty.state_dict_hf()[k], hf_sd[k]) for k in ours)


def test_sharded_checkpoint_loads_the_same_weights(hf_checkpoint, tmp_path) -> None:
    from runtime_helpers import save_hf_checkpoint

    sharded = save_hf_checkpoint(tmp_path / "sharded", max_shard_size="60KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    a = load_checkpoint(hf_checkpoint, dtype=torch.float32).state_dict_hf()
    b = load_checkpoint(sharded, dtype=torch.float32).state_dict_hf()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_random_weights_stay_finite_in_fp16_through_many_layers() -> None:
    """32 layers in fp16 track fp32: the init keeps pre-activations O(1) at any depth."""
    cfg = dataclasses.replace(LlamaConfig.preset("tiny"), num_layers=32)
    logits = {}
    for dtype in (torch.float32, torch.float16):
        model = random_weights(cfg, seed=0, dtype=dtype)
        kv = PagedKVCache(8, 16, cfg, dtype)
        step(model, kv, prefills=[("x", list(range(40)), -1)])
        logits[dtype] = step(model, kv, decodes=[("x", 7, 41, -1)])
    assert torch.isfinite(logits[torch.float16]).all()
    assert rel(logits[torch.float16], logits[torch.float32]) < 2e-2


def test_random_weights_at_llama_7b_width_stay_finite_in_fp16() -> None:
    """Two layers of real Llama-2-7B width (hidden 4096, intermediate 11008, 32 heads), fp16."""
    cfg = dataclasses.replace(LlamaConfig.preset("llama-2-7b"), num_layers=2, vocab_size=512)
    model = random_weights(cfg, seed=0, dtype=torch.float16)
    kv = PagedKVCache(2, 16, cfg, torch.float16)
    logits = step(model, kv, prefills=[("x", list(range(12)), -1)])
    logits = torch.cat([logits, step(model, kv, decodes=[("x", 3, 13, -1)])])
    assert torch.isfinite(logits).all()
    assert 0.3 < float(logits.float().std()) < 3  # O(1) logits, as the init promises


def test_config_presets_and_hf_errors() -> None:
    assert LlamaConfig.preset("llama-2-7b").head_dim == 128
    tiny = LlamaConfig.preset("tiny")
    assert (tiny.num_heads, tiny.num_kv_heads, tiny.hidden_size) == (4, 2, 256)
    hf = {"hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256,
          "rms_norm_eps": 1e-5, "max_position_embeddings": 256, "rope_theta": 500.0}
    assert LlamaConfig.from_hf(hf).rope_theta == 500.0  # transformers 4 layout
    v5 = {k: v for k, v in hf.items() if k != "rope_theta"}
    v5["rope_parameters"] = {"rope_type": "default", "rope_theta": 250.0}
    assert LlamaConfig.from_hf(v5).rope_theta == 250.0
    with pytest.raises(ValueError, match="cfg.json: missing key 'num_hidden_layers'"):
        LlamaConfig.from_hf({k: v for k, v in hf.items() if k != "num_hidden_layers"}, "cfg.json")
    with pytest.raises(ValueError, match="'rope_scaling'"):
        LlamaConfig.from_hf({**hf, "rope_scaling": {"type": "linear", "factor": 2.0}})
    with pytest.raises(ValueError, match="'attention_bias'"):
        LlamaConfig.from_hf({**hf, "attention_bias": True})


def test_checkpoint_errors_name_file_and_key(hf_checkpoint, tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    from dlora_gpu.weights import CheckpointError

    def broken(name: str, change) -> str:
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text((hf_checkpoint / "config.json").read_text())
        sd = load_file(hf_checkpoint / "model.safetensors")
        change(sd)
        save_file(sd, d / "model.safetensors")
        return d

    key = "model.layers.1.self_attn.k_proj.weight"
    cases = {
        "missing": (lambda sd: sd.pop(key), f"missing key '{key}'"),
        "extra": (lambda sd: sd.update(extra=torch.zeros(1)), "unexpected key 'extra'"),
        "shape": (lambda sd: sd.update({key: sd[key][:8].clone()}), f"key '{key}' has shape"),
    }
    for name, (change, message) in cases.items():
        d = broken(name, change)
        with pytest.raises(CheckpointError, match="model.safetensors: " + message):
            load_checkpoint(d, dtype=torch.float32)
    with pytest.raises(CheckpointError, match="config.json: file not found"):
        load_checkpoint(tmp_path)


def test_tied_embeddings_checkpoint_gets_an_untied_copy(tmp_path) -> None:
    import transformers

    from runtime_helpers import HF_TINY

    torch.manual_seed(1)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**HF_TINY, tie_word_embeddings=True))
    hf.save_pretrained(tmp_path, safe_serialization=True)
    ours = load_checkpoint(tmp_path, dtype=torch.float32)
    assert torch.equal(ours.lm_head, ours.embed_tokens)
    kv = PagedKVCache(4, 4, ours.cfg, torch.float32)
    prompt = PROMPTS["p"]
    assert rel(step(ours, kv, prefills=[("x", prompt, -1)]), hf_last_logits(hf.eval(), [prompt])) < 1e-4
