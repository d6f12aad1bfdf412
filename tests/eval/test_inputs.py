"""Every bad input to accel-eval: one line on stderr naming the argument, exit code 2, and nothing generated."""

import json

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from accel.eval.harness.cli import main
from accel.pipelines.shapes.models import image_transformer
from accel.pipelines.shapes.pipelines import ShapesImagePipeline


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    torch.manual_seed(0)
    ShapesImagePipeline(image_transformer().eval(), FlowMatchEulerDiscreteScheduler()).save_pretrained(root / "pipe")
    (root / "prompts.txt").write_text("a red circle\na blue square\n")
    (root / "outside.txt").write_text("a red circle\na purple blob\n")
    (root / "empty.txt").write_text("\n  \n")
    (root / "bad.json").write_text('["a red circle", 3]')
    (root / "broken.json").write_text('["a red circle"')
    (root / "binary.txt").write_bytes(b"\xff\xfe\x00bad")
    (root / "a_file").write_text("not a folder")
    (root / "foreign").mkdir()
    (root / "foreign" / "notes.txt").write_text("someone's files")
    return root


def _run_args(*extra, prompts="prompts.txt"):
    return ["run", "--pipeline", "PIPE", "--prompts", prompts, "--steps", "2", "--repeats", "1", "--out", "OUT", *extra]


CASES = {  # class of bad input: (argv, the argument the message must name)
    "steps not an int": (_run_args("--steps", "x"), "--steps"),
    "steps zero": (_run_args("--steps", "0"), "--steps"),
    "steps negative": (_run_args("--steps", "-1"), "--steps"),
    "seeds zero": (_run_args("--seeds", "0"), "--seeds"),
    "repeats zero": (_run_args("--repeats", "0"), "--repeats"),
    "frames zero": (_run_args("--frames", "0"), "--frames"),
    "height negative": (_run_args("--height", "-32"), "--height"),
    "guidance nan": (_run_args("--guidance", "nan"), "--guidance"),
    "guidance negative": (_run_args("--guidance", "-1"), "--guidance"),
    "height the model cannot make": (_run_args("--height", "64"), "--height 64"),
    "frames for an image model": (_run_args("--frames", "17"), "--frames"),
    "dtype": (_run_args("--dtype", "float8"), "--dtype"),
    "unknown option": (_run_args("--bogus"), "--bogus"),
    "missing --out": (["run", "--pipeline", "PIPE", "--prompts", "prompts.txt"], "--out"),
    "prompts file missing": (_run_args(prompts="nonexistent.txt"), "--prompts"),
    "prompts a folder": (_run_args(prompts="foreign"), "--prompts"),
    "prompts file empty": (_run_args(prompts="empty.txt"), "--prompts"),
    "prompts JSON not strings": (_run_args(prompts="bad.json"), "--prompts"),
    "prompts JSON broken": (_run_args(prompts="broken.json"), "--prompts"),
    "prompts not UTF-8": (_run_args(prompts="binary.txt"), "--prompts"),
    "prompt outside the vocabulary": (_run_args(prompts="outside.txt"), "--prompts"),
    "unknown method": (_run_args("--method", "warp"), "--method"),
    "method option without value": (_run_args("--method", "cg_taylor:threshold"), "--method"),
    "method option unknown": (_run_args("--method", "cg_taylor:tresh=1"), "--method"),
    "method option bad value": (_run_args("--method", "cg_taylor:threshold=-1"), "--method"),
    "method option not a number": (_run_args("--method", "first_block_cache:threshold=abc"), "--method"),
    "method option twice": (_run_args("--method", "cg_taylor:threshold=1,threshold=2"), "--method"),
    "method unbalanced brackets": (_run_args("--method", "mag_cache:mag_ratios=[1.0,0.9"), "--method"),
    "baseline with options": (_run_args("--method", "baseline:threshold=1"), "--method"),
    "method given twice": (_run_args("--method", "cg_taylor", "--method", "cg_taylor"), "--method"),
    "method the model does not support": (_run_args("--method", "sparse_attention"), "--method"),
    "device spelling": (_run_args("--device", "gpu"), "--device"),
    "device index": (_run_args("--device", "cuda:x"), "--device"),
    "out under a file": (_run_args()[:-1] + ["a_file/run"], "--out"),
    "out is a file": (_run_args()[:-1] + ["a_file"], "--out"),
    "out holds other files": (_run_args()[:-1] + ["foreign"], "--out"),
    "pipeline missing": (["run", "--pipeline", "/no/such/pipeline", "--prompts", "prompts.txt", "--out", "OUT"],
                         "/no/such/pipeline"),
    "report of no run folder": (["report", "OUT"], "OUT"),
    "quickstart device": (["quickstart", "--device", "tpu", "--out", "OUT"], "--device"),
    "no command": ([], "command"),
}
if not torch.cuda.is_available():
    CASES["device absent"] = (_run_args("--device", "cuda"), "--device cuda")


@pytest.mark.parametrize("argv, names", CASES.values(), ids=CASES.keys())
def test_bad_input_exits_2_with_one_line_naming_the_argument(files, tmp_path, capsys, argv, names):
    out = tmp_path / "out"
    paths = {"PIPE": files / "pipe", "OUT": out}
    argv = [str(paths.get(a, files / a if a.endswith((".txt", ".json")) or a in ("foreign", "a_file") or
                          a.startswith("a_file/") else a)) for a in argv]
    names = str(out) if names == "OUT" else names
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("accel-eval: error: ") and err.count("\n") == 1, err
    assert names in err, err
    assert not out.exists() and not list(files.rglob("*.npy"))  # nothing generated, nothing written


def _write_spec(folder, text):
    folder.mkdir()
    (folder / "spec.json").write_text(text)


@pytest.mark.parametrize("spec_text, message", [
    ('{"pipeline": "shapes-image", "configs": [', "corrupt"),
    ('{"pipeline": "shapes-image"}', "expected an object with the keys"),
    ('[1, 2]', "expected an object"),
    ('{"pipeline": "shapes-image", "configs": [{"method": "warp", "options": {}}], "prompts": ["a red circle"]}',
     "unknown method 'warp'"),
    ('{"pipeline": "shapes-image", "configs": [], "prompts": ["a red circle"], "seeds": 0}', "--seeds"),
])
def test_a_corrupt_or_incomplete_spec_is_reported_not_raised(tmp_path, capsys, spec_text, message):
    _write_spec(tmp_path / "run", spec_text)
    assert main(["report", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "spec.json" in err and message in err, err


def test_a_failed_run_does_not_block_the_next(files, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["run", "--pipeline", str(files / "pipe"), "--steps", "2", "--repeats", "1", "--out", str(out)]
    assert main([*argv, "--prompts", str(files / "outside.txt")]) == 2  # refused: nothing written
    assert not out.exists()
    _write_spec(out, json.dumps({"stopped": "before any sample"}))  # a run stopped before its first sample
    assert main([*argv, "--prompts", str(files / "prompts.txt")]) == 0
    assert len(list(out.rglob("*.npy"))) == 2 * 2
    capsys.readouterr()
    assert main([*argv, "--prompts", str(files / "prompts.txt"), "--seeds", "2"]) == 2  # now it holds samples
    err = capsys.readouterr().err
    assert "samples of another run" in err and "seeds: 1 -> 2" in err
