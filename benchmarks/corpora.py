"""Two corpora of English sentences from different sources, read from what every Python install has.

Calibration: docstrings of the standard library (API prose). Evaluation: the long descriptions in the
installed packages' metadata (project READMEs: installation, features, licences). Neither is in this
repository, they do not overlap, and the search never sees the second. Deterministic: modules and
distributions are read in sorted order.
"""
import importlib
import importlib.metadata
import inspect
import re
import sys
import warnings

STDLIB = ("argparse", "asyncio", "collections", "concurrent.futures", "csv", "datetime", "decimal", "email",
          "fractions", "functools", "heapq", "http.client", "inspect", "io", "json", "logging", "os",
          "pathlib", "pickle", "random", "re", "shutil", "socket", "sqlite3", "statistics", "string",
          "subprocess", "tarfile", "tempfile", "textwrap", "threading", "typing", "unittest", "urllib.request",
          "uuid", "xml.etree.ElementTree", "zipfile")
_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def _sentences(text: str, seen: set) -> list[str]:
    """Prose sentences of 6–40 words; code, tables, markup and repeats are dropped."""
    text = re.sub(r"\s+", " ", text)
    out = []
    for s in _SENTENCE.split(text):
        s = s.strip()
        words = s.split()
        if not 6 <= len(words) <= 40 or s in seen or not s[0].isupper() or not s.endswith("."):
            continue
        if sum(ch.isalpha() or ch == " " for ch in s) < 0.9 * len(s) or re.search(r"[<>{}\[\]=|#`*_]", s):
            continue
        seen.add(s)
        out.append(s)
    return out


def calibration_sentences(count: int) -> list[str]:
    """Standard-library docstring sentences, module by module."""
    seen, out = set(), []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in STDLIB:
            module = importlib.import_module(name)
            for _, obj in sorted(vars(module).items()):
                doc = inspect.getdoc(obj) if callable(obj) or inspect.ismodule(obj) else None
                if doc:
                    out += _sentences(doc, seen)
    return out[:count]


def evaluation_sentences(count: int) -> list[str]:
    """Sentences from installed packages' long descriptions (READMEs), another source than calibration."""
    seen, out = set(), []
    dists = sorted(importlib.metadata.distributions(), key=lambda d: (d.metadata["Name"] or "").lower())
    for dist in dists:
        body = dist.metadata.get_payload() or dist.metadata.get("Description") or ""
        out += _sentences(body, seen)
    return out[:count]


if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    for name, fn in (("calibration", calibration_sentences), ("evaluation", evaluation_sentences)):
        got = fn(100000)
        print(f"{name}: {len(got)} sentences")
        print("\n".join("  " + s for s in got[:n]))
