"""model.py against Hugging Face transformers (the independent reference) on tiny random checkpoints."""
import json

import pytest
import torch
import transformers

import hf
import model
from hf_models import FAMILIES, make_checkpoint

VOCAB = 211  # the tiny checkpoints' vocabulary (tests/hf_models.py)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a shared 2-core machine spinning threads slow them down."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """family -> (folder, the transformers model saved there)."""
    out = {}
    for i, family in enumerate(FAMILIES):
        folder = tmp_path_factory.mktemp(family)
        out[family] = (folder, make_checkpoint(folder, family, seed=i))
    return out


def tokens(B, T, seed):
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def hf_logits(hf_model, input_ids):
    with torch.no_grad():
        return hf_model(input_ids).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers(checkpoints, family):
    folder, hf = checkpoints[family]
    ours = model.Transformer.from_pretrained(folder)
    x = tokens(3, 19, seed=1)
    with torch.no_grad():
        logits = ours(x)
    assert logits.shape == (3, 19, VOCAB)
    torch.testing.assert_close(logits, hf_logits(hf, x), atol=1e-4, rtol=0)


def test_sharded_checkpoint_loads_like_single_file(tmp_path):
    hf = make_checkpoint(tmp_path, "qwen2", seed=7, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists() and not (tmp_path / "model.safetensors").exists()
    x = tokens(2, 11, seed=2)
    with torch.no_grad():
        torch.testing.assert_close(model.Transformer.from_pretrained(tmp_path)(x), hf_logits(hf, x),
                                   atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_save_pretrained_loads_back_in_transformers(checkpoints, family, tmp_path):
    folder, hf = checkpoints[family]
    ours = model.Transformer.from_pretrained(folder)
    # Shard one family so that transformers also reads our index file.
    ours.save_pretrained(tmp_path / "out", max_shard_size=30_000 if family == "qwen3" else 5 * 2**30)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").float().eval()
    assert (tmp_path / "out" / "model.safetensors.index.json").exists() == (family == "qwen3")
    x = tokens(2, 13, seed=3)
    torch.testing.assert_close(hf_logits(reloaded, x), hf_logits(hf, x), atol=1e-5, rtol=0)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == "float32"


def test_original_gpt2_names_without_prefix_and_mask_buffers_load(checkpoints, tmp_path):
    # openai-community/gpt2's model.safetensors was saved from GPT2Model: "h.0.attn.c_attn.weight", no
    # "transformer." prefix, and it carries the causal-mask buffers "h.N.attn.bias".
    folder, hf = checkpoints["gpt2"]
    bare = copy_checkpoint(folder, tmp_path / "bare")

    def strip(tensors):
        for name in list(tensors):
            tensors[name.removeprefix("transformer.")] = tensors.pop(name)
        tensors.update({f"h.{i}.attn.bias": torch.ones(1, 1, 128, 128).tril() for i in range(2)})

    rewrite_tensors(bare, strip)
    x = tokens(2, 9, seed=13)
    with torch.no_grad():
        torch.testing.assert_close(model.Transformer.from_pretrained(bare)(x), hf_logits(hf, x), atol=1e-4, rtol=0)


def test_older_config_with_top_level_rope_theta_loads(checkpoints, tmp_path):
    folder, hf = checkpoints["qwen2"]     # rope_theta 1e6: the default 1e4 would give other logits
    older = copy_checkpoint(folder, tmp_path / "older")
    config = json.loads((older / "config.json").read_text())
    config["rope_theta"] = config.pop("rope_parameters")["rope_theta"]
    config["rope_scaling"] = None
    (older / "config.json").write_text(json.dumps(config))
    x = tokens(2, 9, seed=14)
    with torch.no_grad():
        torch.testing.assert_close(model.Transformer.from_pretrained(older)(x), hf_logits(hf, x), atol=1e-4, rtol=0)


def test_hidden_states_then_lm_head_equals_forward(checkpoints):
    ours = model.Transformer.from_pretrained(checkpoints["qwen2"][0])
    x = tokens(2, 9, seed=4)
    with torch.no_grad():
        torch.testing.assert_close(ours.lm_head(ours.hidden_states(x)), ours(x))


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen3"])
def test_padded_batch_matches_each_row_alone(checkpoints, family):
    ours = model.Transformer.from_pretrained(checkpoints[family][0])
    lengths = [7, 12, 3]
    rows = [tokens(1, n, seed=10 + n)[0] for n in lengths]
    T = max(lengths)
    for side in ("left", "right"):
        ids = torch.full((3, T), 5, dtype=torch.long)   # pad id 5: a real token id, so the mask must hide it
        mask = torch.zeros(3, T, dtype=torch.long)
        for b, row in enumerate(rows):
            cols = slice(T - len(row), T) if side == "left" else slice(0, len(row))
            ids[b, cols], mask[b, cols] = row, 1
        with torch.no_grad():
            batch = ours(ids, attention_mask=mask)
            assert torch.isfinite(batch).all(), f"{side} padding gave non-finite logits"
            for b, row in enumerate(rows):
                cols = slice(T - len(row), T) if side == "left" else slice(0, len(row))
                torch.testing.assert_close(batch[b, cols], ours(row[None])[0], atol=1e-5, rtol=0,
                                           msg=lambda m: f"{side} padding, row {b}: {m}")


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2"])
def test_kv_cache_prefill_and_decode_equal_full_forward(checkpoints, family):
    ours = model.Transformer.from_pretrained(checkpoints[family][0])
    lengths = torch.tensor([5, 9, 2])
    n_new = 6
    full = tokens(3, 9 + n_new, seed=20)      # row b: prompt full[b, :lengths[b]], then n_new decoded tokens
    prompts = torch.zeros(3, 9, dtype=torch.long)
    for b, n in enumerate(lengths):
        prompts[b, :n] = full[b, :n]
    cache = ours.new_cache(3, max_len=24)
    steps = [ours.prefill(prompts, lengths, cache)]
    for t in range(n_new):
        steps.append(ours.decode(full[torch.arange(3), lengths + t], cache))
    assert cache.lengths.tolist() == (lengths + n_new).tolist()
    with torch.no_grad():
        for b, n in enumerate(lengths.tolist()):
            reference = ours(full[b:b + 1, :n + n_new])[0]             # (n + n_new, V)
            for t, logits in enumerate(steps):
                torch.testing.assert_close(logits[b], reference[n - 1 + t], atol=1e-5, rtol=0,
                                           msg=lambda m: f"row {b}, step {t}: {m}")


def test_cache_select_keeps_chosen_rows(checkpoints):
    ours = model.Transformer.from_pretrained(checkpoints["llama"][0])
    prompts, lengths = tokens(3, 6, seed=30), torch.tensor([6, 4, 5])
    cache = ours.new_cache(3, max_len=10)
    ours.prefill(prompts, lengths, cache)
    kept = cache.select(torch.tensor([2, 0]))
    logits = ours.decode(torch.tensor([1, 2]), kept)
    with torch.no_grad():
        torch.testing.assert_close(logits[0], ours(torch.cat([prompts[2, :5], torch.tensor([1])])[None])[0, -1],
                                   atol=1e-5, rtol=0)
        torch.testing.assert_close(logits[1], ours(torch.cat([prompts[0], torch.tensor([2])])[None])[0, -1],
                                   atol=1e-5, rtol=0)


def test_gradient_checkpointing_gives_the_same_gradients(checkpoints):
    grads = []
    for enabled in (False, True):
        ours = model.Transformer.from_pretrained(checkpoints["qwen3"][0])
        ours.set_gradient_checkpointing(enabled)
        ours(tokens(2, 8, seed=5)).float().logsumexp(-1).mean().backward()
        grads.append([p.grad for p in ours.parameters()])
    for plain, recomputed in zip(*grads):
        torch.testing.assert_close(recomputed, plain)


def test_bfloat16_forward_and_backward_are_close_to_float32(checkpoints):
    folder, hf = checkpoints["qwen2"]
    ours = model.Transformer.from_pretrained(folder, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in ours.parameters())
    x = tokens(2, 10, seed=6)
    logits = ours(x)
    assert logits.dtype == torch.bfloat16
    logits.float().logsumexp(-1).mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in ours.parameters() if p.grad is not None)
    # bf16 keeps ~3 significant digits; logits here are O(1)
    torch.testing.assert_close(logits.float(), hf_logits(hf, x), atol=0.1, rtol=0.05)


def test_bfloat16_save_writes_bfloat16_tensors_and_dtype(checkpoints, tmp_path):
    from safetensors import safe_open
    ours = model.Transformer.from_pretrained(checkpoints["gpt2"][0], dtype=torch.bfloat16)
    ours.save_pretrained(tmp_path / "bf16")
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    with safe_open(str(tmp_path / "bf16" / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(n).dtype for n in f.keys()} == {torch.bfloat16}
    reloaded = model.Transformer.from_pretrained(tmp_path / "bf16", dtype=torch.bfloat16)
    for (name, a), b in zip(ours.state_dict().items(), reloaded.state_dict().values()):
        assert torch.equal(a, b), name


def test_forward_compiles_as_one_graph(checkpoints):
    ours = model.Transformer.from_pretrained(checkpoints["llama"][0])
    compiled = torch.compile(ours, backend="eager", fullgraph=True)   # fails on any graph break
    x, mask = tokens(2, 7, seed=8), torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1] * 7])
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), ours(x))
        torch.testing.assert_close(compiled(x, mask), ours(x, mask))


