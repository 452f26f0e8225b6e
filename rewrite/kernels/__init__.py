"""Our torch.library custom ops. Each module registers its ops on import and offers ONNX translations."""


def onnx_translations() -> dict:
    """Every custom op's onnxscript translation, for torch.onnx.export(custom_translation_table=...)."""
    from rewrite.kernels import dgq
    return dict(dgq.onnx_translations())
