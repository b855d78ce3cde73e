"""LoRA adapters: PEFT's file format both ways, our unmerged and merged forwards against PEFT's, and
every unsupported adapter feature refused with the file and key named.

Three adapters of different ranks and targets (one rsLoRA; one touching only gate/up, so its qkv, o
and down slots are rank 0) share a pool with an empty slot; sequences without an adapter ride along.
"""

from __future__ import annotations

import json
import shutil

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from safetensors.torch import load_file, save_file  # noqa: E402

from dlora_gpu.adapters import (AdapterFormatError, AdapterPool, load_peft_adapter,  # noqa: E402
                                peft_key, write_peft_adapter)
from dlora_gpu.kv_cache import PagedKVCache  # noqa: E402
from dlora_gpu.merge import DriftFreeMerger  # noqa: E402
from dlora_gpu.model import PROJECTIONS  # noqa: E402
from dlora_gpu.weights import load_checkpoint, read_config  # noqa: E402
from runtime_helpers import hf_last_logits, load_hf, rel, step  # noqa: E402

ADAPTERS = {  # id -> rank, alpha, targets, use_rslora
    "a": (8, 16, PROJECTIONS, False),
    "b": (4, 6, ("q_proj", "v_proj", "down_proj"), True),
    "c": (2, 4, ("gate_proj", "up_proj"), False),
}
SLOTS = {"a": 2, "b": 0, "c": 3}  # slot 1 stays empty
# PEFT 0.21 calls a transformers API that transformers 5 deprecates; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated")


@pytest.fixture(scope="module")
def adapter_dirs(hf_checkpoint, tmp_path_factory):
    cfg, _ = read_config(hf_checkpoint)
    root = tmp_path_factory.mktemp("adapters")
    return {aid: write_peft_adapter(root / aid, cfg, r, alpha, seed=i, targets=t, use_rslora=rs)
            for i, (aid, (r, alpha, t, rs)) in enumerate(ADAPTERS.items())}


def peft_with_all(hf_checkpoint, adapter_dirs):
    model = peft.PeftModel.from_pretrained(load_hf(hf_checkpoint), adapter_dirs["a"], adapter_name="a")
    for aid in ("b", "c"):
        model.load_adapter(adapter_dirs[aid], adapter_name=aid)
    return model.eval()


def peft_modules(model):
    """(layer, projection) -> PEFT's LoRA layer."""
    layers = model.base_model.model.model.layers
    return {(i, p): getattr(layer.self_attn if p in ("q_proj", "k_proj", "v_proj", "o_proj")
                            else layer.mlp, p)
            for i, layer in enumerate(layers) for p in PROJECTIONS}


def test_adapters_peft_saves_load_here_with_the_same_weights(hf_checkpoint, tmp_path) -> None:
    """PEFT 0.21's own file (key names, config) loads, with PEFT's weights and scaling."""
    cfg, _ = read_config(hf_checkpoint)
    conf = peft.LoraConfig(r=4, lora_alpha=12, target_modules=list(PROJECTIONS),
                           init_lora_weights=False)
    model = peft.get_peft_model(load_hf(hf_checkpoint), conf)
    model.save_pretrained(tmp_path / "peft")
    keys = set(load_file(tmp_path / "peft" / "adapter_model.safetensors"))
    assert keys == {peft_key(i, p, f) for i in range(cfg.num_layers) for p in PROJECTIONS for f in "AB"}
    ours = load_peft_adapter(tmp_path / "peft", cfg)
    for (i, p), layer in peft_modules(model).items():
        a, b = ours.weights[(i, p)]
        assert torch.equal(a, layer.lora_A["default"].weight)
        assert torch.equal(b, layer.lora_B["default"].weight)
        assert ours.scale == layer.scaling["default"] == 3.0