def test_training_from_scratch_config_builds_and_learns():
    config = model.Config(model_type="llama", vocab_size=50, n_layer=2, n_head=4, n_kv_head=2, d_model=32,
                          max_seq_len=64)
    torch.manual_seed(0)
    net = model.Transformer(config)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    x = tokens(4, 16, seed=9) % 50
    losses = []
    for _ in range(20):
        logits = net(x[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 50), x[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], f"memorising one batch should cut the loss: {losses[0]} -> {losses[-1]}"


# -- the value model ---------------------------------------------------------------------------------------


def test_value_model_starts_at_zero_and_round_trips(checkpoints, tmp_path):
    folder, hf = checkpoints["qwen2"]
    value = model.ValueModel.from_pretrained(folder)
    x = tokens(2, 8, seed=11)
    v = value(x)
    assert v.shape == (2, 8) and v.dtype == torch.float32 and (v == 0).all()
    assert not value.backbone.lm_head.weight.requires_grad, "untied lm_head gets no gradient: frozen for DDP"
    with torch.no_grad():
        value.head.weight.normal_(generator=torch.Generator().manual_seed(0))
    expected = value(x)
    assert expected.abs().min() > 0
    value.save_pretrained(tmp_path / "value")
    reloaded = model.ValueModel.from_pretrained(tmp_path / "value")
    torch.testing.assert_close(reloaded(x), expected)
    # The backbone folder is still an ordinary causal LM for transformers.
    backbone = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "value").float().eval()
    torch.testing.assert_close(hf_logits(backbone, x), hf_logits(hf, x), atol=1e-5, rtol=0)


