"""Tokenizer: the vindex's `tokenizer.json` through Hugging Face `tokenizers`.

`TextTokenizer` adds what generation needs on top: BOS handling, the chat template, the ids
that stop generation, and `StreamDecoder`, which turns a growing list of ids into text pieces
without ever printing half of a multi-byte UTF-8 character.

`byte_level_tokenizer` builds a small stand-in (specials + 256 byte tokens) for random demo
and test models, so nothing has to be downloaded to run end to end.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from .errors import LarqlError

# Gemma's special ids: the byte tokens follow them.
SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>"]

# Tokens that end a chat turn in the Gemma families (Gemma 4 writes "<turn|>").
END_OF_TURN_TOKENS = ("<turn|>", "<end_of_turn>")

# Gemma 4's turn format for one user message (thinking disabled: an empty thought channel opens
# the model turn). `render_gemma4_turns` writes it for any conversation when the vindex has no
# chat_template.jinja or jinja2 is not installed.
GEMMA4_CHAT_FALLBACK = "{bos}<|turn>user\n{prompt}<turn|>\n<|turn>model\n<|channel>thought\n<channel|>"


def render_gemma4_turns(messages: list[dict], bos: str, add_generation_prompt: bool = True) -> str:
    """Gemma 4's turn format for plain text conversations (no tools, thinking disabled), as the
    official template renders them: a leading system/developer message becomes the system turn,
    "assistant" is the "model" role, contents are trimmed, and a model turn's thought channels
    are dropped from the history."""
    out = [bos]
    for i, msg in enumerate(messages):
        role = msg.get("role")
        content = msg.get("content")
        if not isinstance(content, str):
            raise TokenizerError(f"message {i}: content must be a string, not {type(content).__name__}")
        if role in ("system", "developer"):
            if i:
                raise TokenizerError(f"message {i}: a {role} message must come first")
            role = "system"
        elif role == "assistant":
            role, content = "model", _strip_thoughts(content)
        elif role != "user":
            raise TokenizerError(f"message {i}: unknown role {role!r} (system, user or assistant)")
        out.append(f"<|turn>{role}\n{content.strip()}<turn|>\n")
    if add_generation_prompt:
        out.append("<|turn>model\n<|channel>thought\n<channel|>")
    return "".join(out)


def _strip_thoughts(text: str) -> str:
    """Drop every "<|channel>...<channel|>" span (a model turn's thinking)."""
    kept = []
    for part in text.split("<channel|>"):
        kept.append(part.split("<|channel>")[0] if "<|channel>" in part else part)
    return "".join(kept)


class TokenizerError(LarqlError, ValueError):
    """The tokenizer file or chat template could not be used."""


def byte_level_tokenizer() -> Tokenizer:
    """A 260-token byte-level tokenizer: ids 0-3 are pad/eos/bos/unk, then one token per byte."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    return tok


class TextTokenizer:
    """Encode/decode for generation: BOS prepended, chat template, stop ids."""

    def __init__(self, tok: Tokenizer, bos_id: int | None, eos_ids: list[int] | tuple[int, ...] = (),
                 chat_template: str | None = None) -> None:
        self.tok = tok
        self.bos_id = bos_id
        self.chat_template = chat_template
        stop = {int(i) for i in eos_ids}
        for name in END_OF_TURN_TOKENS:
            tid = tok.token_to_id(name)
            if tid is not None:
                stop.add(tid)
        self.stop_ids: frozenset[int] = frozenset(stop)

    @classmethod
    def from_file(cls, path: str | Path, bos_id: int | None = 2, eos_ids=(1,),
                  chat_template: str | None = None) -> TextTokenizer:
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on a malformed file
            raise TokenizerError(f"cannot read tokenizer {path}: {e}") from None
        return cls(tok, bos_id, eos_ids, chat_template)

    @classmethod
    def from_vindex(cls, vindex) -> TextTokenizer:
        path = vindex.tokenizer_path
        if path is None:
            raise TokenizerError(f"vindex {vindex.path} has no tokenizer.json")
        cfg = vindex.config
        return cls.from_file(path, cfg.bos_token_id, cfg.eos_ids, vindex.chat_template)

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Token ids of `text`, with BOS first when add_bos (never twice)."""
        ids = self.tok.encode(text, add_special_tokens=False).ids
        if add_bos and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id, *ids]
        return ids

    def decode(self, ids, skip_special: bool = True) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def token_text(self, tid: int) -> str | None:
        return self.tok.id_to_token(int(tid))

    # -- chat --------------------------------------------------------------------------------
    def render_chat(self, messages: list[dict] | str, add_generation_prompt: bool = True) -> str:
        """The prompt text for a conversation (a str is one user message)."""
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        bos = self.token_text(self.bos_id) if self.bos_id is not None else ""
        if self.chat_template:
            try:
                from jinja2.sandbox import ImmutableSandboxedEnvironment
            except ImportError:
                pass
            else:
                return _render_jinja(self.chat_template, messages, bos or "", add_generation_prompt,
                                     ImmutableSandboxedEnvironment)
        return render_gemma4_turns(messages, bos or "", add_generation_prompt)

    def encode_chat(self, messages: list[dict] | str) -> list[int]:
        # The template writes the BOS token itself; encode() only adds one if it is missing.
        return self.encode(self.render_chat(messages), add_bos=True)

    def streamer(self) -> StreamDecoder:
        return StreamDecoder(self)


def _render_jinja(template: str, messages: list[dict], bos: str, add_generation_prompt: bool, env_cls) -> str:
    """Render a Hugging Face chat template in jinja2's sandbox (templates come from disk)."""
    from jinja2 import TemplateError

    def raise_exception(message: str):
        raise TemplateError(message)

    env = env_cls(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template).render(
            messages=messages, bos_token=bos, add_generation_prompt=add_generation_prompt,
            eos_token="", tools=None,
        )
    except TemplateError as e:
        raise TokenizerError(f"chat template failed: {e}") from None


class StreamDecoder:
    """Incremental detokenizer: `add(id)` returns the text that became final, possibly ''.

    Decoding tokens one at a time breaks characters whose UTF-8 bytes span several tokens (byte
    fallback), and some decoders treat the first token of a sequence specially (a leading
    space). So it decodes a short window that starts a few tokens back and emits only the part
    beyond what it already printed, holding text back while it ends in U+FFFD (an incomplete
    character).
    """

    def __init__(self, tokenizer: TextTokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0   # window start: text of ids[prefix:read] was already emitted
        self.read = 0

    def add(self, tid: int) -> str:
        self.ids.append(int(tid))
        dec = self.tokenizer.decode
        done = dec(self.ids[self.prefix:self.read])
        text = dec(self.ids[self.prefix:])
        if len(text) > len(done) and not text.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return text[len(done):]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character prints as U+FFFD)."""
        done = self.tokenizer.decode(self.ids[self.prefix:self.read])
        text = self.tokenizer.decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return text[len(done):] if len(text) > len(done) else ""

    @property
    def text(self) -> str:
        return self.tokenizer.decode(self.ids)
