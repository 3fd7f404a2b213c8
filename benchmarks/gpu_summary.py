"""The two Python ends of ``benchmarks/gpu_check.sh``.

    python benchmarks/gpu_summary.py --env OUT/env.json          # the machine: GPU, driver, torch, CUDA
    python benchmarks/gpu_summary.py --summarize OUT [--dry-run] # OUT/summary.json and a Markdown table

``--summarize`` exits 1 when a step failed or a result it expects is missing, so CI's dry run fails
when the script stops producing what a GPU session would need.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

from repavit.measure import machine_info
from repavit.utils import write_json


def environment() -> dict:
    info = {**machine_info(), "cuda_available": torch.cuda.is_available(), "torch_cuda": torch.version.cuda}
    if torch.backends.cudnn.is_available():
        info["cudnn"] = torch.backends.cudnn.version()
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
        info["flash_sdp_enabled"] = torch.backends.cuda.flash_sdp_enabled()
    try:
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        info["nvidia_smi"] = smi.stdout.strip().splitlines() if smi.returncode == 0 else smi.stderr.strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        info["nvidia_smi"] = f"not run: {e}"
    return info


def _steps(out: Path) -> list[dict]:
    rows = []
    for line in (out / "steps.tsv").read_text().splitlines():
        name, rc, seconds = line.split("\t")
        rows.append({"step": name, "rc": int(rc), "seconds": int(seconds)})
    return rows


def _pytest(out: Path) -> dict | None:
    path = out / "pytest.xml"
    if not path.is_file():
        return None
    suite = ET.parse(path).getroot()
    suite = suite.find("testsuite") if suite.tag == "testsuites" else suite
    return {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}


def _speed(out: Path) -> dict:
    rows = {}
    for path in sorted((out / "speed").glob("*/speed.json")):
        r = json.loads(path.read_text())
        rows[path.parent.name] = {
            "model": r["model"],
            "precision": r["precision"],
            "batch_size": r["batch_size"],
            "timed_form": r["form"],
            "median_images_per_s": r["median_images_per_s"],
            "reparam_over_train": r.get("speedup_reparam_over_train"),
            "attention_kernels": r["attention_kernels"],
            "peak_memory_mb": r.get("peak_memory_mb"),
        }
    return rows


def _bench(out: Path) -> dict:
    rows: dict = {}
    for path in sorted(out.glob("bench_*.json")):
        r = json.loads(path.read_text())
        for model, entry in r["models"].items():
            forms = {
                k: {
                    "images_per_s": v.get("throughput", {}).get("median"),
                    "latency_ms": v.get("latency_ms", {}).get("median"),
                    "peak_memory_mb": v.get("peak_memory_mb"),
                }
                for k, v in entry["forms"].items()
            }
            rows[f"{path.stem}/{model}"] = {
                "complete": r["complete"],
                "amp": r["settings"].get("amp", "off"),
                "forms": forms,
                "ratios": entry.get("ratios", {}),
                "train_step_s": {k: v["median"] for k, v in entry.get("train_step_s", {}).items()},
                "train_step_peak_memory_mb": entry.get("train_step_peak_memory_mb"),
                "train_step_ratios": entry.get("train_step_ratios", {}),
            }
    return rows


def _table(summary: dict) -> str:
    lines = ["| run | vanilla img/s | ours img/s | ours/vanilla | ours/authors' design | ours peak MiB |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for key, b in summary["bench"].items():
        f, r = b["forms"], b["ratios"]
        ours = f.get("reparam", {})
        if not ours:
            continue  # a training-step run (next table)
        lines.append(
            f"| {key} ({b['amp']}) | {f.get('vanilla', {}).get('images_per_s') or float('nan'):.1f} | "
            f"{ours.get('images_per_s') or float('nan'):.1f} | {r.get('reparam/vanilla', float('nan')):.3f}x | "
            f"{r.get('reparam/authors_design', float('nan')):.3f}x | {ours.get('peak_memory_mb') or float('nan'):.0f} |"
        )
    for key, s in summary["speed"].items():
        lines.append(f"| speed {key} | train {s['median_images_per_s'].get('train', float('nan')):.1f} | "
                     f"reparam {s['median_images_per_s'].get('reparam', float('nan')):.1f} | "
                     f"{s['reparam_over_train'] or float('nan'):.3f}x (over training form) | | |")  # fmt: skip
    return "\n".join([*lines, "", *_train_table(summary)])


def _train_table(summary: dict) -> list[str]:
    """The training-step rows: vanilla and ours, eager and (where measured) compiled, with peak memory."""
    nan = float("nan")
    lines = ["| training step | vanilla s | ours s | ours/vanilla | compiled ours/vanilla | peak MiB vanilla / ours |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for key, b in summary["bench"].items():
        t, m, r = b["train_step_s"], b["train_step_peak_memory_mb"] or {}, b.get("train_step_ratios", {})
        if "train" in t and "vanilla" in t:
            lines.append(
                f"| {key} ({b['amp']}) | {t['vanilla']:.3f} | {t['train']:.3f} | "
                f"{r.get('train/vanilla', nan):.3f}x | {r.get('train_compiled/vanilla_compiled', nan):.3f}x | "
                f"{m.get('vanilla') or nan:.0f} / {m.get('train') or nan:.0f} |"
            )
    return lines


def summarize(out: Path, dry_run: bool) -> int:
    steps = _steps(out)
    summary = {
        "dry_run": dry_run,
        "environment": json.loads((out / "env.json").read_text()) if (out / "env.json").is_file() else None,
        "steps": steps,
        "pytest": _pytest(out),
        "speed": _speed(out),
        "bench": _bench(out),
    }
    problems = [f"step {s['step']} failed (rc {s['rc']}, see {s['step']}.log)" for s in steps if s["rc"] != 0]
    if summary["pytest"] is None:
        problems.append("no pytest report")
    speed_runs = sum(1 for s in steps if s["step"].startswith("speed_"))
    if len(summary["speed"]) != speed_runs:
        problems.append(f"{speed_runs} speed tests ran but {len(summary['speed'])} wrote speed.json")
    if not summary["bench"] or not all(b["complete"] for b in summary["bench"].values()):
        problems.append("a bench run is missing or incomplete")
    summary["problems"] = problems
    write_json(out / "summary.json", summary)
    print(_table(summary))
    print(f"wrote {out / 'summary.json'}" + ("" if not problems else "; problems: " + "; ".join(problems)))
    return 1 if problems else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--env", type=Path, help="write the machine description here")
    p.add_argument("--summarize", type=Path, help="the gpu_check.sh output folder")
    p.add_argument("--dry-run", action="store_true", help="the folder comes from a CPU dry run")
    args = p.parse_args()
    if args.env:
        env = environment()  # once: it runs nvidia-smi
        write_json(args.env, env)
        print(json.dumps(env, indent=1))
    if args.summarize:
        return summarize(args.summarize, args.dry_run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
