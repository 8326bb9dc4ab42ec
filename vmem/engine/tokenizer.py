"""Byte-level tokenizer: token i < 256 is byte i; three specials follow. Nothing to download."""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from vmem.errors import VmemInvalidArgument

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
