"""The console entry point: every subcommand's --help, and the benchmark end to end."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from repavit.cli.main import COMMANDS, build_parser, main


def test_top_level_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name.replace("_", "-") in out or name in out


def _subcommands() -> list[str]:
    return list(build_parser()._subparsers._group_actions[0].choices)


@pytest.mark.parametrize("name", _subcommands())
def test_subcommand_help(name, capsys):
    with pytest.raises(SystemExit) as e:
        main([name, "--help"])
    assert e.value.code == 0
    assert "usage" in capsys.readouterr().out


def test_console_script_module_runs():
    out = subprocess.run([sys.executable, "-m", "repavit", "--help"], capture_output=True, text=True, check=True)
    assert "bench" in out.stdout


def test_bench_writes_json_with_ratios(tmp_path, capsys):
    path = tmp_path / "bench.json"
    rc = main(
        [
            "bench",
            "--models",
            "RePaViT_Tiny",
            "--batch-size",
            "2",
            "--img-size",
            "32",
            "--rounds",
            "2",
            "--iters",
            "1",
            "--warmup",
            "1",
            "--output",
            str(path),
        ]
    )
    assert rc == 0
    res = json.loads(path.read_text())
    entry = res["models"]["RePaViT_Tiny"]
    assert set(entry["forms"]) == {"vanilla", "train", "reparam"}
    assert entry["reparam_max_rel_err"] < 1e-5
    assert entry["forms"]["reparam"]["params_m"] < entry["forms"]["train"]["params_m"]
    assert "reparam/vanilla" in entry["ratios"] and res["machine"]["torch"]
    assert "ratios:" in capsys.readouterr().out


def test_bench_unknown_model_is_one_line_error(capsys):
    rc = main(["bench", "--models", "NoSuchModel", "--batch-size", "1", "--img-size", "32"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "NoSuchModel" in err
