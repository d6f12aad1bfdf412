from accel.demos import patching


def test_patching_demo_runs_offline(capsys):
    patching.main(["--steps", "8", "--layers", "3"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split()[0] == "method" and len(lines) == 1 + len(patching.CONFIGS)
    assert lines[1].split()[1:3] == ["8", "0"]  # the baseline computes every step


def test_bad_arguments_exit_with_a_usage_message(capsys):
    import pytest

    for argv in (["--layers", "1"], ["--steps", "0"], ["--steps", "x"]):
        with pytest.raises(SystemExit) as exited:
            patching.main(argv)
        assert exited.value.code == 2 and argv[0] in capsys.readouterr().err
