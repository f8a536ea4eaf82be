"""The command line's own behaviour: argument errors are one line naming the command."""
from __future__ import annotations

import pytest

from mak.cli import main


@pytest.mark.parametrize("argv, message", [
    (["pretrain", "--array", "a.npy", "--out", "o", "--lr", "-1"],
     "mak pretrain: error: argument --lr: '-1' must be a number > 0"),
    (["pretrain", "--array", "a.npy", "--out", "o", "--lr", "nan"], "argument --lr: 'nan' must be a number > 0"),
    (["pretrain", "--array", "a.npy", "--out", "o", "--epochs", "0"], "argument --epochs: '0' must be an integer >= 1"),
    (["embed", "--array", "a.npy", "--checkpoint", "c", "--out", "o", "--workers", "-1"],
     "mak embed: error: argument --workers: '-1' must be an integer >= 0"),
    (["evaluate", "--checkpoint", "c", "--bench", "b", "--shots", "0"],
     "argument --shots: '0' must be an integer >= 1"),
    (["evaluate", "--checkpoint", "c", "--bench", "b", "--max-iter", "0"],
     "argument --max-iter: '0' must be an integer >= 1"),
    # one declaration, one check: the flags take what mak run's config keys take (mak.options)
    (["evaluate", "--checkpoint", "c", "--bench", "b", "--few", "2.5"],
     "mak evaluate: error: argument --few: '2.5' must be an integer >= 0"),
    (["evaluate", "--checkpoint", "c", "--bench", "b", "--many", "0"], "argument --many: '0' must be an integer >= 1"),
    (["evaluate", "--checkpoint", "c", "--bench", "b", "--many", "300.5"],
     "argument --many: '300.5' must be an integer >= 1"),
    (["evaluate", "--checkpoint", "c", "--bench", "b", "--seed", "-1"], "argument --seed: '-1' must be an integer >= 0"),
    (["evaluate", "--checkpoint", "c", "--bench", "b", "--knn-temperature", "0"],
     "argument --knn-temperature: '0' must be a number > 0"),
    (["embed", "--array", "a.npy", "--checkpoint", "c", "--out", "o", "--views", "1"],
     "mak embed: error: argument --views: '1' must be 0 (no views) or an integer >= 2"),
    (["embed", "--array", "a.npy", "--checkpoint", "c", "--out", "o", "--seed", "-1"],
     "argument --seed: '-1' must be an integer >= 0"),
    (["embed", "--array", "a.npy", "--checkpoint", "c", "--out", "o", "--dtype", "float64"],
     "argument --dtype: 'float64' must be one of: float16, float32"),
    (["embed", "--array", "a.npy", "--weights", "w", "--backbone", "resnet18", "--out", "o", "--image-size", "x"],
     "argument --image-size: 'x' must be an integer >= 8"),
    (["pretrain", "--array", "a.npy", "--out", "o", "--seed", "-1"], "argument --seed: '-1' must be an integer >= 0"),
    (["pretrain", "--array", "a.npy", "--out", "o", "--image-size", "4"],
     "argument --image-size: '4' must be an integer >= 8"),
    (["select", "--pool-store", "p.npy", "--out", "o", "--budget", "1.5"],
     "argument --budget: '1.5' must be an integer >= 1"),
    (["store", "info"], "mak store info: error: the following arguments are required: STORE"),
])
def test_a_bad_argument_is_one_line_naming_the_command(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    command = "store info" if argv[0] == "store" else argv[0]
    assert exc.value.code == 2 and len(err.strip().splitlines()) == 1 and message in err
    assert err.strip().endswith(f"(see mak {command} --help)")


@pytest.mark.parametrize("argv, command, named", [
    (["select", "--pool-store", "p", "--budgt", "10", "--out", "o"], "select", "--budgt (did you mean --budget?)"),
    (["select", "--stratgy=mak", "--budget", "3"], "select", "--stratgy (did you mean --strategy?)"),
    (["store", "info", "--chek", "s"], "store info", "--chek (did you mean --check?)"),
    (["run", "c.yaml", "--dryrun", "--zzzzzz"], "run", "--dryrun (did you mean --dry-run?), --zzzzzz"),
])
def test_a_misspelt_flag_is_named_with_the_closest_one_before_missing_required_ones(argv, command, named, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"mak {command}: error: unrecognized arguments: {named} (see mak {command} --help)"


@pytest.mark.parametrize("argv", [["pretrain", "--array", "a.npy", "--out", "o", "--bogus"],
                                  ["store", "info", "s", "--nope"]])
def test_an_unknown_option_is_named_by_its_command(argv, capsys):
    command = "store info" if argv[0] == "store" else argv[0]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"mak {command}: error: unrecognized arguments: {argv[-1]} (see mak {command} --help)"


@pytest.mark.parametrize("argv, message", [
    (["run", "{dir}"], "{dir}: is a directory, not a config file"),
    (["embed", "--array", "{arr}", "--checkpoint", "{dir}", "--out", "{tmp}/e"],
     "{dir}: is a directory, not a checkpoint"),
    (["pretrain", "--array", "{arr}", "--out", "{file}", "--epochs", "1"],
     "{file}: output path exists and is not a directory"),
    (["evaluate", "--checkpoint", "{file}", "--train-split", "{file}", "--test-split", "{file}", "--out", "{dir}"],
     "{dir}: output path is a directory; name a file"),
    (["run", "--out", "{file}", "--set", "data.benchmark.build=true", "--dry-run"],
     "{file}: output path exists and is not a directory"),
])
def test_a_file_or_directory_in_the_wrong_place_is_named(argv, message, tmp_path, capsys):
    import numpy as np

    names = {"dir": tmp_path / "d", "file": tmp_path / "f.txt", "arr": tmp_path / "a.npy", "tmp": tmp_path}
    names["dir"].mkdir()
    names["file"].write_text("x")
    np.save(names["arr"], np.zeros((4, 8, 8), np.uint8))
    assert main([a.format(**names) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.endswith(message.format(**names))
