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

from hf_tinysaver.calibration.simulation import format_drop
from hf_tinysaver.workflows.cascade import write_text_atomic

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "README.md"
START, END = "<!-- results:start -->", "<!-- results:end -->"


def load(name: str) -> dict | None:
    path = RESULTS / name
    return json.loads(path.read_text()) if path.exists() else None


def pct(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{100 * value:.{digits}f}"


def drop(points: float) -> str:
    """A drop in points as every table prints it: base minus cascade accuracy, the sign shown only when negative (the
    cascade more accurate), no "-0.00" (see `hf_tinysaver.calibration.simulation.format_drop`)."""
    text = f"{points:.2f}"
    return "0.00" if text == "-0.00" else text


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
        agreement = row.get("int8_agreement")
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
            label = "in-sample" if mode == "in_sample" else f"certified {run['confidence_level']:.0%}"
            if run.get("certificate"):
                label += f", {run['certificate']}"
            rows.append(
                [
                    f"{data['saver']} → {data['base']}",
                    f"{data['max_drop']} ({label})",
                    f"{run['threshold']:.4f}",
                    f"{pct(run['calibration']['exit_rate'], 1)} / {run['calibration']['relative_macs']:.3f}",
                    f"{pct(held_out['exit_rate'], 1)}",
                    f"{pct(held_out['accuracy'])} vs {pct(held_out['base_accuracy'])}",
                    drop(held_out["accuracy_drop_points"]),
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


def section_search() -> str | None:
    blocks = []
    for task in ("cifar10", "imagenet"):
        data = load(f"search_{task}.json")
        if data is None:
            continue
        drops = [repr(float(d)) for d in data["max_drops"]]
        rows = []
        for candidate in data["candidates"]:
            if candidate["status"] != "ranked":
                rows.append([candidate["status"], f"`{candidate['name']}`", "", "", "", *[""] * len(drops), "",
                             candidate.get("reason") or ""])  # fmt: skip
                continue
            rows.append(
                [
                    candidate["rank"],
                    f"`{candidate['name']}`",
                    f"{candidate['macs'] / 1e6:.1f}",
                    pct(candidate["accuracy"]),
                    f"{candidate['delta_c']:+.3f}" if candidate["delta_c"] is not None else "—",
                    *[
                        "infeasible"
                        if candidate["relative_macs"].get(d) is None
                        else f"{candidate['relative_macs'][d]:.3f}"
                        for d in drops
                    ],
                    candidate["paper_rank"],
                    "",
                ]
            )
        header = ["rank", "candidate saver", "MMACs", "top-1 %", "ΔC (paper)",
                  *[f"rel. MACs @{d} pts" for d in drops], "paper rank", "note"]  # fmt: skip
        held_out = data.get("held_out_evaluation")
        held_out_line = ""
        if held_out:
            held_out_line = (
                f"\n\nWinner `{data['winner']}` calibrated at {data['primary_max_drop']} points on {data['split']}, "
                f"run for real on held-out {held_out['split']} ({held_out['n']} images): accuracy "
                f"{pct(held_out['accuracy'])} % vs base {pct(held_out['base_accuracy'])} % "
                f"({format_drop(held_out['accuracy_drop_points'])}), exit rate {pct(held_out['exit_rate'], 1)} %, "
                f"relative MACs {held_out['relative_macs']:.3f}."
            )
            if held_out["exit_rate"] == 1.0:
                held_out_line += " Every image exits: the saver alone answers and the base never runs."
        blocks.append(
            f"**Base `{data['base']}`** ({data['base_macs'] / 1e6:.1f} MMACs, top-1 {pct(data['base_accuracy'])} % on "
            f"{data['dataset']} {data['split']}, n={data['n']}; `{data['command']}`)\n\n"
            + table(header, rows)
            + held_out_line
        )
    speed = load("search_speed.json")
    if not blocks:
        return None
    speed_line = ""
    if speed:
        speed_line = "\n\n" + ", ".join(
            f"{key.replace('_', ' ')}: {value:.3g}" for key, value in speed.items() if isinstance(value, (int, float))
        )
    return (
        "### Saver search (ranked by relative MACs at a 0.5-point drop; the paper's ΔC beside)\n\n"
        + "\n\n".join(blocks)
        + speed_line
    )


def section_tradeoff() -> str | None:
    rows = []
    command = None
    for task in ("cifar10", "imagenet"):
        data = load(f"tradeoff_{task}.json")
        if data is None:
            continue
        command = data["command"].replace(f"--task {task}", "--task {cifar10,imagenet}")
        for point in data["operating_points"]:
            simulated, forward = point["held_out_simulated"], point.get("held_out_forward")
            static = point["static_alternative"]
            static_text = (
                "none smaller"
                if static["name"] == "none"
                else (f"`{static['name']}` ({static['relative_macs']:.3f}, {pct(static['accuracy'])} %)")
            )
            rows.append(
                [
                    f"{data['saver']} → {data['base']}",
                    point["max_drop"],
                    f"{point['calibration']['relative_macs']:.3f}",
                    f"{pct(simulated['exit_rate'], 1)}",
                    f"{pct(simulated['accuracy'])} vs {pct(simulated['base_accuracy'])}",
                    drop(simulated["accuracy_drop_points"]),
                    f"{simulated['relative_macs']:.3f}",
                    "—" if forward is None else ("yes" if forward["simulation_matches_forward"] else "NO"),
                    f"{point['oracle_relative_macs_at_drop']:.3f}",
                    static_text,
                ]
            )
    if not rows:
        return None
    header = ["cascade", "max drop", "calib. rel. MACs", "held-out exit %", "held-out acc. % vs base",
              "held-out drop", "held-out rel. MACs", "real forward = simulation", "oracle rel. MACs",
              "static alternative (rel. MACs, acc.)"]  # fmt: skip
    return (
        "### Trade-off at allowed drops of 0 / 0.5 / 1.0 points (calibrated on one half, measured on the other)\n\n"
        f"`{command}`. Oracle: the base runs only where the saver is wrong and the base right, at the same drop. "
        "Static alternative: the cheapest single zoo model at least as accurate as the cascade on the held-out half."
        "\n\n" + table(header, rows)
    )


def section_guarantee() -> str | None:
    rows = []
    command, goal = None, None
    for task in ("cifar10", "imagenet"):
        data = load(f"guarantee_{task}.json")
        if data is None:
            continue
        command = (
            data["command"]
            .replace(f"--task {task}", "--task {cifar10,imagenet}")
            .replace(f"guarantee_{task}.json", "guarantee_{cifar10,imagenet}.json")
        )
        goal = data.get("goal") or goal
        for method, summary in data["methods"].items():
            low, high = summary["violation_rate_ci95"]
            label = f"`{method}`" + (" (default)" if method == data["default_method"] else "")
            rows.append(
                [
                    f"{data['saver']} → {data['base']}",
                    f"{data['calibration_size']:,} of {data['pool_n']:,}",
                    label,
                    f"{pct(summary['violation_rate'], 1)} [{pct(low, 1)}, {pct(high, 1)}]",
                    f"{summary['mean_relative_macs']:.3f}",
                    drop(summary["mean_pool_drop"]),
                    f"{pct(summary['certified_nothing_rate'], 1)}",
                ]
            )
    if not rows:
        return None
    header = ["cascade", "calibration images", "method", "violations % [95 % CI]", "mean rel. MACs",
              "mean true drop", "certified nothing %"]  # fmt: skip
    first = load("guarantee_cifar10.json") or load("guarantee_imagenet.json")
    text = (
        f"### Certified thresholds by simulation ({first['num_splits']:,} random calibration/test splits)\n\n"
        f"`{command}`. Target: a drop of at most {first['max_drop']:g} points with probability "
        f"{first['confidence_level']:g}. A violation is a split whose chosen threshold loses more than the target on "
        "the whole recorded pool (the population); relative MACs and the true drop are measured on the pool too. "
        "`in-sample` is the uncertified `max-drop` rule."
    )
    plans = []
    for task in ("cifar10", "imagenet"):
        data = load(f"guarantee_{task}.json")
        if data is not None and "plan" in data:
            plan = data["plan"]
            plans.append(
                f"{data['saver']} → {data['base']}: {plan['calibration_size']:,} images to let "
                f"{pct(plan['target_exit_rate'], 1)} % exit"
            )
    if plans:
        text += (
            " `plan_calibration_size` with the whole pool as the pilot (the exit rate of its in-sample point at half "
            "the target, 80 % of calibration sets passing): " + "; ".join(plans) + "."
        )
    cifar10 = load("guarantee_cifar10.json")
    if goal is not None and cifar10 is not None:
        verdict = "met" if goal["met"] else "missed"
        default = cifar10["methods"][cifar10["default_method"]]
        text += (
            f" Goal on CIFAR-10 with 5,000 calibration images: mean relative MACs at most "
            f"{goal['mean_relative_macs_at_most']:g} at violations at most {pct(goal['violation_rate_at_most'], 0)} "
            f"%: **{verdict}** ({default['mean_relative_macs']:.4f} at {pct(default['violation_rate'], 1)} %)."
        )
    return text + "\n\n" + table(header, rows)


def section_esn() -> str | None:
    data = load("esn_cifar10.json")
    if data is None:
        return None
    rows = []
    for row in data["rows"]:
        esn, plain = row["esn"]["eval"], row["tinysaver"]["eval"]
        rows.append(
            [
                row["width"],
                row["layers"],
                row["max_drop"],
                f"{esn['relative_macs']:.3f}",
                drop(esn.get("accuracy_drop", esn.get("drop"))),  # results written before 'drop' was renamed
                f"{plain['relative_macs']:.3f}",
                drop(plain.get("accuracy_drop", plain.get("drop"))),
                f"{row['relative_macs_esn_over_tinysaver']:.3f}",
                f"{row['tinysaver_oracle_at_esn_drop']['relative_macs']:.3f}",
            ]
        )
    header = ["d", "L", "max drop", "ESN rel. MACs", "ESN drop", "TinySaver rel. MACs", "TinySaver drop",
              "ESN / TinySaver", "TinySaver at ESN's held-out drop"]  # fmt: skip
    splits = data["splits"]
    return (
        f"### Exit Sequence Network vs plain TinySaver (CIFAR-10, ResNet-20 -> ResNet-56)\n\n"
        f"ESN trained on `{splits['train']}`, thresholds on `{splits['calib']}`, everything measured on held-out "
        f"`{splits['eval']}` (exits after {', '.join(data['exit_stages'])}; drops in points; last column: the plain "
        "cascade's held-out cost at the same held-out drop the ESN reached, a like-for-like comparison). "
        "`python benchmarks/esn_cifar10.py`\n\n" + table(header, rows)
    )


def section_throughput() -> str | None:
    blocks = []
    for path in sorted(RESULTS.glob("throughput_*.json")):
        data = json.loads(path.read_text())
        rows = [
            [
                row["batch_size"],
                f"{row['base_images_per_second']:.0f}",
                f"{row['mac_predicted_speedup']:.2f}x",
                f"{row['cascade_images_per_second']:.0f}",
                f"{row['realised_speedup']:.2f}x",
                f"**{row['realised_over_predicted']:.2f}**",
                f"{row['composition_bound_speedup']:.2f}x",
                f"{row['streamed_images_per_second']:.0f}",
                f"{row['streamed_speedup']:.2f}x",
                f"**{row['streamed_over_predicted']:.2f}**",
                f"{row['streamed_composition_bound_speedup']:.2f}x",
                f"{100 * row['overhead_vs_saver_then_base']:+.1f} %",
            ]
            for row in data["throughput"]
        ]
        header = ["batch", "base img/s", "MAC-predicted", "forward img/s", "speedup", "ratio", "bound",
                  "streamed img/s", "speedup", "ratio", "bound", "overhead"]  # fmt: skip
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
        optimisations = [
            name
            for name, key in (
                ("channels-last", "channels_last"),
                ("batch norms folded", "fold_batch_norm"),
                ("freed memory retained", "retain_memory"),
            )
            if data.get(key)
        ]
        blocks.append(
            f"**{data['dataset']} {data['split']}**, {data['throughput'][0]['n']} images, exit rate "
            f"{data['throughput'][0]['exit_rate']:.1%}, threshold {data['threshold']:.4f}, {data['threads']} threads, "
            f"{machine['cpu_count']} CPUs ({machine['processor']}), torch {machine['torch']}; "
            f"`optimize_for_inference`: {', '.join(optimisations) or 'nothing'} "
            f"(`{data.get('command', 'benchmarks/throughput.py')}`)\n\n" + table(header, rows) + memory_line
        )
    if not blocks:
        return None
    return (
        "### Wall-clock throughput (cascade and base alone interleaved, medians)\n\n"
        "forward = the cascade called once per batch (the base runs on that batch's remaining images); streamed = "
        "`forward_stream` (the base runs on full batches of remaining images collected across input batches). "
        "ratio = realised speedup / MAC-predicted speedup; bound = composition bound, the saver at the full batch + "
        "the base on exactly the batches that mode sends it; overhead = cascade with nothing exiting vs saver then "
        "base called directly, batch by batch in alternating order. The cascade is the in-sample CIFAR-10 one of the "
        "calibration table (`python benchmarks/calibrate_evaluate.py --task cifar10 --out-dir /tmp/bench/cascades "
        "--results-file ...` keeps it as `/tmp/bench/cascades/cifar10-in_sample`).\n\n" + "\n\n".join(blocks)
    )


def section_drift() -> str | None:
    data = load("drift_cifar10.json")
    if data is None:
        return None
    guard, streams, clean = data["guard"], data["streams"], data["clean"]
    rows = []
    for shift, row in data["shifts"].items():
        median = row["median_images_to_alarm"]
        statistics = row["first_alarm_statistics"]
        rows.append(
            [
                f"`{shift}`",
                pct(row["exit_rate"], 1),
                pct(row["base_accuracy"], 1),
                pct(row["cascade_accuracy"], 1),
                drop(row["accuracy_drop_points"]),
                pct(row["exited_disagreement"], 1),
                f"{row['detected']}/{row['streams']}",
                "—" if median is None else f"{median:.0f}",
                ", ".join(f"{name} {count}" for name, count in sorted(statistics.items(), key=lambda item: -item[1]))
                or "—",
            ]
        )
    header = [
        "shift",
        "exit rate %",
        "base top-1 %",
        "cascade top-1 %",
        "drop (points)",
        "exited disagreement %",
        "detected",
        "median images to alarm",
        "first alarm by",
    ]
    calibration = data["calibration"]
    intro = (
        f"### Drift guard on real shifts (CIFAR-10-C corruptions)\n\n`python benchmarks/drift.py`: "
        f"`{data['saver']}` -> `{data['base']}` calibrated (`{data['objective']}`, {data['max_drop']} points) on "
        f"`{data['calibration_split']}` (exit rate {pct(calibration['exit_rate'], 1)} %, exited disagreement "
        f"{pct(calibration['exited_disagreement'], 1)} %); `DriftGuard` with alpha {guard['alpha']}, tolerance "
        f"{guard['tolerance']}, {pct(guard['audit_fraction'], 0)} % audits (its alarms are exact per image, whatever the batching). "
        f"Streams resample `{data['stream_split']}`: {clean['false_alarms']} false alarm{'' if clean['false_alarms'] == 1 else 's'} on "
        f"{clean['streams']} clean streams of {clean['stream_length']} images (rate {clean['false_alarm_rate']:.3f}, "
        f"configured {guard['alpha']}); audits cost {pct(clean['audit_relative_macs'], 2)} % of the base's MACs. "
        f"Each shifted stream: {streams['clean_prefix']} clean images, then up to {streams['shifted_images']} under "
        f"the shift ({streams['per_shift']} streams per shift, from {streams['shift_pool']} images computed per "
        "shift); the delay counts images from the shift's onset. Corruption parameters: CIFAR-10-C (Hendrycks & "
        "Dietterich 2019), reimplemented in the script."
    )
    clean_base = clean["base_accuracy"]
    missed = [row for row in data["shifts"].values() if row["detection_rate"] < 0.5]
    caught = [row for row in data["shifts"].values() if row["detection_rate"] >= 0.95]
    summary = f" {len(caught)} of {len(data['shifts'])} shifts are caught in at least 95 % of streams"
    if caught:
        summary += f", down to a base accuracy loss of {100 * min(clean_base - r['base_accuracy'] for r in caught):.1f} points"
    if missed:
        summary += (
            f"; {len(missed)} are missed in most streams, shifts that cost the base at most "
            f"{100 * max(clean_base - r['base_accuracy'] for r in missed):.1f} points (clean base top-1 "
            f"{pct(clean_base, 1)} %)"
        )
    return intro + summary + ".\n\n" + table(header, rows)


SECTIONS: list[Callable[[], str | None]] = [
    section_zoo,
    section_calibrate_evaluate,
    section_search,
    section_tradeoff,
    section_guarantee,
    section_esn,
    section_throughput,
    section_drift,
]


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
