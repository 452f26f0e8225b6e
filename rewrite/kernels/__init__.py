"""Our torch.library custom ops. Each module registers its ops on import and offers ONNX translations."""


def register_all() -> None:
    """Import every kernel module so its ops exist (reading a saved program that calls them needs this)."""
    from rewrite.kernels import dgq  # noqa: F401  (registration is the import's side effect)


def onnx_translations() -> dict:
    """Every custom op's onnxscript translation, for torch.onnx.export(custom_translation_table=...)."""
    from rewrite.kernels import dgq
    return dict(dgq.onnx_translations())
