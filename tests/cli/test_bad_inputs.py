"""The bad-input corpus: what a tired user types at midnight, through the real CLI.

Every case must end in exit code 2, exactly one `error:` line naming the problem, no traceback, every
file the user gave byte-identical, no code from an untrusted file run, and nothing left at `-o`.
"""
from pathlib import Path

import pytest

from tests.hostile import assert_refused, make_workspace

REPO = Path(__file__).parents[2]

# (command line after `rewrite`, text the one error line must contain). {d} is the workspace folder.
OPT = ["optimize", "{d}/m.pt2"]
CASES = [
    # the pipeline spec
    (OPT + ["-p", "fold-bm"], "did you mean 'fold-bn'"),
    (OPT + ["-p", "fold-bn{rank=2}"], "has no option 'rank'"),
    (OPT + ["-p", "fold-bn{"], "missing '}'"),
    (OPT + ["-p", "fold-bn}x"], "unbalanced braces"),
    (OPT + ["-p", ""], "no passes given"),
    (OPT + ["-p", " , "], "no passes given"),
    (OPT + ["-p", "fold-bn{=1}"], "malformed option"),
    (OPT + ["-p", "fwsvd{param-ratio=abc}"], "must be"),
    (OPT + ["-p", "fwsvd{min-sqnr=nan}"], "finite"),
    (OPT + ["-p", "dgq{min-sqnr=inf}"], "finite"),
    (OPT + ["-p", "dgq{group=3}"], "group must be a positive even number"),
    (OPT + ["-p", "lowrank{blocks=0}"], "blocks must be"),
    (OPT + ["-p", "fwsvd{param-ratio=1.5}"], "param-ratio"),
    (OPT + ["-p", "t1{mode=fast}"], "one of"),
    (OPT + ["-p", "fwsvd", "--budget", "sqnr=nan"], "finite number"),
    (OPT + ["-p", "fwsvd", "--budget", "speed=2"], "malformed"),
    (OPT + ["-p", "fold-bn", "--budget", "sqnr=30"], "no pass in the pipeline searches"),
    (OPT + ["-p", "fwsvd", "--budget", "params=1.5"], "fraction of weights to keep"),
    # command-line syntax (click's errors, one line too)
    (OPT + ["-p", "fold-bn", "--seed", "abc"], "'--seed'"),
    (OPT + ["-p", "fold-bn", "--calib-batches", "abc"], "'--calib-batches'"),
    (OPT + ["-p", "fold-bn", "--no-such-flag"], "--no-such-flag"),
    (["optimize", "{d}/m.pt2"], "--passes SPEC, or a recipe.json"),
    (["frobnicate"], "frobnicate"),
    (["passes", "show", "nope"], "unknown pass 'nope'"),
    # counts and shapes
    (OPT + ["-p", "fold-bn", "--calib-batches", "0"], "whole number"),
    (OPT + ["-p", "fold-bn", "--calib-batches", "-3"], "whole number"),
    (OPT + ["-p", "fold-bn", "--input-shape", "2,3,x"], "malformed"),
    (OPT + ["-p", "fold-bn", "--input-shape", ""], "malformed"),
    (OPT + ["-p", "fold-bn", "--input-shape", "0,3,8,8"], "non-positive"),
    (OPT + ["-p", "fold-bn", "--input-shape", "100000,100000"], "GiB"),
    (OPT + ["-p", "fold-bn", "--input-shape", "2,5,8,8"], "rejects the example inputs"),
    # data files
    (OPT + ["-p", "fold-bn", "--inputs", "{d}/x_nan.pt"], "NaN or inf"),
    (OPT + ["-p", "fold-bn", "--inputs", "{d}/x_inf.pt"], "NaN or inf"),
    (OPT + ["-p", "fold-bn", "--inputs", "{d}/missing.pt"], "not found"),
    (OPT + ["-p", "fold-bn", "--inputs", "{d}/a_folder"], "is a folder"),
    (OPT + ["-p", "fold-bn", "--inputs", "{d}/corrupt.pt"], "not readable"),
    (OPT + ["-p", "fold-bn", "--inputs", "{d}/empty.pt"], "not readable"),
    (OPT + ["-p", "fold-bn", "--inputs", "{d}/strings.pt"], "wrong structure"),
    (OPT + ["-p", "fold-bn", "--inputs", "{d}/evil.pt"], "not readable"),
    (OPT + ["-p", "fold-bn", "--calib", "{d}/nan.pt"], "NaN or inf"),
    (OPT + ["-p", "fold-bn", "--calib", "{d}/strings.pt"], "wrong structure"),
    (OPT + ["-p", "fold-bn", "--calib", "{d}/missing.pt"], "not found"),
    (OPT + ["-p", "fold-bn", "--calib", "{d}/empty_list.pt"], "empty"),
    (OPT + ["-p", "fold-bn", "--calib", "{d}/evil.pt"], "not readable"),
    (OPT + ["-p", "fold-bn", "--eval", "{d}/x.pt", "--metric", "top1"], "no targets"),
    (OPT + ["-p", "fold-bn", "--eval", "{d}/eval.pt"], "without a metric"),
    (OPT + ["-p", "fold-bn", "--eval", "{d}/eval.pt", "--metric", "f1"], "unknown metric 'f1'"),
    (OPT + ["-p", "fold-bn", "--eval", "{d}/eval_batches.pt", "--metric", "top1"], "target batch"),
    (OPT + ["-p", "fold-bn", "--eval", "{d}/eval_samples.pt", "--metric", "top1"], "must line up"),
    (OPT + ["-p", "fold-bn", "--emit", "tflite"], "unknown emitter 'tflite'"),
    (OPT + ["-p", "fold-bn", "--recover", "steps=abc"], "steps"),
    (OPT + ["-p", "fold-bn", "--recover", "steps=-5"], "steps"),
    (OPT + ["-p", "fold-bn", "--recover", "speed=1"], "speed"),
    # output folders
    (OPT + ["-p", "fold-bn", "-o", "{d}/afile"], "is a file"),
    (OPT + ["-p", "fold-bn", "-o", "{d}/afile/sub"], "lies below the file"),
    (OPT + ["-p", "fold-bn", "-o", "{d}/full"], "already holds files"),
    (OPT + ["-p", "fold-bn", "-o", "{d}/theirs", "--force"], "was not written by rewrite"),
    (["optimize", "{d}/theirs/model.pt2", "-p", "fold-bn", "-o", "{d}/theirs", "--force"], "inside the output folder"),
    # model files
    (["optimize", "{d}/missing.pt", "-p", "fold-bn"], "not found"),
    (["optimize", "HuggingFaceTB/SmolLM2-135M", "-p", "dgq"], "hub are not downloaded"),
    (["optimize", "{d}/a_folder", "-p", "fold-bn"], "is a folder"),
    (["optimize", "{d}/corrupt.pt", "-p", "fold-bn", "--inputs", "{d}/x.pt"], "cannot read model file"),
    (["optimize", "{d}/state.pt", "-p", "fold-bn", "--inputs", "{d}/x.pt"], "holds a state_dict"),
    (["optimize", "{d}/x.pt", "-p", "fold-bn", "--inputs", "{d}/x.pt"], "not a torch.nn.Module"),
    (["optimize", "{d}/evil.pt", "-p", "fold-bn", "--inputs", "{d}/x.pt"], "--trust-pickle"),
    (["optimize", "{d}/model.pt", "-p", "fold-bn", "--inputs", "{d}/x.pt"], "--trust-pickle"),
    (["optimize", "{d}/evil.pt2", "-p", "fold-bn"], "--trust-pickle"),
    (["optimize", "{d}/truncated.pt2", "-p", "fold-bn"], "not a readable .pt2"),
    (["optimize", "{d}/garbage.pt2", "-p", "fold-bn"], "not a readable .pt2"),
    (["optimize", "{d}/model.pt", "-p", "fold-bn", "--trust-pickle"], "no example inputs"),
    (["optimize", "{repo}/examples/cnn.py", "-p", "fold-bn"], "examples/cnn.py:build"),
    (["optimize", "{d}/factories.py:raises", "-p", "fold-bn"], "checkpoint shard 3 is missing"),
    (["optimize", "{d}/factories.py:wrong_tuple", "-p", "fold-bn"], "a tuple of 4"),
    (["optimize", "{d}/factories.py:needs_args", "-p", "fold-bn"], "needs arguments (width)"),
    (["optimize", "{d}/factories.py:returns_none", "-p", "fold-bn"], "returned a NoneType"),
    (["optimize", "{d}/factories.py:nothing_here", "-p", "fold-bn"], "has no callable 'nothing_here'"),
    (["optimize", "{d}/bad_syntax.py:build", "-p", "fold-bn"], "cannot import"),
    (["optimize", "no_such_pkg_xyz.mod:build", "-p", "fold-bn"], "cannot import"),
    (["optimize", "{d}/factories.py:specialized", "-p", "fold-bn", "--calib-batches", "2",
      "--calib", "{d}/calib_b2.pt"], "captured for (8, 4)"),
    # tune and recipes
    (["tune", "{d}/m.pt2", "--target", "latency=abc"], "--target"),
    (["tune", "{d}/m.pt2", "--target", "speed=2"], "--target"),
    (["tune", "{d}/m.pt2", "--target", "latency=-1"], "fraction"),
    (["tune", "{d}/m.pt2", "--time", "soon"], "--time"),
    (["tune", "{d}/m.pt2", "--time", "0s"], "--time"),
    (["tune", "{d}/m.pt2", "--backend", "tensorrt"], "choose torch or onnxruntime"),
    (["optimize", "{d}/m.pt2", "--recipe", "{d}/missing.json"], "not a recipe.json"),
    (["optimize", "{d}/m.pt2", "--recipe", "{d}/x.pt"], "not a recipe.json"),
    (["optimize", "{d}/m.pt2", "--recipe", "{d}/x.pt", "-p", "fold-bn"], "one of them"),
    # diff
    (["diff", "{d}/m.pt2", "{d}/missing.pt2"], "not found"),
    (["diff", "{d}/evil.pt", "{d}/m.pt2"], "--trust-pickle"),
    (["diff", "{d}/m.pt2", "{d}/evil.pt2"], "--trust-pickle"),
    (["diff", "{d}/m.pt2", "{d}/factories.py:two_outputs"], "differ in structure"),
    (["diff", "{d}/model.pt", "{d}/model.pt", "--trust-pickle"], "no example inputs"),
    (["diff", "{d}/m.pt2", "{d}/m.pt2", "--inputs", "{d}/x_nan.pt"], "NaN or inf"),
]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    d = make_workspace(tmp_path_factory.mktemp("hostile"))
    import torch
    torch.save([torch.randn(2, 4)], d / "calib_b2.pt")
    return d


@pytest.mark.parametrize("args, text", CASES, ids=[f"{i:02d}" for i in range(len(CASES))])
def test_bad_input_is_one_line_exit_2_and_touches_nothing(workspace, args, text, monkeypatch):
    monkeypatch.chdir(workspace)  # the default output folder (rewrite-out/...) would land here
    argv = [a.replace("{d}", str(workspace)).replace("{repo}", str(REPO)) for a in args]
    if argv[0] == "optimize" and "-o" not in argv:
        argv += ["-o", str(workspace / "out")]
    assert_refused(argv, text, workspace)


def test_the_corpus_is_large():
    assert len(CASES) >= 60
