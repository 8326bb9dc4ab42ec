"""Tokenizers. ByteTokenizer (the presets'): token i < 256 is byte i; three specials follow; nothing to
download. HFTokenizer: a Hugging Face checkpoint's tokenizer.json and chat template, from a local directory."""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from vmem.errors import VmemInvalidArgument, VmemUnsupported

ROLES = ("system", "user", "assistant", "tool", "developer")


class ByteTokenizer:
    """UTF-8 bytes as tokens, plus ``<bos>`` (256), ``<eos>`` (257) and ``<pad>`` (258).

    encode(str) -> list[int]; decode(list[int]) -> str (specials dropped; a broken UTF-8 sequence, e.g.
    a stream cut mid-character, decodes to U+FFFD).
    """

    num_bytes = 256
    bos_id = 256
    eos_id = 257
    pad_id = 258
    vocab_size = 259
    special_tokens = {"<bos>": bos_id, "<eos>": eos_id, "<pad>": pad_id}

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise VmemInvalidArgument("encode takes a str, got %s" % type(text).__name__, op="tokenize")
        try:
            ids = list(text.encode("utf-8"))
        except UnicodeEncodeError as exc:    # a lone surrogate: valid in JSON and str, not in UTF-8
            raise VmemInvalidArgument("text is not valid UTF-8: %s" % exc, op="tokenize") from None
        return ([self.bos_id] if add_bos else []) + ids + ([self.eos_id] if add_eos else [])

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        data = bytearray()
        parts: list[str] = []
        for i in ids:
            i = int(i)
            if 0 <= i < self.num_bytes:
                data.append(i)
            elif not 0 <= i < self.vocab_size:
                raise VmemInvalidArgument("token id %d is outside the vocabulary [0, %d)" % (i, self.vocab_size),
                                          op="detokenize")
            elif not skip_special_tokens:
                parts.append(data.decode("utf-8", errors="replace"))
                data.clear()
                parts.append(self.id_to_special(i))
        parts.append(data.decode("utf-8", errors="replace"))
        return "".join(parts)

    def id_to_special(self, i: int) -> str:
        return {v: k for k, v in self.special_tokens.items()}[i]

    def apply_chat_template(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True) -> str:
        """messages [{"role": ..., "content": ...}] -> one prompt string::

            <|system|>
            You are terse.
            <|user|>
            Hi
            <|assistant|>
        """
        if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
            raise VmemInvalidArgument("messages must be a non-empty list of {role, content}", op="chat_template")
        lines = []
        for n, m in enumerate(messages):
            if not isinstance(m, Mapping) or "role" not in m:
                raise VmemInvalidArgument("message %d must be a mapping with a role and content" % n,
                                          op="chat_template")
            role, content = m["role"], m.get("content") or ""
            if role not in ROLES:
                raise VmemInvalidArgument("message %d has role %r; expected one of %s" % (n, role, ROLES),
                                          op="chat_template")
            if not isinstance(content, str):
                raise VmemInvalidArgument("message %d: content must be a string" % n, op="chat_template")
            lines.append("<|%s|>\n%s\n" % (role, content))
        if add_generation_prompt:
            lines.append("<|assistant|>\n")
        return "".join(lines)

    def __len__(self) -> int:
        return self.vocab_size


# ---------------------------------------------------------------------------------------------------------
# A checkpoint's own tokenizer

SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class HFTokenizer:
    """A Hugging Face checkpoint's tokenizer: ``tokenizer.json`` through the ``tokenizers`` library, the
    chat template rendered as transformers renders it, stop tokens from ``generation_config.json``.

    encode(text) -> list[int] as ``AutoTokenizer(text).input_ids`` (the post-processor's BOS included);
    apply_chat_template(messages) -> list[int] as transformers' ``apply_chat_template(messages,
    add_generation_prompt=True)`` (the rendered text encoded without special tokens added; tokenize=False
    returns the text); decode(ids) -> str.
    stop_token_ids: generation_config.json's eos_token_id (int or list), else config.json's, else the
    tokenizer's eos_token. Reads only local files: ``tokenizers`` and ``jinja2`` are the only imports.
    """

    def __init__(self, tokenizer, *, chat_template: str | None, special_tokens: dict[str, str],
                 stop_token_ids: Sequence[int], clean_up_tokenization_spaces: bool = False, name: str = ""):
        self._tok = tokenizer
        self.chat_template = chat_template
        self.special_tokens = dict(special_tokens)      # bos_token etc., as the template sees them
        self.stop_token_ids = frozenset(int(i) for i in stop_token_ids)
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces
        self.name = name
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self.bos_id = self._token_id(special_tokens.get("bos_token"))
        self.eos_id = min(self.stop_token_ids) if self.stop_token_ids else None
        self._template = None

    @classmethod
    def from_pretrained(cls, path) -> "HFTokenizer":
        """tokenizer.json (required), tokenizer_config.json, chat_template.jinja / chat_template.json,
        generation_config.json and config.json (optional) from the directory ``path``."""
        from pathlib import Path

        from vmem.engine.loader import read_json
        try:
            from tokenizers import Tokenizer
        except ImportError as exc:
            raise VmemUnsupported("a checkpoint's tokenizer needs the tokenizers package: pip install "
                                  "'vmem[hf]' (%s)" % exc) from None
        path = Path(path)
        if not (path / "tokenizer.json").is_file():
            raise VmemInvalidArgument("tokenizer.json is missing from %s (vmem reads only the fast tokenizer's "
                                      "tokenizer.json, not a sentencepiece tokenizer.model)" % path)
        try:
            tok = Tokenizer.from_file(str(path / "tokenizer.json"))
        except Exception as exc:      # the Rust side raises plain Exception
            raise VmemInvalidArgument("%s/tokenizer.json cannot be read: %s" % (path, exc)) from None
        tc = read_json(path / "tokenizer_config.json") if (path / "tokenizer_config.json").exists() else {}
        special = {k: _token_text(tc[k]) for k in SPECIAL_TOKEN_NAMES if tc.get(k) is not None}
        stop = _stop_ids(path, tok, special)
        # transformers 5 skips the clean-up for BPE models (it would strip real spaces) unless forced
        clean_up = bool(tc.get("clean_up_tokenization_spaces", False)) and (
            type(tok.model).__name__ != "BPE"
            or bool(tc.get("clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output", False)))
        return cls(tok, chat_template=_chat_template(path, tc), special_tokens=special, stop_token_ids=stop,
                   clean_up_tokenization_spaces=clean_up, name=str(path))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise VmemInvalidArgument("encode takes a str, got %s" % type(text).__name__, op="tokenize")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:    # a lone surrogate: valid in JSON and str, not in UTF-8
            raise VmemInvalidArgument("text is not valid UTF-8: %s" % exc, op="tokenize") from None
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise VmemInvalidArgument("token id %d is outside the vocabulary [0, %d)" % (bad[0], self.vocab_size),
                                      op="detokenize")
        text = self._tok.decode(ids, skip_special_tokens=skip_special_tokens)
        return _clean_up_tokenization(text) if self.clean_up_tokenization_spaces else text

    def apply_chat_template(self, messages: Sequence[Mapping], add_generation_prompt: bool = True,
                            tokenize: bool = True, **kwargs):
        """messages [{"role", "content"}, ...] -> token ids (tokenize=True) or the rendered text.
        kwargs reach the template (tools, documents, enable_thinking ...), after bos_token etc."""
        if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
            raise VmemInvalidArgument("messages must be a non-empty list of {role, content}", op="chat_template")
        if self.chat_template is None:
            raise VmemInvalidArgument("the checkpoint has no chat template (tokenizer_config.json chat_template "
                                      "or chat_template.jinja); use /v1/completions", op="chat_template")
        if self._template is None:
            self._template = compile_chat_template(self.chat_template)
        context = {"tools": None, "documents": None, **self.special_tokens, **kwargs}
        try:
            text = self._template.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                         **context)
        except Exception as exc:        # raise_exception() in the template, or its own error
            raise VmemInvalidArgument("chat template: %s" % exc, op="chat_template") from None
        return self.encode(text, add_special_tokens=False) if tokenize else text

    def id_to_token(self, i: int) -> str | None:
        return self._tok.id_to_token(int(i))

    def _token_id(self, text: str | None) -> int | None:
        return None if text is None else self._tok.token_to_id(text)

    def __len__(self) -> int:
        return self.vocab_size


def compile_chat_template(source: str):
    """The jinja2 template as transformers compiles it (utils/chat_template_utils.py): a sandboxed,
    immutable environment with trim_blocks and lstrip_blocks, the loopcontrols extension, the
    ``{% generation %}`` tag, ``tojson`` without HTML escaping (ensure_ascii, indent, separators, sort_keys),
    and the globals ``raise_exception`` and ``strftime_now``."""
    import datetime
    import json

    try:
        import jinja2
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as exc:
        raise VmemUnsupported("a checkpoint's chat template needs jinja2: pip install 'vmem[hf]' (%s)" % exc) from None

    class GenerationTag(jinja2.ext.Extension):
        """``{% generation %}...{% endgeneration %}`` marks assistant text for training masks; it renders its body."""
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(format):
        return datetime.datetime.now().strftime(format)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as exc:
        raise VmemInvalidArgument("the chat template does not parse: %s" % exc, op="chat_template") from None


def _token_text(value) -> str:
    """tokenizer_config.json writes a special token as a string or an AddedToken dict {"content": ...}."""
    return value["content"] if isinstance(value, Mapping) else str(value)


def _chat_template(path, tc: Mapping) -> str | None:
    """chat_template.jinja (transformers >= 4.43 saves it there), else chat_template.json, else
    tokenizer_config.json's chat_template; a list of named templates gives its "default"."""
    from vmem.engine.loader import read_json
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text(encoding="utf-8")
    template = read_json(path / "chat_template.json").get("chat_template") \
        if (path / "chat_template.json").is_file() else tc.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def _stop_ids(path, tok, special: Mapping[str, str]) -> list[int]:
    from vmem.engine.loader import read_json
    for name in ("generation_config.json", "config.json"):
        if (path / name).is_file():
            eos = read_json(path / name).get("eos_token_id")
            if eos is not None:
                ids = eos if isinstance(eos, list) else [eos]
                if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
                    raise VmemInvalidArgument("%s: eos_token_id must be an int or a list of ints, got %r"
                                              % (name, eos))
                return ids
    eos_id = tok.token_to_id(special["eos_token"]) if "eos_token" in special else None
    return [] if eos_id is None else [eos_id]


def _clean_up_tokenization(text: str) -> str:
    """transformers' clean_up_tokenization: no space before punctuation and English contractions."""
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                 (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(a, b)
    return text
