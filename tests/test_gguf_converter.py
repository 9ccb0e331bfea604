"""GGUF import on the output of llama.cpp's own converter, not only on files our tests write.

`convert_hf_to_gguf.py` with its `conversion/` and `gguf-py/` packages ships in the
llama-cpp-python source archive that the tokenizer fixture also uses (same pinned version, same
cache file). Only those files are unpacked, into ~/.cache/larql-tests/, and run there in a child
interpreter; nothing of the converter is part of larql. The converter is run on tiny random
`transformers` Gemma 4 checkpoints that carry a Gemma-style tokenizer (SentencePiece BPE with
byte fallback, built here with `tokenizers`): it refuses a byte-level one. Its output differs from
our own writer's (tests/test_extract_gguf.py) in what matters: `tokenizer.ggml.model = "gemma4"`
with merges, `head_count_kv` as a scalar or a per-layer array, and `rope_freqs.weight` carrying
the full layers' partial rotary factor (the models here use 0.5, not Gemma 4's 0.25, so a
reader that assumes 0.25 generates different tokens).

Outtypes: f32, f16, bf16 and q8_0, all the converter writes without llama.cpp's binaries
(Q4_K_M needs `llama-quantize`, a compiled program).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from llama_sdist import CACHE_ROOT, SDIST_NAME, SDIST_VERSION, fetch_sdist
from tiny_models import build_model, save_checkpoint

from larql.generate import generate
from larql.models.gemma4 import Gemma4Model
from larql.sampling import Sampler
from larql.vindex import open_vindex
from larql.vindex.extract import extract
from larql.vindex.format import strip_prefix
from larql.vindex.sources.gguf import gguf_name

CONVERTER = CACHE_ROOT / f"llama-cpp-converter-{SDIST_VERSION}"
IN_SDIST = f"llama_cpp_python-{SDIST_VERSION}/vendor/llama.cpp/"

PARTIAL_ROTARY = 0.5  # Gemma 4 uses 0.25: a reader that hard-codes it fails these tests
ROPE = {
    "full_attention": {"partial_rotary_factor": PARTIAL_ROTARY, "rope_theta": 1e6,
                       "rope_type": "proportional"},
    "sliding_attention": {"rope_theta": 1e4, "rope_type": "default"},
}
# name -> tiny_models overrides. "wide": Q4_K/Q8_0-able rows, expert width 160 (like 704, not a
# multiple of 256), per-layer head_count_kv [2, 2, 1]. "no_keqv": separate V on full layers and
# one KV head everywhere, which the converter writes as a scalar head_count_kv.
MODELS = {
    "wide": dict(moe_intermediate_size=160, rope_parameters=ROPE),
    "no_keqv": dict(rope_parameters=ROPE),
}


def _wanted(rel: str) -> bool:
    return rel == "convert_hf_to_gguf.py" or rel.startswith(("conversion/", "gguf-py/gguf/"))


@pytest.fixture(scope="session")
def converter() -> Path:
    """Path of convert_hf_to_gguf.py, unpacked (regular files only) from the cached sdist."""
    script = CONVERTER / "convert_hf_to_gguf.py"
    if not script.exists():
        tmp = CONVERTER.with_name(CONVERTER.name + ".part")
        with tarfile.open(fetch_sdist()) as tar:
            for member in tar:
                rel = member.name[len(IN_SDIST):] if member.name.startswith(IN_SDIST) else ""
                if member.isfile() and _wanted(rel) and ".." not in rel.split("/"):
                    out = tmp / rel
                    out.parent.mkdir(parents=True, exist_ok=True)
                    out.write_bytes(tar.extractfile(member).read())  # never extractall
        if not (tmp / "convert_hf_to_gguf.py").exists():
            raise RuntimeError(f"the {SDIST_NAME} {SDIST_VERSION} sdist has no convert_hf_to_gguf.py")
        tmp.rename(CONVERTER)
    return script


def gemma_style_tokenizer(vocab_size: int):
    """A small SentencePiece-style BPE like Gemma's: U+2581 for spaces, <0xNN> byte fallback,
    <pad> <eos> <bos> <unk> at 0-3, merges learned from a few sentences, <unusedN> padding."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, trainers

    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    corpus = ["The capital of France is Paris.", "Hello, world! The quick brown fox jumps over the "
              "lazy dog.", "Tokens merge into words, words into sentences; experts serve layers."]
    trainer_model = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    trainer_model.normalizer = normalizers.Replace(" ", "\u2581")
    trainer_model.train_from_iterator(
        corpus, trainers.BpeTrainer(vocab_size=vocab_size // 2, show_progress=False))
    learned = json.loads(trainer_model.to_str())["model"]
    pieces = [t for t in sorted(learned["vocab"], key=learned["vocab"].get) if t not in byte_tokens]
    tokens = specials + byte_tokens + pieces
    tokens += [f"<unused{i}>" for i in range(vocab_size - len(tokens))]
    assert len(tokens) == vocab_size, len(tokens)
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in learned["merges"]]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                               unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    return tok


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """name -> (torch model, checkpoint dir with a Gemma-style tokenizer), built once."""
    cache: dict = {}

    def make(name: str):
        if name not in cache:
            base = "wide" if name == "wide" else name
            model = build_model(base, seed=3, **MODELS[name])
            out = save_checkpoint(model, tmp_path_factory.mktemp(f"hf-{name}"), tokenizer=False)
            gemma_style_tokenizer(model.config.vocab_size).save(str(out / "tokenizer.json"))
            (out / "tokenizer_config.json").write_text(json.dumps({
                "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<bos>",
                "eos_token": "<eos>", "unk_token": "<unk>", "pad_token": "<pad>"}))
            cache[name] = (model, out)
        return cache[name]

    return make


@pytest.fixture(scope="module")
def converted(converter, checkpoint, tmp_path_factory):
    """(name, outtype) -> (torch model, checkpoint dir, GGUF path) written by the real converter."""
    cache: dict = {}

    def make(name: str, outtype: str):
        if (name, outtype) not in cache:
            model, ckpt = checkpoint(name)
            out = tmp_path_factory.mktemp(f"gguf-{name}-{outtype}") / f"{name}-{outtype}.gguf"
            # NO_LOCAL_GGUF unset: the converter imports the gguf-py it ships with, not ours.
            env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}
            r = subprocess.run([sys.executable, str(converter), str(ckpt), "--outtype", outtype,
                                "--outfile", str(out)], capture_output=True, text=True, env=env,
                               cwd=converter.parent, timeout=300)
            assert r.returncode == 0, f"convert_hf_to_gguf.py failed:\n{r.stderr[-3000:]}"
            cache[name, outtype] = (model, ckpt, out)
        return cache[name, outtype]

    return make