def test_adapters_we_write_load_in_peft(hf_checkpoint, adapter_dirs) -> None:
    cfg, _ = read_config(hf_checkpoint)
    model = peft_with_all(hf_checkpoint, adapter_dirs)
    for aid, path in adapter_dirs.items():
        ours = load_peft_adapter(path, cfg)
        for (i, p), layer in peft_modules(model).items():
            targeted = hasattr(layer, "lora_A") and aid in layer.lora_A
            assert targeted == ((i, p) in ours.weights)
            if targeted:
                a, b = ours.weights[(i, p)]
                assert torch.equal(a, layer.lora_A[aid].weight)
                assert torch.equal(b, layer.lora_B[aid].weight)
                assert layer.scaling[aid] == pytest.approx(ours.scale)
    assert load_peft_adapter(adapter_dirs["b"], cfg).scale == pytest.approx(6 / 2)  # rsLoRA: 6/sqrt(4)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_unmerged_mixed_adapters_match_peft(hf_checkpoint, adapter_dirs, backend, device) -> None:
    cfg, _ = read_config(hf_checkpoint)
    ours = load_checkpoint(hf_checkpoint, dtype=torch.float32, device=device)
    pool = AdapterPool.from_dirs(cfg, adapter_dirs, num_slots=4, dtype=torch.float32, device=device)
    for aid, slot in SLOTS.items():
        pool.load(aid, slot)
    ref = peft_with_all(hf_checkpoint, adapter_dirs)
    kv = PagedKVCache(32, 4, cfg, torch.float32, device)
    # seq -> (adapter, prompt); s0..s2 start at once, s3/s4 join one iteration later.
    seqs = {"s0": ("a", [5, 6, 7, 8, 9, 10]), "s1": ("b", [11, 3, 250, 4, 5, 6]),
            "s2": (None, [1, 2, 3, 4, 5, 6]), "s3": ("c", [40, 41, 42, 43, 44]),
            "s4": ("a", [60, 1, 61, 2, 62])}
    toks = {s: list(p) for s, (_, p) in seqs.items()}

    def slot(s: str) -> int:
        return -1 if seqs[s][0] is None else SLOTS[seqs[s][0]]

    running: list[str] = []
    for joining in (["s0", "s1", "s2"], ["s3", "s4"], [], []):
        logits = step(ours, kv, prefills=[(s, toks[s], slot(s)) for s in joining],
                      decodes=[(s, toks[s][-1], len(toks[s]), slot(s)) for s in running],
                      pool=pool, backend=backend)
        order = joining + running  # logits come in input order: prefills, then decodes
        expect = hf_last_logits(ref, [toks[s] for s in order],
                                [seqs[s][0] or "__base__" for s in order])
        assert rel(logits.cpu(), expect) < 1e-4
        for s, row in zip(order, logits):
            toks[s].append(int(row.argmax()))
        running = order
    base = hf_last_logits(ref, [toks["s0"]], ["__base__"])
    assert rel(hf_last_logits(ref, [toks["s0"]], ["a"]), base) > 1e-2  # the adapters matter


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_merged_matches_merge_and_unload(hf_checkpoint, adapter_dirs, backend, device) -> None:
    """DriftFreeMerger on our fused weights = PEFT's merge_and_unload, switching a -> c -> base."""
    cfg, _ = read_config(hf_checkpoint)
    ours = load_checkpoint(hf_checkpoint, dtype=torch.float32, device=device)
    pool = AdapterPool.from_dirs(cfg, adapter_dirs, num_slots=1, dtype=torch.float32, device=device)
    pool.load("a", 0)  # a's deltas come from its slot, c's from the host copy
    merger = DriftFreeMerger(ours.merge_targets(), backend=backend)
    prompt = [9, 30, 31, 7, 200, 1, 2]

    def ours_logits() -> torch.Tensor:
        kv = PagedKVCache(4, 4, cfg, torch.float32, device)
        first = step(ours, kv, prefills=[("x", prompt, -1)])
        return torch.cat([first, step(ours, kv, decodes=[("x", 13, len(prompt) + 1, -1)])]).cpu()

    for aid in ("a", "c"):
        merger.switch(aid, pool.deltas(aid))
        merged = peft.PeftModel.from_pretrained(load_hf(hf_checkpoint), adapter_dirs[aid]).merge_and_unload()
        assert rel(ours_logits(), hf_last_logits(merged, [prompt, prompt + [13]])) < 1e-4
    merger.unmerge()
    assert rel(ours_logits(), hf_last_logits(load_hf(hf_checkpoint), [prompt, prompt + [13]])) < 1e-4


def edit_config(**changes):
    def apply(d):
        conf = json.loads((d / "adapter_config.json").read_text())
        conf.update(changes)
        (d / "adapter_config.json").write_text(json.dumps(conf))
    return apply


def edit_tensors(change):
    def apply(d):
        sd = load_file(d / "adapter_model.safetensors")
        change(sd)
        save_file(sd, d / "adapter_model.safetensors")
    return apply


