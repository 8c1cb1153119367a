"""Wall-clock throughput, bookkeeping overhead and peak memory of a TinySaver cascade vs. its base model alone.

Cascade and base run interleaved in one process (several repeats, medians), on the same preprocessed images, so
machine noise hits both alike. Reported per batch size:

- images/s of the cascade and of the base alone, the realised speedup, the speedup predicted from MACs
  (`1 / relative_macs` at the exit rate measured on these images) and their ratio, for the cascade called once per
  batch (`forward`: the base runs on each batch's few remaining images) and streamed (`forward_stream`: the base
  runs on full batches of remaining images collected across input batches);
- the composition bounds: the measured saver time at the full batch plus the measured base time on exactly the
  batches each mode sends it, i.e. what a cascade with zero bookkeeping would take;
- overhead: the cascade with a threshold that exits nothing vs. the saver followed by the base called directly.

Cascade and base alone both run as prepared by `optimize_for_inference()` (flags below switch each part off).

Peak resident memory at batch 64 is measured in fresh processes (one per variant).

Usage (a calibrated cascade first, e.g. the CIFAR-10 one of `calibrate_evaluate.py`):
    python benchmarks/calibrate_evaluate.py --task cifar10 --out-dir /tmp/bench/cascades \
        --results-file benchmarks/results/calibrate_evaluate_cifar10.json
    python benchmarks/throughput.py --model /tmp/bench/cascades/cifar10-in_sample --dataset cifar10 \
        --split 'test[50%:]' --num-images 2048 --results-file benchmarks/results/throughput_cifar10.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import torch

from hf_tinysaver.provenance import PROVENANCE_KEY, provenance
from hf_tinysaver.workflows.timing import time_cascade


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", "-m", required=True, help="A saved cascade folder (e.g. from `tinysaver calibrate`)."
    )
    parser.add_argument("--dataset", "-d", required=True, help="Zoo dataset name, local dataset folder or Hub id.")
    parser.add_argument("--split", default="test", help="Split with `datasets` slicing, e.g. 'test[50%%:]'.")
    parser.add_argument("--num-images", type=int, default=2048, help="Images to time on (first N of the split).")
    parser.add_argument("--batch-sizes", "-b", type=int, nargs="+", default=[1, 16, 64, 256])
    parser.add_argument("--repeats", type=int, default=5, help="Interleaved repeats; medians are reported.")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads.")
    parser.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="optimize_for_inference(channels_last=...): channels-last conv weights.",
    )
    parser.add_argument(
        "--fold-batch-norm",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="optimize_for_inference(fold_batch_norm=...): batch norms folded into convolutions.",
    )
    parser.add_argument(
        "--retain-memory",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="optimize_for_inference(retain_memory=...): glibc keeps freed memory for reuse (process-wide).",
    )
    parser.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True, help="Measure peak RSS.")
    parser.add_argument("--results-file", default=None, help="Write the results as JSON here.")
    parser.add_argument("--assets", default=None, help="Assets folder for zoo datasets (default: ../shared).")
    parser.add_argument("--_memory-probe", dest="memory_probe", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def load_cascade(args):
    """Loads the cascade and prepares it with `optimize_for_inference`; the base alone is timed as the cascade's own
    `cascade.base`, so both always run with the same optimisations."""
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    import hf_tinysaver.models  # noqa: F401  (registers the Auto classes)

    cascade = AutoModelForImageClassification.from_pretrained(args.model)
    cascade.optimize_for_inference(
        channels_last=args.channels_last, fold_batch_norm=args.fold_batch_norm, retain_memory=args.retain_memory
    )
    return cascade, AutoImageProcessor.from_pretrained(args.model)


def preprocessed_inputs(processor, dataset, split, num_images, assets):
    from hf_tinysaver.workflows.cascade import load_dataset_split

    data = load_dataset_split(dataset, split, assets=assets)
    data = data.select(range(min(num_images, len(data))))
    image_column = "image" if "image" in data.column_names else "img"
    inputs = processor(images=list(data[image_column]), return_tensors="pt")
    saver_inputs = inputs["pixel_values"]
    return saver_inputs, inputs.get("base_pixel_values", saver_inputs)


def memory_probe(args) -> None:
    """Runs in a fresh process: loads one variant, runs batch 64 three times while a thread samples the resident set
    size every millisecond, and prints the peak and its increase over the idle, loaded process as JSON (MiB)."""
    import gc
    import threading

    import psutil

    cascade, processor = load_cascade(args)
    saver_inputs, base_inputs = preprocessed_inputs(processor, args.dataset, args.split, 64, args.assets)
    gc.collect()
    process = psutil.Process()
    idle = process.memory_info().rss
    peak = idle
    running = True

    def sample():
        nonlocal peak
        while running:
            peak = max(peak, process.memory_info().rss)
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    with torch.inference_mode():
        for _ in range(3):
            if args.memory_probe == "base":
                cascade.base(pixel_values=base_inputs)
            else:
                cascade(pixel_values=saver_inputs, base_pixel_values=base_inputs)
    running = False
    sampler.join()
    mib = 1024 * 1024
    print(
        json.dumps(
            {"peak_rss_mib": peak / mib, "idle_rss_mib": idle / mib, "forward_increase_mib": (peak - idle) / mib}
        )
    )


def measure_memory(args) -> dict:
    results = {}
    for variant in ("base", "cascade"):
        command = [sys.executable, __file__, "--model", args.model, "--dataset", args.dataset, "--split", args.split]
        command += ["--threads", str(args.threads), "--_memory-probe", variant]
        for flag in ("channels_last", "fold_batch_norm", "retain_memory"):
            command += [("--" if getattr(args, flag) else "--no-") + flag.replace("_", "-")]
        if args.assets:
            command += ["--assets", args.assets]
        output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        results[variant] = json.loads(output.strip().splitlines()[-1])
    results["batch_size"] = 64
    results["cascade_over_base_peak"] = results["cascade"]["peak_rss_mib"] / results["base"]["peak_rss_mib"]
    results["cascade_over_base_forward_increase"] = (
        results["cascade"]["forward_increase_mib"] / results["base"]["forward_increase_mib"]
    )
    return results


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_probe:
        memory_probe(args)
        return None
    cascade, processor = load_cascade(args)
    saver_inputs, base_inputs = preprocessed_inputs(processor, args.dataset, args.split, args.num_images, args.assets)
    rows = []
    for batch_size in args.batch_sizes:
        row = time_cascade(cascade, saver_inputs, base_inputs, batch_size, args.repeats)
        rows.append(row)
        print(
            f"batch {batch_size:>4}: base {row['base_images_per_second']:8.1f} img/s, cascade "
            f"{row['cascade_images_per_second']:8.1f} img/s, speedup {row['realised_speedup']:.2f}x "
            f"(MACs predict {row['mac_predicted_speedup']:.2f}x, ratio {row['realised_over_predicted']:.2f}; "
            f"composition bound {row['composition_bound_speedup']:.2f}x), overhead "
            f"{100 * row['overhead_vs_saver_then_base']:+.1f} %; streamed {row['streamed_images_per_second']:8.1f} "
            f"img/s, speedup {row['streamed_speedup']:.2f}x (ratio {row['streamed_over_predicted']:.2f}; bound "
            f"{row['streamed_composition_bound_speedup']:.2f}x)",
            flush=True,
        )
    results = {
        "command": "python benchmarks/throughput.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "model": str(args.model),
        "dataset": args.dataset,
        "split": args.split,
        "threshold": cascade.config.threshold,
        "saver_macs": cascade.config.saver_macs,
        "base_macs": cascade.config.base_macs,
        "channels_last": args.channels_last,
        "fold_batch_norm": args.fold_batch_norm,
        "retain_memory": args.retain_memory,
        "threads": args.threads,
        "machine": {
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "throughput": rows,
    }
    if args.memory:
        results["memory"] = measure_memory(args)
        print(f"peak RSS at batch 64: {json.dumps(results['memory'])}")
    results[PROVENANCE_KEY] = provenance(
        device=next(cascade.parameters()).device,
        dtype=next(cascade.parameters()).dtype,
        argv=["python", "benchmarks/throughput.py", *(sys.argv[1:] if argv is None else argv)],
    )
    if args.results_file:
        from hf_tinysaver.workflows.cascade import write_json_atomic

        write_json_atomic(args.results_file, results)
    return results


if __name__ == "__main__":
    main()
