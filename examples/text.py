"""English prose that ships with Python itself, for calibration and evaluation text (no download)."""
def prose(count: int, seed: int = 0) -> list[str]:
    """`count` real English sentences from the documentation that ships with Python itself (stdlib
    docstrings, deterministic for a Python version): 8–30 words, no code, URLs or markup."""
    import importlib
    import inspect
    import random
    import re
    import warnings
    found: set[str] = set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in _DOCUMENTED:
            try:
                module = importlib.import_module(name)
            except Exception:  # noqa: BLE001 (an optional stdlib module missing here is fine)
                continue
            docs = [module.__doc__ or ""] + [obj.__doc__ for _, obj in inspect.getmembers(module)
                                             if isinstance(getattr(obj, "__doc__", None), str)
                                             and getattr(obj, "__module__", "") == module.__name__]
            for doc in docs:
                for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", re.sub(r"\s+", " ", doc).strip()):
                    if 8 <= len(s.split()) <= 30 and s.endswith(".") and not re.search(_CODE, s):
                        found.add(s)
    ordered = sorted(found)
    random.Random(seed).shuffle(ordered)
    if len(ordered) < count:
        raise SystemExit(f"only {len(ordered)} documentation sentences here, {count} asked")
    return ordered[:count]


_CODE = r"[>{}\[\]=_`|\\]|\(\)|::|http|\w\.\w"
_DOCUMENTED = ["argparse", "collections", "json", "logging", "email", "http.client", "urllib.request", "unittest",
               "csv", "decimal", "fractions", "statistics", "random", "datetime", "calendar", "textwrap", "difflib",
               "heapq", "bisect", "functools", "itertools", "pathlib", "shutil", "tempfile", "subprocess",
               "threading", "queue", "socket", "ssl", "sqlite3", "zipfile", "tarfile", "gzip", "pickle", "copy",
               "pprint", "enum", "dataclasses", "typing", "inspect", "ast", "tokenize", "string", "re", "os", "io",
               "codecs", "locale", "gettext", "smtplib", "ftplib", "imaplib", "xml.dom.minidom",
               "xml.etree.ElementTree", "html.parser", "configparser", "optparse", "getopt", "cmd", "shlex",
               "timeit", "trace", "pdb", "doctest", "abc", "contextlib", "weakref", "types", "operator", "numbers",
               "math", "cmath", "hashlib", "hmac", "secrets", "uuid", "base64", "binascii", "struct", "array",
               "mailbox", "mimetypes", "wave", "colorsys", "turtle"]