KEY_A = peft_key(1, "k_proj", "A")
MALFORMED = {  # name -> (edit, file, key named in the error)
    "dora": (edit_config(use_dora=True), "adapter_config.json", "use_dora"),
    "fan_in_fan_out": (edit_config(fan_in_fan_out=True), "adapter_config.json", "fan_in_fan_out"),
    "bias": (edit_config(bias="all"), "adapter_config.json", "bias"),
    "lora_bias": (edit_config(lora_bias=True), "adapter_config.json", "lora_bias"),
    "modules_to_save": (edit_config(modules_to_save=["lm_head"]), "adapter_config.json",
                        "modules_to_save"),
    "rank_pattern": (edit_config(rank_pattern={"q_proj": 4}), "adapter_config.json", "rank_pattern"),
    "alpha_pattern": (edit_config(alpha_pattern={"q_proj": 4}), "adapter_config.json",
                      "alpha_pattern"),
    "layers_to_transform": (edit_config(layers_to_transform=[0]), "adapter_config.json",
                            "layers_to_transform"),
    "regex_targets": (edit_config(target_modules=".*_proj"), "adapter_config.json",
                      "target_modules"),
    "unknown_target": (edit_config(target_modules=["q_proj", "lm_head"]), "adapter_config.json",
                       "target_modules"),
    "not_lora": (edit_config(peft_type="IA3"), "adapter_config.json", "peft_type"),
    "bad_rank": (edit_config(r=0), "adapter_config.json", "r"),
    "missing_key": (edit_tensors(lambda sd: sd.pop(KEY_A)), "adapter_model.safetensors", KEY_A),
    "extra_key": (edit_tensors(lambda sd: sd.update(
        {KEY_A.replace("lora_A.weight", "lora_magnitude_vector"): torch.ones(32)})),
        "adapter_model.safetensors", "lora_magnitude_vector"),
    "wrong_shape": (edit_tensors(lambda sd: sd.update({KEY_A: sd[KEY_A].T.contiguous()})),
                    "adapter_model.safetensors", KEY_A),
    "no_tensors": (lambda d: (d / "adapter_model.safetensors").unlink(),
                   "adapter_model.safetensors", "file not found"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_adapters_are_refused_naming_file_and_key(hf_checkpoint, adapter_dirs, tmp_path,
                                                            case) -> None:
    cfg, _ = read_config(hf_checkpoint)
    edit, file, key = MALFORMED[case]
    d = tmp_path / case
    shutil.copytree(adapter_dirs["a"], d)
    edit(d)
    with pytest.raises(AdapterFormatError) as err:
        load_peft_adapter(d, cfg)
    assert str(d / file) in str(err.value) and key in str(err.value)


def test_pool_slots_and_deltas(hf_checkpoint, adapter_dirs) -> None:
    cfg, _ = read_config(hf_checkpoint)
    pool = AdapterPool.from_dirs(cfg, adapter_dirs, num_slots=2, dtype=torch.float32)
    assert pool.max_rank == 8 and pool.resident() == {}
    host_deltas = pool.deltas("c")
    pool.load("c", 1)
    assert pool.slot_of("c") == 1 and pool.slot_of("a") is None and pool.resident() == {1: "c"}
    layer = pool.layers[0]
    assert layer.qkv.ranks_host[1] == 0 and layer.down.ranks_host[1] == 0  # c touches only gate/up
    assert layer.gate_up.ranks_host[1] == 2
    slot_deltas = pool.deltas("c")
    assert set(slot_deltas) == {f"layers.{i}.{p}" for i in range(2) for p in ("gate_proj", "up_proj")}
    assert all(torch.equal(slot_deltas[k][0], host_deltas[k][0]) and
               torch.equal(slot_deltas[k][1], host_deltas[k][1]) for k in host_deltas)
    with pytest.raises(ValueError, match="holds 'c'; evict it first"):
        pool.load("a", 1)
    with pytest.raises(ValueError, match="already in slot 1"):
        pool.load("c", 0)
    with pytest.raises(KeyError, match="unknown adapter"):
        pool.load("zzz", 0)
    pool.evict(1)
    assert pool.resident() == {} and layer.gate_up.ranks_host[1] == 0 and not layer.gate_up.A[1].any()
    with pytest.raises(ValueError, match="already empty"):
        pool.evict(1)


def test_random_pool_is_seeded(device) -> None:
    from dlora_gpu.model import LlamaConfig

    cfg = LlamaConfig.preset("tiny")
    one, two = (AdapterPool.random(cfg, {"x": 4, "y": 16}, seed=5, num_slots=1, device=device)
                for _ in range(2))
    assert one.max_rank == 16
    assert all(torch.equal(one.host["y"].weights[k][1], two.host["y"].weights[k][1])
               for k in one.host["y"].weights)
