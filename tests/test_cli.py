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


def test_bench_writes_json_plot_and_ratios(tmp_path, capsys):
    path, png = tmp_path / "bench.json", tmp_path / "bench.png"
    rc = main(
        [
            "bench",
            "--models",
            "RePaViT_Tiny",
            "--forms",
            "vanilla",
            "train",
            "reparam",
            "reparam_all_tokens",
            "reference",
            "authors_design",
            "int8",
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
            "--train-step",
            "--train-batch-size",
            "2",
            "--breakdown",
            "--sweep-batches",
            "1,2",
            "--output",
            str(path),
            "--plot",
            str(png),
        ]
    )
    assert rc == 0
    res = json.loads(path.read_text())
    entry = res["models"]["RePaViT_Tiny"]
    assert set(entry["forms"]) == {
        "vanilla",
        "train",
        "reparam",
        "reparam_all_tokens",
        "reference",
        "authors_design",
        "int8",
        "int8_identity_folded",
    }
    assert entry["reparam_vs_train"]["max_rel_err"] < 1e-5
    for form in ("reparam_all_tokens", "reference", "authors_design"):
        assert entry["forms"][form]["agreement_with_reparam"]["max_rel_err"] < 1e-5
    # the class-token shortcut does less work than the full computation, which is the paper's count
    mem = {k: v["peak_memory_mb"] for k, v in entry["forms"].items()}
    assert all(m is not None and m > 0 for m in mem.values()), mem
    assert set(entry["train_step_peak_memory_mb"]) == {"vanilla", "train", "train_explicit", "train_split", "masked"}
    gm = {k: v["gmacs"] for k, v in entry["forms"].items() if "gmacs" in v}
    assert gm["reparam"] == gm["reference"] < gm["reparam_all_tokens"] == gm["authors_design"] < gm["vanilla"]
    assert entry["forms"]["reparam"]["params_m"] < entry["forms"]["train"]["params_m"]
    assert entry["forms"]["reparam"]["gmacs"] < entry["forms"]["vanilla"]["gmacs"]
    assert {"reparam/vanilla", "reparam/reference", "reparam/authors_design", "reparam/reparam_all_tokens"} <= set(
        entry["ratios"]
    )
    assert set(entry["train_step_s"]) == {"vanilla", "train", "train_explicit", "train_split", "masked"}
    for shares in entry["breakdown"].values():
        assert abs(sum(shares.values()) - 1) < 1e-6 and shares["ffn"] > 0 and shares["attention"] > 0
    assert [r["batch_size"] for r in entry["sweep"]] == [1, 2]
    assert res["machine"]["torch"] and png.stat().st_size > 1000
    assert "throughput ratios:" in capsys.readouterr().out


def test_bench_unknown_model_is_one_line_error(capsys):
    rc = main(["bench", "--models", "NoSuchModel", "--batch-size", "1", "--img-size", "32"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "NoSuchModel" in err
