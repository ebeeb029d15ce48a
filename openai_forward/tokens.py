"""Token counts for limits and estimates: exact when tiktoken has the encoding, else a heuristic.

``count_text`` never does I/O: tiktoken downloads an encoding on first use, so encodings are
loaded only by ``preload`` (run in a thread at startup). A model whose encoding is loaded is
counted exactly; every other model, and every model when tiktoken is not installed or could
not download, gets the heuristic below.

The heuristic, by Unicode code point. Figures are estimate / real count against cl100k_base
(the encoding available offline) on English, code, JSON and 20 other languages; o200k_base,
used by current models, needs fewer tokens outside English, which moves those figures up:

* characters that take 3 or 4 bytes in UTF-8 (CJK ideographs, Hiragana/Katakana, Hangul,
  Thai, Devanagari, emoji, typographic punctuation) count 1 token each (a 4-byte one counts
  2): measured 0.83 to 0.97 of the real count for Chinese, Japanese, Thai and Hindi, and
  0.75 to 0.84 for Korean;
* characters that take 2 bytes (Latin with diacritics, Greek, Cyrillic, Hebrew, Arabic)
  count 1 token per 2: Russian 1.0, Ukrainian 0.78, Arabic 0.61, Greek 0.51;
* ASCII counts 1 token per 4 characters, rounded up: English prose 0.9 to 1.1, code 1.2,
  JSON 0.86, German/French/Spanish 0.8 to 0.9, long runs of numbers 0.5 (3 digits a token);
* a text of at most 256 characters counts at least 1 token per whitespace-separated word,
  where rounding matters most ("1 2 3 4 5").

Requests: ``estimate_prompt`` adds 3 tokens per message and 3 for the reply, 1 for a
``name``, 765 per image or file part, 200 per audio part (its length is unknown), and the
JSON text of tool definitions and tool calls; a body of no known shape counts its JSON
text / 4.
"""

from __future__ import annotations

import fnmatch
import logging
import math
from collections.abc import Iterable
from typing import Any, Protocol

import orjson

log = logging.getLogger("openai_forward")

HEURISTIC = "heuristic"
MESSAGE_TOKENS = 3  # each message is framed as <|start|>{role}<|message|>...<|end|>
REPLY_TOKENS = 3  # every reply is primed with <|start|>assistant<|message|>
IMAGE_TOKENS = 765  # a high-detail 1024x1024 image; the size is not known here
AUDIO_TOKENS = 200  # 100 a second, the length is not known here: 2 s
SHORT_TEXT = 256
_IMAGE_PARTS = frozenset({"image_url", "input_image", "image", "file", "input_file"})
_AUDIO_PARTS = frozenset({"input_audio", "audio"})
_RESOLVED_MAX = 4096


class Encoder(Protocol):
    """What is used of a ``tiktoken.Encoding``."""

    def encode_ordinary(self, text: str) -> list[int]: ...


# encoding name -> loaded encoding (written by preload only)
_loaded: dict[str, Encoder] = {}
# model glob -> encoding injected by use_encoding
_injected: dict[str, Encoder] = {}
# model -> encoding or None (heuristic); replaced whole when the above change, so a lookup
# racing with preload's thread writes into a dict that is already discarded
_resolved: dict[str, Encoder | None] = {}


def count_text(text: str, model: str | None) -> int:
    """Tokens in ``text`` for ``model``: exact if its encoding is loaded, else heuristic."""
    if not text:
        return 0
    encoder = _encoder_for(model) if model else None
    if encoder is not None:
        try:
            return len(encoder.encode_ordinary(text))
        except Exception:  # a broken injected encoder must not break a request
            log.debug("token count failed for model %r", model, exc_info=True)
    return heuristic_count(text)


