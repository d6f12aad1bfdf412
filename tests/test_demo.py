from accel.demos import patching


def test_patching_demo_runs_offline(capsys):
    patching.main(["--steps", "8", "--layers", "3"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split()[0] == "method" and len(lines) == 1 + len(patching.CONFIGS)
    assert lines[1].split()[1:3] == ["8", "0"]  # the baseline computes every step
