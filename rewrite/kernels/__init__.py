"""Custom ops: each kernel module registers its torch.library ops on import and offers ONNX translations.

They are found through the `rewrite.onnx_translations` entry-point group (ours and plugins' alike), so
the ONNX emitter and the program loader never import a pass.
"""
from rewrite import registry

GROUP = "rewrite.onnx_translations"


def register_all() -> None:
    """Import every kernel module so its ops exist (reading a saved program that calls them needs this)."""
    for entry in registry.registered(GROUP).values():
        entry.load()


def onnx_translations() -> dict:
    """Every custom op's onnxscript translation, for torch.onnx.export(custom_translation_table=...)."""
    table: dict = {}
    for entry in registry.registered(GROUP).values():
        table.update(entry.load()())
    return table