def test_value_model_equals_head_on_hidden_states(checkpoints):
    value = model.ValueModel.from_pretrained(checkpoints["gpt2"][0])
    with torch.no_grad():
        value.head.weight.normal_(generator=torch.Generator().manual_seed(1))
        x = tokens(2, 6, seed=12)
        expected = value.backbone.hidden_states(x) @ value.head.weight[0]
    torch.testing.assert_close(value(x), expected)



def test_value_head_stays_float32_under_bf16_autocast(checkpoints):
    # The trainer runs the value model under bf16 autocast on GPU; the scalar head must not be rounded to bf16
    # (≈ 3 significant digits), which the 1e-5 tolerance below would catch.
    value = model.ValueModel.from_pretrained(checkpoints["llama"][0])
    with torch.no_grad():
        value.head.weight.normal_(generator=torch.Generator().manual_seed(2))
        x = tokens(2, 9, seed=13)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            values = value(x)
            hidden = value.backbone.hidden_states(x)
    assert values.dtype == torch.float32
    expected = (hidden.double() @ value.head.weight.double()[0]).float()
    torch.testing.assert_close(values, expected, rtol=1e-5, atol=1e-5)

# -- saving is atomic --------------------------------------------------------------------------------------


def test_save_replaces_folder_only_when_complete(checkpoints, tmp_path, monkeypatch):
    ours = model.Transformer.from_pretrained(checkpoints["llama"][0])
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "stale.txt").write_text("old")

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(hf, "write_safetensors", fail)
    with pytest.raises(OSError, match="disk full"):
        ours.save_pretrained(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"], "no temporary folder may be left behind"
    assert (target / "stale.txt").read_text() == "old", "a failed save must leave the old folder untouched"
    monkeypatch.undo()
    ours.save_pretrained(target)
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "model.safetensors"]