def heuristic_count(text: str) -> int:
    """The heuristic of the module docstring; no encoding involved."""
    size = len(text)
    if text.isascii():
        tokens = -(-size // 4)
    else:
        ascii_chars = len(text.encode("ascii", "ignore"))
        # utf-8 bytes = a + 2*b + 3*c + 4*d for a+b+c+d characters of 1..4 bytes
        wide = len(text.encode("utf-8", "surrogatepass")) - 2 * size + ascii_chars  # c + 2d
        two_byte = size - ascii_chars - wide
        tokens = wide + math.ceil((ascii_chars + 2 * max(two_byte, 0)) / 4)
    if size <= SHORT_TEXT:
        tokens = max(tokens, len(text.split()))
    return tokens


def estimate_completion(text: str, model: str | None) -> int:
    """Tokens of generated text (``count_text``)."""
    return count_text(text, model)


# --------------------------------------------------------------------------------------------
# Encodings


def preload(models: Iterable[str]) -> dict[str, str]:
    """Load the tiktoken encoding of each model (may download: run it in a thread).

    Returns model -> encoding name, or "heuristic" when tiktoken is not installed, the model
    is not an OpenAI one, or loading failed (normal offline). Never raises.
    """
    names = {model: _encoding_name(model) for model in models}
    try:
        import tiktoken
    except ImportError:
        log.debug("tiktoken is not installed: token counts are estimated")
        return dict.fromkeys(names, HEURISTIC)
    result: dict[str, str] = {}
    for model, name in names.items():
        result[model] = name if name is not None and _load(tiktoken, name) else HEURISTIC
    _forget_models()
    return result


def use_encoding(model_glob: str, encoding: Encoder | None) -> None:
    """Count models matching ``model_glob`` (fnmatch, case-sensitive) with ``encoding``;
    None removes the glob. Injected globs win over preloaded encodings (tests, custom
    tokenizers)."""
    if encoding is None:
        _injected.pop(model_glob, None)
    else:
        _injected[model_glob] = encoding
    _forget_models()


def _load(tiktoken: Any, name: str) -> bool:
    if name in _loaded:
        return True
    try:
        _loaded[name] = tiktoken.get_encoding(name)
    except Exception as exc:  # offline, no cache, unknown name: all normal
        log.debug("tiktoken encoding %s not loaded: %s", name, exc)
        return False
    return True


def _forget_models() -> None:
    global _resolved
    _resolved = {}


def _encoder_for(model: str) -> Encoder | None:
    resolved = _resolved
    try:
        return resolved[model]
    except KeyError:
        pass
    encoder = next((e for g, e in _injected.items() if fnmatch.fnmatchcase(model, g)), None)
    if encoder is None and _loaded:
        name = _encoding_name(model)
        encoder = _loaded.get(name) if name is not None else None
    if len(resolved) >= _RESOLVED_MAX:  # model names come from clients: stay bounded
        resolved.clear()
    resolved[model] = encoder
    return encoder


def _encoding_name(model: str) -> str | None:
    base = model.rsplit("/", 1)[-1]  # "openai/gpt-4o" as routers spell it
    try:
        from tiktoken.model import encoding_name_for_model

        return encoding_name_for_model(base)
    except (ImportError, KeyError):
        pass
    if base.startswith(("gpt-3.5", "gpt-35")) or base == "gpt-4" or base.startswith("gpt-4-"):
        return "cl100k_base"
    if base.startswith(("gpt-", "chatgpt-", "codex-")) or _is_o_series(base):
        return "o200k_base"
    return None


def _is_o_series(name: str) -> bool:
    return len(name) >= 2 and name[0] == "o" and name[1].isdigit() and name[2:3] in ("", "-")


# --------------------------------------------------------------------------------------------
# Request bodies


def estimate_prompt(obj: dict[str, Any], model: str | None) -> int:
    """Prompt tokens of a parsed request body: chat ``messages``, completions ``prompt``,
    embeddings ``input``, Responses ``input`` + ``instructions``; tools counted as JSON text.
    Any other shape counts its JSON text / 4. Never raises."""
    try:
        if not isinstance(obj, dict):
            return _fallback(obj)
        if isinstance(obj.get("messages"), list):
            total = REPLY_TOKENS + sum(_item(m, model) for m in obj["messages"])
        elif "input" in obj:
            total = _input(obj["input"], model) + count_text(_str(obj.get("instructions")), model)
        elif "prompt" in obj:
            total = _input(obj["prompt"], model)
        else:
            return _fallback(obj)
        return total + _tools(obj, model)
    except Exception:
        log.debug("prompt estimate failed", exc_info=True)
        return _fallback(obj)


def reserve_prompt(body: bytes | None, obj: dict[str, Any]) -> int:
    """Prompt tokens to reserve for a request before it is sent: ``estimate_prompt`` with no
    model, or, for an ASCII body without inline media (``body`` given), a quarter of its bytes,
    which is close to the heuristic (its keys, quotes and escapes count a little above the
    text) at a fraction of the cost. Media (base64 data, audio) are counted by their parts.
    Never raises."""
    if (
        body is not None
        and body.isascii()
        and body.find(b";base64,") < 0
        and body.find(b'"input_audio"') < 0
    ):
        return len(body) // 4
    return estimate_prompt(obj, None)


def _fallback(obj: object) -> int:
    try:
        return -(-len(orjson.dumps(obj)) // 4)
    except Exception:
        return 0


def _tools(obj: dict[str, Any], model: str | None) -> int:
    return sum(_json(obj[key], model) for key in ("tools", "functions") if obj.get(key))


def _input(value: object, model: str | None) -> int:
    """A prompt/input: text, token ids, a list of texts, of token-id lists, or of items."""
    if isinstance(value, list):
        if value and all(_is_int(v) for v in value):
            return len(value)
        return sum(_item(v, model) for v in value)
    return _item(value, model)


def _item(value: object, model: str | None) -> int:
    if isinstance(value, str):
        return count_text(value, model)
    if isinstance(value, list):  # a list of token ids
        return len(value)
    if _is_int(value):
        return 1
    if not isinstance(value, dict):
        return 0
    total = MESSAGE_TOKENS
    for key, field in value.items():
        if key == "content":
            total += _content(field, model)
        elif isinstance(field, str):
            total += count_text(field, model) + int(key == "name")
        elif isinstance(field, (list, dict)):  # tool_calls, function_call, ...
            total += _json(field, model)
    return total


def _content(value: object, model: str | None) -> int:
    if isinstance(value, str):
        return count_text(value, model)
    if isinstance(value, list):
        return sum(_part(part, model) for part in value)
    return 0


def _part(part: object, model: str | None) -> int:
    if isinstance(part, str):
        return count_text(part, model)
    if not isinstance(part, dict):
        return 0
    kind = part.get("type")
    if kind in _IMAGE_PARTS:
        return IMAGE_TOKENS
    if kind in _AUDIO_PARTS:
        return AUDIO_TOKENS
    text = part.get("text", part.get("refusal"))
    if isinstance(text, str):
        return count_text(text, model)
    return _json(part, model)


def _json(value: object, model: str | None) -> int:
    return count_text(orjson.dumps(value).decode(), model)


def _str(value: object) -> str:
    return value if isinstance(value, str) else ""


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
