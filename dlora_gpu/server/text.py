"""Text in and out of token ids: the checkpoint's own tokenizer (no download), or none at all.

Without a tokenizer the server still serves token-id prompts (and returns token ids); a text prompt
or a chat then gets a 400 that says why.
"""
from __future__ import annotations

from pathlib import Path

from dlora_sim.core.errors import UserError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


class TokenizerError(ValueError, UserError):
    """`server.tokenizer` names no usable tokenizer folder."""


def check_tokenizer_folder(folder: str | Path) -> Path:
    """`folder`, if it holds a tokenizer's files; TokenizerError naming it otherwise."""
    folder = Path(folder)
    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise TokenizerError(f"server.tokenizer: {folder} holds no tokenizer ({', '.join(TOKENIZER_FILES)})")
    return folder


class Text:
    """A Hugging Face tokenizer read from a local folder (`transformers`, local files only)."""

    def __init__(self, folder: str | Path):
        folder = check_tokenizer_folder(folder)
        try:
            from transformers import AutoTokenizer
        except ImportError:
            raise TokenizerError("server.tokenizer: reading a tokenizer needs `transformers` (the `server` extra: "
                                 "make install-server)") from None
        try:
            self.tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        except (OSError, ValueError) as e:
            raise TokenizerError(f"server.tokenizer: {folder}: {e}") from None
        self.folder = folder
        self.eos = self.tok.eos_token_id
        self.chat = bool(getattr(self.tok, "chat_template", None))

    def encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text))

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def chat_prompt(self, messages: list[dict]) -> list[int]:
        text = self.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return list(self.tok.encode(text, add_special_tokens=False))


def find_tokenizer(tokenizer: str | None, checkpoint: str | None) -> Text | None:
    """`server.tokenizer` if set, else the checkpoint's folder when it holds one, else None."""
    if tokenizer is not None:
        return Text(tokenizer)
    if checkpoint is not None and any((Path(checkpoint) / f).is_file() for f in TOKENIZER_FILES):
        return Text(checkpoint)
    return None


class Detokenizer:
    """A stream's new text, a token at a time, in constant work per token: the tokens since the last
    text given out are decoded with and without the newest one (a tokenizer may merge or clean up
    across token boundaries) and the difference is the new text. A token that ends inside a multi-byte
    character yields nothing until the character is complete; `rest` gives what is left at the end."""

    def __init__(self, text: Text | None):
        self.text, self.ids = text, []
        self._prefix = self._read = 0   # ids[prefix:read] is the context already given out as text

    def add(self, token: int) -> str:
        if self.text is None:
            return ""
        self.ids.append(token)
        return self._new(final=False)

    def rest(self) -> str:
        """The text not given out yet (a character left incomplete), once the stream has ended."""
        return self._new(final=True) if self.text is not None and self._read < len(self.ids) else ""

    def _new(self, final: bool) -> str:
        before = self.text.decode(self.ids[self._prefix:self._read])
        after = self.text.decode(self.ids[self._prefix:])
        if len(after) > len(before) and (final or not after.endswith("\ufffd")):
            self._prefix, self._read = self._read, len(self.ids)
            return after[len(before):]
        return ""