# -- errors a user can cause --------------------------------------------------------------------------------


def copy_checkpoint(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def edit_config(folder, **changes):
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize("changes, message", [
    (dict(model_type="falcon"), "model_type 'falcon' is not supported; supported: gpt2, llama"),
    (dict(rope_scaling={"rope_type": "linear", "factor": 2.0}), "RoPE scaling 'linear'"),
    (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}), "RoPE scaling 'yarn'"),
    (dict(use_sliding_window=True, sliding_window=32), "sliding_window 32 < max_position_embeddings 128"),
    (dict(hidden_act="gelu"), "hidden_act 'gelu'"),
    (dict(hidden_size=None), "setting 'hidden_size' is missing"),
])
def test_bad_config_is_refused_with_its_setting(checkpoints, tmp_path, changes, message):
    folder = copy_checkpoint(checkpoints["qwen2"][0], tmp_path / "bad")
    if changes.get("hidden_size", 0) is None:
        config = json.loads((folder / "config.json").read_text())
        del config["hidden_size"]
        (folder / "config.json").write_text(json.dumps(config))
    else:
        edit_config(folder, **changes)
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        model.Transformer.from_pretrained(folder)


def test_mistral_sliding_window_is_refused_when_it_would_apply(checkpoints, tmp_path):
    folder = copy_checkpoint(checkpoints["mistral"][0], tmp_path / "bad")
    edit_config(folder, sliding_window=64)
    with pytest.raises(ValueError, match="sliding_window 64 < max_position_embeddings 128"):
        model.Transformer.from_pretrained(folder)
    edit_config(folder, sliding_window=4096)   # longer than any position: changes nothing, so accepted
    model.Transformer.from_pretrained(folder)


def rewrite_tensors(folder, edit):
    from safetensors.torch import load_file, save_file
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors")


def test_missing_unexpected_and_misshapen_tensors_are_named(checkpoints, tmp_path):
    src = checkpoints["qwen2"][0]
    folder = copy_checkpoint(src, tmp_path / "missing")
    rewrite_tensors(folder, lambda t: t.pop("model.layers.1.self_attn.k_proj.bias"))
    with pytest.raises(ValueError, match="tensor model.layers.1.self_attn.k_proj.bias is missing"):
        model.Transformer.from_pretrained(folder)

    folder = copy_checkpoint(src, tmp_path / "unexpected")
    rewrite_tensors(folder, lambda t: t.update({"model.layers.0.self_attn.o_proj.bias": torch.zeros(48)}))
    with pytest.raises(ValueError, match="unexpected tensor model.layers.0.self_attn.o_proj.bias"):
        model.Transformer.from_pretrained(folder)

    folder = copy_checkpoint(src, tmp_path / "shape")
    rewrite_tensors(folder, lambda t: t.update({"model.layers.0.mlp.up_proj.weight": torch.zeros(81, 48)}))
    with pytest.raises(ValueError, match=r"tensor model.layers.0.mlp.up_proj.weight has shape \(81, 48\), "
                                         r"but config.json implies \(80, 48\)"):
        model.Transformer.from_pretrained(folder)


def test_missing_or_corrupt_files_are_named(checkpoints, tmp_path):
    src = checkpoints["llama"][0]
    folder = copy_checkpoint(src, tmp_path / "noconfig")
    (folder / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="noconfig/config.json not found"):
        model.Transformer.from_pretrained(folder)

    folder = copy_checkpoint(src, tmp_path / "badjson")
    (folder / "config.json").write_text('{"model_type": "llama",')
    with pytest.raises(ValueError, match="badjson/config.json is not valid JSON"):
        model.Transformer.from_pretrained(folder)

    folder = copy_checkpoint(src, tmp_path / "noweights")
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="neither model.safetensors nor model.safetensors.index.json"):
        model.Transformer.from_pretrained(folder)

    folder = copy_checkpoint(src, tmp_path / "corrupt")
    (folder / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ValueError, match="corrupt/model.safetensors is not a readable safetensors file"):
        model.Transformer.from_pretrained(folder)

    folder = tmp_path / "sharded"
    make_checkpoint(folder, "llama", max_shard_size="20KB")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    (folder / shard).unlink()
    with pytest.raises(FileNotFoundError, match=f"{shard} not found"):
        model.Transformer.from_pretrained(folder)
