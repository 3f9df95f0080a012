"""Numeric options out of range and outputs that cannot be created: one line, exit 2, nothing
written, and before any work (a traceback from numpy or mkdir used to be the answer)."""

import pytest
from helpers import error_line, run_cli


@pytest.fixture
def a_file(tmp_path):
    path = tmp_path / "a-file"
    path.write_text("not a folder")
    return path


CASES = {
    "negative sample count": (["prepare", "-c", "sample", "-o", "{out}", "--max-samples", "-5"],
                              "max_samples must be a whole number of at least 0; got -5"),
    "negative seed": (["prepare", "-c", "sample", "-o", "{out}", "--seed", "-1"],
                      "seed must be a whole number from 0 to 4294967295; got -1"),
    "prepare output under a file": (["prepare", "-c", "sample", "-o", "{file}/out"],
                                    "output {file}/out cannot be created: {file} is a file"),
    "tokenize output under a file": (["tokenize", "-d", "{data}", "-o", "{file}/tok", "-m", "minilm"],
                                     "output {file}/tok cannot be created: {file} is a file"),
    "negative training seed": (["train", "-t", "{data}", "-o", "{out}", "-m", "minilm", "--set", "seed=-1"],
                               "plan for minilm: seed: Input should be greater than or equal to 0"),
    "compile output under a file": (["compile", "-o", "{file}/pipeline.yaml"],
                                    "output {file}/pipeline.yaml cannot be created: {file} is a file"),
    "compile output a folder": (["compile", "-o", "{data}"],
                                "output {data} is a folder; give a file name, e.g. {data}/pipeline.yaml"),
    "negative GPU count": (["compile", "-o", "{out}.yaml", "--gpus", "-1"],
                           "--gpus must be a whole number from 0 to 64; got -1"),
    "no nodes": (["run", "--param", "nodes=0", "--output-root", "{out}"],
                 "nodes must be a whole number from 1 to 256; got 0"),
    "negative retries": (["submit", "--host", "http://127.0.0.1:9", "--retries", "-1"],
                         "--retries must be a whole number from 0 to 20; got -1"),
    "negative checkpoints kept": (["train", "-t", "{data}", "-o", "{out}", "-m", "minilm",
                                   "--keep-checkpoints", "-1"],
                                  "--keep-checkpoints must be a whole number from 0 to 1000; got -1"),
    "negative pipeline sample count": (["run", "--param", "max_train_samples=-3", "--output-root", "{out}"],
                                       "max_train_samples must be a whole number of at least 0; got -3"),
    "a pipeline seed that is no number": (["run", "--param", "seed=abc", "--output-root", "{out}"],
                                          "seed must be a whole number from 0 to 4294967295; got 'abc'"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_option_is_one_line_before_any_work(case, a_file, small_data, tmp_path, capsys, monkeypatch):
    args, message = CASES[case]
    fill = {"out": tmp_path / "out", "file": a_file, "data": small_data}
    code, _, err = run_cli([a.format(**fill) for a in args], capsys, monkeypatch)
    assert code == 2 and message.format(**fill) in error_line(err)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.yaml").exists()
    assert a_file.read_text() == "not a folder"
