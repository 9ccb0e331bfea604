"""The tokenizer wrapper against the real Gemma 4 vocabulary and llama.cpp's test vectors.

The vocab-only GGUF converted from gemma-4-26B-A4B ships in the llama-cpp-python source package
with `.inp`/`.out` vectors beside it (GEMMA4.md). A session fixture downloads that sdist once
(PyPI is reachable in CI; nothing is built), extracts only those three files, converts the
vocabulary to a `tokenizer.json` with transformers' GGUF converter and caches the result under
~/.cache/larql-tests/ so later runs need no network.
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest
from llama_sdist import CACHE_ROOT, fetch_sdist

from larql.config import GEMMA4_26B_A4B
from larql.tokenizer import GEMMA4_CHAT_FALLBACK, TextTokenizer, TokenizerError, byte_level_tokenizer

VOCAB = "ggml-vocab-gemma-4.gguf"
CACHE = CACHE_ROOT / "gemma4-vocab"


def _fetch_vocab(dst: Path) -> None:
    sdist = fetch_sdist()
    wanted = {VOCAB, VOCAB + ".inp", VOCAB + ".out"}
    with tarfile.open(sdist) as tar:
        for member in tar:
            name = member.name.rsplit("/", 1)[-1]
            if member.isfile() and name in wanted and "/vendor/llama.cpp/models/" in member.name:
                (dst / name).write_bytes(tar.extractfile(member).read())  # never extractall
                wanted.discard(name)
    if wanted:
        raise RuntimeError(f"{sdist.name} does not contain {sorted(wanted)}")


@pytest.fixture(scope="session")
def gemma4_vocab() -> Path:
    """Directory with the GGUF vocab, its test vectors, tokenizer.json and chat_template.jinja."""
    CACHE.mkdir(parents=True, exist_ok=True)
    if not (CACHE / VOCAB).exists():
        _fetch_vocab(CACHE)
    if not (CACHE / "tokenizer.json").exists():
        from transformers.integrations.gguf.gguf_tokenizer_mapping import (
            convert_gguf_tokenizer,
            get_gguf_tokenizer,
        )

        arch, tok_dict, tok_config = get_gguf_tokenizer(str(CACHE / VOCAB))
        fast, _ = convert_gguf_tokenizer(arch, tok_dict)
        tmp = CACHE / "tokenizer.json.tmp"
        fast.save(str(tmp))
        (CACHE / "chat_template.jinja").write_text(tok_config.get("chat_template") or "")
        tmp.rename(CACHE / "tokenizer.json")
    if not (CACHE / "metadata.json").exists():
        # Parsing the GGUF's 262k-token and 515k-merge arrays takes about a minute: keep the
        # scalar and short-array metadata once.
        import gguf

        reader = gguf.GGUFReader(str(CACHE / VOCAB))
        meta = {"tokenizer.ggml.tokens.count": len(reader.fields["tokenizer.ggml.tokens"].data)}
        for key, f in reader.fields.items():
            if len(f.data) <= 64 and not key.startswith("tokenizer.chat_template"):
                meta[key] = f.contents()
        (CACHE / "metadata.json.tmp").write_text(json.dumps(meta))
        (CACHE / "metadata.json.tmp").rename(CACHE / "metadata.json")
    return CACHE


@pytest.fixture(scope="session")
def gemma4_tok(gemma4_vocab) -> TextTokenizer:
    template = (gemma4_vocab / "chat_template.jinja").read_text() or None
    return TextTokenizer.from_file(gemma4_vocab / "tokenizer.json", GEMMA4_26B_A4B["bos_token_id"],
                                   GEMMA4_26B_A4B["eos_token_ids"], template)


def vectors(vocab_dir: Path) -> list[tuple[str, list[int]]]:
    texts = (vocab_dir / (VOCAB + ".inp")).read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    outs = (vocab_dir / (VOCAB + ".out")).read_text(encoding="utf-8").split("\n")
    assert len(outs) >= len(texts) > 20
    return [(t, [int(x) for x in o.split()]) for t, o in zip(texts, outs[:len(texts)], strict=True)]


def test_encode_matches_llama_cpp_vectors(gemma4_tok, gemma4_vocab):
    bad = [(t, gemma4_tok.encode(t, add_bos=False), ids) for t, ids in vectors(gemma4_vocab)
           if gemma4_tok.encode(t, add_bos=False) != ids]
    assert not bad, bad[:3]


def test_bos_is_prepended_once(gemma4_tok):
    assert gemma4_tok.encode("Hello world") == [2, 9259, 1902]
    assert gemma4_tok.encode("<bos>Hello world") == [2, 9259, 1902]
    assert gemma4_tok.encode("") == [2]


def test_decode_round_trips_and_streams(gemma4_tok, gemma4_vocab):
    for text, ids in vectors(gemma4_vocab):
        assert gemma4_tok.decode(ids) == text
        stream = gemma4_tok.streamer()
        pieces = [stream.add(i) for i in ids] + [stream.flush()]
        assert "".join(pieces) == text
        if "\ufffd" not in text:
            assert not any("\ufffd" in p for p in pieces), pieces


def test_stop_ids_and_metadata_match_config_defaults(gemma4_tok, gemma4_vocab):
    """The vocab file's metadata is the real model's: check our Gemma 4 defaults against it."""
    metadata = json.loads((gemma4_vocab / "metadata.json").read_text())

    def meta(key):
        return metadata[key]

    d = GEMMA4_26B_A4B
    assert meta("tokenizer.ggml.bos_token_id") == d["bos_token_id"]
    assert meta("tokenizer.ggml.eos_token_id") in d["eos_token_ids"]
    assert meta("tokenizer.ggml.padding_token_id") == d["pad_token_id"]
    assert meta("tokenizer.ggml.tokens.count") == d["vocab_size"]
    # The end-of-turn token of the chat format is the other stop id.
    assert gemma4_tok.tok.token_to_id("<turn|>") in d["eos_token_ids"]
    assert gemma4_tok.stop_ids == frozenset(d["eos_token_ids"])
    assert meta("gemma4.block_count") == d["num_layers"]
    assert meta("gemma4.embedding_length") == d["hidden_size"]
    assert meta("gemma4.feed_forward_length") == d["intermediate_size"]
    assert meta("gemma4.expert_count") == d["num_experts"]
    assert meta("gemma4.expert_used_count") == d["top_k"]
    assert meta("gemma4.expert_feed_forward_length") == d["moe_intermediate_size"]
    assert meta("gemma4.attention.sliding_window") == d["sliding_window"]
    assert meta("gemma4.attention.key_length") == d["global_head_dim"]
    assert meta("gemma4.attention.key_length_swa") == d["head_dim"]
    assert meta("gemma4.rope.freq_base") == d["rope_theta_global"]
    assert meta("gemma4.rope.freq_base_swa") == d["rope_theta_local"]
    assert meta("gemma4.final_logit_softcapping") == d["final_logit_softcapping"]
    kv = meta("gemma4.attention.head_count_kv")
    sliding = meta("gemma4.attention.sliding_window_pattern")
    assert [k for k, s in zip(kv, sliding, strict=True) if s] == [d["num_kv_heads"]] * 25
    assert [k for k, s in zip(kv, sliding, strict=True) if not s] == [d["num_global_kv_heads"]] * 5
    assert [i for i, s in enumerate(sliding) if not s] == [5, 11, 17, 23, 29]


def test_chat_template_renders_like_the_builtin_fallback(gemma4_tok):
    assert gemma4_tok.chat_template, "the GGUF carries Gemma 4's chat template"
    text = gemma4_tok.render_chat("  What is the capital of France? ")
    assert text == GEMMA4_CHAT_FALLBACK.format(bos="<bos>", prompt="What is the capital of France?")
    ids = gemma4_tok.encode_chat("What is the capital of France?")
    assert ids[0] == 2 and ids.count(2) == 1
    assert ids[1] == gemma4_tok.tok.token_to_id("<|turn>")
    assert gemma4_tok.tok.token_to_id("<turn|>") in ids


def test_stream_decoder_holds_split_utf8_on_byte_tokens():
    """With one token per byte every multi-byte character is split across tokens."""
    tok = TextTokenizer(byte_level_tokenizer(), bos_id=2, eos_ids=[1])
    text = "né 🦙 日本"
    ids = tok.encode(text, add_bos=False)
    assert len(ids) == len(text.encode())
    stream = tok.streamer()
    pieces = [stream.add(i) for i in ids]
    assert "".join(pieces) + stream.flush() == text
    assert all("\ufffd" not in p for p in pieces)
    assert pieces[:2] == ["n", ""] and pieces[2] == "é"  # é's first byte is held back
    assert tok.stop_ids == frozenset({1})


CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": " Be brief. "}, {"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "  The capital of France?\n"}],
    [{"role": "developer", "content": "Rules."}, {"role": "user", "content": "a"},
     {"role": "assistant", "content": "<|channel>thought\nhmm<channel|>Paris."},
     {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}],
]


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_builtin_gemma4_renderer_equals_the_real_template(gemma4_tok, messages):
    """Vindexes without a chat template (and the demo's) get the same prompts as Gemma 4's."""
    builtin = TextTokenizer(gemma4_tok.tok, gemma4_tok.bos_id, [], chat_template=None)
    for gen in (True, False):
        assert builtin.render_chat(messages, gen) == gemma4_tok.render_chat(messages, gen)


def test_builtin_gemma4_renderer_refuses_what_it_cannot_write():
    tok = TextTokenizer(byte_level_tokenizer(), bos_id=2, eos_ids=[1])
    for messages, needle in [([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}],
                              "must come first"),
                             ([{"role": "tool", "content": "a"}], "unknown role"),
                             ([{"role": "user", "content": None}], "must be a string")]:
        with pytest.raises(TokenizerError, match=needle):
            tok.render_chat(messages)


def test_chat_turns_continue_the_real_template(gemma4_tok):
    """What `larql chat` appends after an answer, rendered by Gemma 4's own template."""
    from larql.chat import next_turn_text

    history = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
               {"role": "assistant", "content": "Hello."}]
    assert next_turn_text(gemma4_tok, history, "Again") == (
        "<turn|>\n<|turn>user\nAgain<turn|>\n<|turn>model\n<|channel>thought\n<channel|>")
    ids = gemma4_tok.encode(next_turn_text(gemma4_tok, history, "Again"), add_bos=False)
    assert ids[0] == gemma4_tok.tok.token_to_id("<turn|>") and 2 not in ids