def prompt(n: int, vocab: int, seed: int = 0) -> list[int]:
    rng = np.random.default_rng(seed)
    return [2, *rng.integers(4, vocab, n - 1).tolist()]


def ref_greedy(model, ids: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


def ref_logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


@pytest.mark.parametrize("name", ["wide", "no_keqv"])
def test_f32_conversion_generates_what_transformers_generates(converted, tmp_path, name):
    model, ckpt, path = converted(name, "f32")
    reader = gguf.GGUFReader(str(path))
    fields = {k: f.contents() for k, f in reader.fields.items() if len(f.data) < 64}
    # What sets the real converter's output apart from our own writer's:
    assert fields["tokenizer.ggml.model"] == "gemma4"
    assert "rope_freqs.weight" in {t.name for t in reader.tensors}
    kv = fields["gemma4.attention.head_count_kv"]
    assert kv == ([2, 2, 1] if name == "wide" else 1), kv

    vindex = open_vindex(extract(path, tmp_path / "v.vindex", quant="f32", progress=False))
    hc = model.config
    assert vindex.config.partial_rotary_factor_global == PARTIAL_ROTARY
    assert vindex.config.attention_k_eq_v == hc.attention_k_eq_v
    want_kv = {"wide": [2, 2, 1], "no_keqv": [1, 1, 1, 1]}[name]
    assert [vindex.config.layer_kv_heads(i) for i in range(hc.num_hidden_layers)] == want_kv

    window = vindex.config.sliding_window
    for n in (window // 2, 2 * window + 3):  # the ring wraps in decode, then in prefill
        ids = prompt(n, hc.vocab_size, seed=n)
        ours = [s.token for s in generate(Gemma4Model(vindex), ids, 24, Sampler())]
        assert ours == ref_greedy(model, ids, 24)

    # The tokenizer rebuilt from the GGUF's vocabulary and merges tokenises like the original.
    from tokenizers import Tokenizer

    original = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    rebuilt = Tokenizer.from_file(str(vindex.tokenizer_path))
    for text in ("The capital of France is Paris.", "  two spaces, caf\u00e9 \u4e16\u754c!", "<bos>x"):
        assert rebuilt.encode(text).ids == original.encode(text).ids, text
        assert rebuilt.decode(rebuilt.encode(text).ids) == original.decode(original.encode(text).ids)



def as_stored(model, path: Path):
    """A copy of the torch model holding the weights the GGUF holds (decoded by `gguf`): the
    reference for a reduced-precision file, so precision loss and reader bugs are told apart."""
    tensors = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    copy = build_model("wide", seed=3, **MODELS["wide"])
    with torch.no_grad():
        for hf, p in copy.state_dict().items():
            key = strip_prefix(hf)
            if key == "lm_head.weight":
                continue  # tied to the embeddings
            t = tensors[gguf_name(key)]
            x = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
            p.copy_(torch.from_numpy(np.array(x, dtype=np.float32).reshape(p.shape)))
    return copy


@pytest.mark.parametrize("outtype", ["f16", "bf16", "q8_0"])
def test_reduced_precision_conversions_equal_transformers_on_the_stored_weights(
        converted, tmp_path, outtype):
    model, _, path = converted("wide", outtype)
    want_type = {"f16": "F16", "bf16": "BF16", "q8_0": "Q8_0"}[outtype]
    assert want_type in {t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}
    vindex = open_vindex(extract(path, tmp_path / "v.vindex", quant="f32", progress=False))
    assert vindex.config.partial_rotary_factor_global == PARTIAL_ROTARY
    reference = as_stored(model, path)
    ids = prompt(2 * vindex.config.sliding_window + 3, model.config.vocab_size, seed=7)
    m = Gemma4Model(vindex)
    want = ref_logits(reference, ids)
    # Measured: 2e-6 against the stored weights, while the rounding itself moves the logits of
    # this random model by 2e-3 (f16) to 0.25 (q8_0) of the largest one.
    assert rel_err(m.forward(ids, m.new_cache(), all_logits=True), want) < 1e-4
    assert rel_err(want, ref_logits(model, ids)) > 1e-3  # the file really holds rounded weights
    ours = [s.token for s in generate(Gemma4Model(vindex), ids[:9], 16, Sampler())]
    assert ours == ref_greedy(reference, ids[:9], 16)


def test_q8_0_conversion_into_a_q4k_vindex(converted, tmp_path):
    """The usual path: a quantised GGUF re-encoded into a Q4_K vindex (one more rounding)."""
    model, _, path = converted("wide", "q8_0")
    vindex = open_vindex(extract(path, tmp_path / "q.vindex", quant="q4k", progress=False))
    source = vindex.index["source"]
    assert (source["kind"], source["tokenizer_model"], source["gguf_tensor_types"]) == \
        ("gguf", "gemma4", ["F32", "Q8_0"])
    ids = prompt(12, model.config.vocab_size, seed=8)
    m = Gemma4Model(vindex)
    err = rel_err(m.forward(ids, m.new_cache(), all_logits=True), ref_logits(as_stored(model, path), ids))
    assert 1e-4 < err < 0.3, err
