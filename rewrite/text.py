"""Text in: plain-text or JSONL files (or Python strings) → token-id windows for calibration and evaluation.

A language model's users hold text, not token tensors. The text is tokenized with the model's own
tokenizer and cut into windows of `seq_len` tokens, each one batch of shape (1, seq_len). Evaluation
windows taken from the same text as calibration start where the calibration windows end, so a
perplexity is never measured on what the search saw.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rewrite.errors import RewriteError, first_line

SEQ_LEN = 512
MAX_BYTES = 64 * 2**20  # read at most this much of a text file: millions of tokens, far more than calibration needs
CHUNK = 2**20  # characters tokenized at a time, until the windows asked for are filled
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")


def read(path: str | Path, what: str) -> str:
    """The text of a plain-text file, or of a JSONL file's `text` fields (one document per line)."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            raw = handle.read(MAX_BYTES + 1)
    except OSError as exc:
        raise RewriteError(f"cannot read the {what} text {str(path)!r}: {exc.strerror or first_line(exc)}") from None
    cut = len(raw) > MAX_BYTES  # a larger file: its first MAX_BYTES serve (a gigabyte on one line included)
    raw = raw[:MAX_BYTES]
    if b"\0" in raw[:65536]:
        raise RewriteError(f"the {what} text {str(path)!r} is a binary file: give a UTF-8 text or JSONL file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        if not (cut and exc.start >= len(raw) - 3):
            raise RewriteError(f"the {what} text {str(path)!r} is not UTF-8 (byte {exc.start}): convert it, e.g. "
                               "iconv -t utf-8") from None
        text = raw[:exc.start].decode("utf-8")  # the cut fell inside a character
    if path.suffix == ".jsonl":
        text = "\n\n".join(_jsonl_texts(text.rpartition("\n")[0] if cut else text, path, what))
    if not text.strip():
        raise RewriteError(f"the {what} text {str(path)!r} is empty: give a file with text in it")
    return text


def _jsonl_texts(text: str, path: Path, what: str) -> list[str]:
    texts = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            raise RewriteError(f"line {number} of the {what} file {str(path)!r} is not JSON: a .jsonl file holds "
                               'one {"text": ...} object per line') from None
        if not (isinstance(record, dict) and isinstance(record.get("text"), str)):
            raise RewriteError(f"line {number} of the {what} file {str(path)!r} has no \"text\" string field")
        texts.append(record["text"])
    return texts


def inside(folder: Path, path: Path, what: str) -> None:
    """A file a checkpoint is read from must lie in its folder (see `is_inside`)."""
    if not is_inside(folder, path):
        raise RewriteError(f"{what} {str(path)!r} of the checkpoint leads outside its folder (to "
                           f"{str(path.resolve())!r}): a checkpoint reads only its own files; copy the real files "
                           "into the folder")


def is_inside(folder: Path, path: Path) -> bool:
    """Does `path` lie in `folder`? A link may lead out only the way the Hugging Face cache lays files out:
    snapshots/<revision>/name → ../../blobs/<hash>."""
    real, root = path.resolve(), folder.resolve()
    if real.is_relative_to(root):
        return True
    return root.parent.name == "snapshots" and path.is_symlink() and real.parent == (root.parent.parent / "blobs").resolve()


def tokenizer_for(model: Any, name_or_dir: Any = None, remote_code: bool = False) -> Any:
    """The tokenizer given (an object, a name or a folder), else the one beside the model's weights: a
    checkpoint folder's, or that of the folder its config was read from. Python files its config names
    (`auto_map`) run only with `remote_code`."""
    if name_or_dir is not None and not isinstance(name_or_dir, (str, Path)):
        return name_or_dir  # a tokenizer object
    if name_or_dir is None:
        candidates = [model] if isinstance(model, (str, Path)) else [
            getattr(getattr(model, "config", None), "_name_or_path", None)]
        name_or_dir = next((c for c in candidates if c and _has_tokenizer(Path(c))), None)
        if name_or_dir is None:
            raise RewriteError("text was given, but no tokenizer was found beside the model: give --tokenizer "
                               "NAME_OR_DIR (Python: tokenizer=...)")
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(str(name_or_dir), trust_remote_code=remote_code)
    except Exception as exc:
        if "trust_remote_code" in str(exc):
            raise RewriteError(f"the tokenizer {str(name_or_dir)!r} names Python code (auto_map) that loading it "
                               'would run: add --trust-remote-code if you trust its authors (Python: '
                               'trusted="remote-code")') from None
        raise RewriteError(f"cannot load the tokenizer {str(name_or_dir)!r} ({first_line(exc)}): give a folder "
                           "with tokenizer.json or tokenizer_config.json (--tokenizer)") from None


def _has_tokenizer(folder: Path) -> bool:
    return folder.is_dir() and any((folder / name).is_file() for name in TOKENIZER_FILES)


def windows(tokenizer: Any, text: str, seq_len: int, count: int, *, skip: int = 0, what: str = "calibration"
            ) -> list[tuple]:
    """Up to `count` token windows of `seq_len` ids (each a (1, seq_len) batch), after the first `skip`."""
    import torch
    if seq_len < 2:
        raise RewriteError(f"--seq-len {seq_len} is too short: give at least 2 tokens (default {SEQ_LEN})")
    ids = torch.tensor(_token_ids(tokenizer, text, (skip + count) * seq_len), dtype=torch.long)
    available = len(ids) // seq_len - skip
    if available < 1:
        after = f" after the {skip} calibration windows" if skip else ""
        raise RewriteError(f"the {what} text holds {len(ids)} tokens, fewer than one window of {seq_len}{after}: "
                           "give more text or a smaller --seq-len")
    starts = range(skip * seq_len, (skip + min(count, available)) * seq_len, seq_len)
    return [(ids[s:s + seq_len][None],) for s in starts]


def _token_ids(tokenizer: Any, text: str, need: int) -> list[int]:
    """The text's first `need` token ids (or all), tokenized a chunk at a time, each cut at a line or word
    break, so a huge text costs only what the windows use."""
    ids: list[int] = []
    start = 0
    while start < len(text) and len(ids) < need:
        end = len(text) if len(text) - start <= CHUNK else _break_before(text, start + CHUNK, start)
        ids.extend(tokenizer(text[start:end], add_special_tokens=False)["input_ids"])
        start = end
    return ids


def _break_before(text: str, end: int, start: int) -> int:
    """A cut at the last line break (else space) before `end`, within its chunk's second half."""
    half = start + (end - start) // 2
    for sep in ("\n", " "):
        at = text.rfind(sep, half, end)
        if at > half:
            return at
    return end


def is_texts(data: Any) -> bool:
    """A list of strings (the Python API's text form of calibration or evaluation data)."""
    return isinstance(data, (list, tuple)) and bool(data) and all(isinstance(t, str) for t in data)

