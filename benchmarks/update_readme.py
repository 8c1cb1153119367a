"""Regenerates the README's measured-results section from `benchmarks/results/*.json` (never typed by hand).

python benchmarks/update_readme.py           # rewrite the section between the README's results markers
python benchmarks/update_readme.py --check   # exit 1 when the README is out of date with the results files
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from hf_tinysaver.workflow import write_text_atomic

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "README.md"
START, END = "<!-- results:start -->", "<!-- results:end -->"


def load(name: str) -> dict | None:
    path = RESULTS / name
    return json.loads(path.read_text()) if path.exists() else None


def pct(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{100 * value:.{digits}f}"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def section_zoo() -> str | None:
    data = load("zoo_accuracy.json")
    if data is None:
        return None
    rows = []
    for row in data["results"]:
        interpreter = row.get("int8_top1")
        agreement = row.get("agreement_with_int8")
        rows.append(
            [
                f"`{row['model']}`",
                f"{row['dataset']} {row['split']}",
                row["n"],
                f"{row['top1']:.2f}",
                "—" if interpreter is None else f"{interpreter:.2f}",
                "—" if agreement is None else f"{agreement:.1f}",
                f"{row['macs'] / 1e6:.1f}",
            ]
        )
    header = ["zoo model", "data", "n", "top-1 %", "int8 TFLite top-1 %", "agrees with int8 %", "MMACs"]
    return f"### Zoo models (converted offline, accuracy checked)\n\n`{data['command']}`\n\n" + table(header, rows)


def section_calibrate_evaluate() -> str | None:
    rows = []
    for task in ("cifar10", "imagenet"):
        data = load(f"calibrate_evaluate_{task}.json")
        if data is None:
            continue
        for mode, run in data["runs"].items():
            held_out = run["held_out"]
            label = "in-sample" if mode == "in_sample" else f"guarantee {run['confidence_level']:.0%}"
            rows.append(
                [
                    f"{data['saver']} → {data['base']}",
                    f"{data['max_drop']} ({label})",
                    f"{run['threshold']:.4f}",
                    f"{pct(run['calibration']['exit_rate'], 1)} / {run['calibration']['relative_macs']:.3f}",
                    f"{pct(held_out['exit_rate'], 1)}",
                    f"{pct(held_out['accuracy'])} vs {pct(held_out['base_accuracy'])}",
                    f"{held_out['accuracy_drop_points']:+.2f}",
                    f"{held_out['relative_macs']:.3f}",
                    "yes" if held_out["simulation_matches_forward"] else "NO",
                ]
            )
    if not rows:
        return None
    header = [
        "cascade",
        "max drop (mode)",
        "threshold",
        "calib. exit % / rel. MACs",
        "held-out exit %",
        "held-out acc. % vs base",
        "held-out drop (points)",
        "held-out rel. MACs",
        "simulation = real forward",
    ]
    return (
        "### Calibrate on one half, run the real cascade on the other\n\n"
        "`python benchmarks/calibrate_evaluate.py --task {cifar10,imagenet}` (calibration on the first half, "
        "held-out = the second half; drop = base accuracy minus cascade accuracy)\n\n" + table(header, rows)
    )


def section_throughput() -> str | None:
    blocks = []
    for path in sorted(RESULTS.glob("throughput_*.json")):
        data = json.loads(path.read_text())
        rows = [
            [
                row["batch_size"],
                f"{row['base_images_per_second']:.0f}",
                f"{row['cascade_images_per_second']:.0f}",
                f"{row['realised_speedup']:.2f}x",
                f"{row['mac_predicted_speedup']:.2f}x",
                f"{row['realised_over_predicted']:.2f}",
                f"{row['composition_bound_speedup']:.2f}x",
                f"{100 * row['overhead_vs_saver_then_base']:+.1f} %",
            ]
            for row in data["throughput"]
        ]
        header = ["batch", "base img/s", "cascade img/s", "speedup", "MAC-predicted", "ratio", "composition bound",
                  "overhead"]  # fmt: skip
        machine = data["machine"]
        memory = data.get("memory")
        memory_line = ""
        if memory:
            memory_line = (
                f"\n\nPeak RSS at batch 64: cascade {memory['cascade']['peak_rss_mib']:.0f} MiB vs base alone "
                f"{memory['base']['peak_rss_mib']:.0f} MiB (x{memory['cascade_over_base_peak']:.2f}); increase during "
                f"the forward passes {memory['cascade']['forward_increase_mib']:.1f} vs "
                f"{memory['base']['forward_increase_mib']:.1f} MiB."
            )
        blocks.append(
            f"**{data['dataset']} {data['split']}**, threshold {data['threshold']:.4f}, {data['threads']} threads, "
            f"{machine['cpu_count']} CPUs ({machine['processor']}), torch {machine['torch']}, channels-last "
            f"{'on' if data['channels_last'] else 'off'} (`{data.get('command', 'benchmarks/throughput.py')}`)\n\n"
            + table(header, rows)
            + memory_line
        )
    if not blocks:
        return None
    return (
        "### Wall-clock throughput (cascade and base alone interleaved, medians)\n\n"
        "ratio = realised speedup / MAC-predicted speedup; composition bound = saver at the full batch + base on "
        "exactly the sub-batches it receives; overhead = cascade with nothing exiting vs saver then base called "
        "directly.\n\n" + "\n\n".join(blocks)
    )


SECTIONS: list[Callable[[], str | None]] = [section_zoo, section_calibrate_evaluate, section_throughput]


def render() -> str:
    parts = [section() for section in SECTIONS]
    body = "\n\n".join(part for part in parts if part)
    return f"{START}\n<!-- generated by benchmarks/update_readme.py from benchmarks/results/*.json; do not edit -->\n\n{body}\n\n{END}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="Fail when the README is out of date.")
    args = parser.parse_args(argv)
    readme = README.read_text()
    if START not in readme or END not in readme:
        raise SystemExit(f"README.md has no {START} ... {END} markers.")
    before, rest = readme.split(START, 1)
    _, after = rest.split(END, 1)
    updated = before + render() + after
    if args.check:
        if updated != readme:
            print("README.md's results section is out of date: run python benchmarks/update_readme.py")
            return 1
        return 0
    write_text_atomic(README, updated)
    return 0


if __name__ == "__main__":
    sys.exit(main())
