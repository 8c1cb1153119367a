"""Wall-clock timing of a cascade against its base alone, interleaved so machine noise hits both alike."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def timed(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def time_cascade(
    cascade,
    saver_inputs: torch.Tensor,
    base_inputs: torch.Tensor,
    batch_size: int,
    repeats: int = 5,
    progress: Callable[[str], None] | None = None,
    speedups_only: bool = False,
) -> dict:
    """Times the cascade and its parts on the same preprocessed images, interleaved over `repeats` rounds.

    Variants timed each round, in turn: the base alone, the cascade (`forward` per batch), the saver alone, the base
    on exactly the sub-batches the cascade sends it, the streamed cascade (`forward_stream`: the base runs on full
    batches of the images that did not exit) and the base on those full batches; then, batch by batch in
    alternating order, the cascade with nothing exiting and the saver followed by the base called directly. Medians
    give the realised speedups, the speedup MACs predict (`1 / relative_macs` at the exit rate measured on these
    images), the composition bounds (saver + base on the batches the cascade sends it: a cascade with zero
    bookkeeping) and the cascade's own overhead.

    Args:
        cascade: A `TinySaverForImageClassification` in eval mode, with MACs in its config.
        saver_inputs: `(n, C, H, W)` images prepared for the saver.
        base_inputs: The same images prepared for the base (the saver inputs when preprocessing is shared).
        batch_size: Images per call; the first `n - n % batch_size` images are used.
        repeats: Interleaved rounds; medians are reported.
        progress: Called with one line after the warm-up and after each round (e.g. `print`), so a long timing is
            never silent.
        speedups_only: Time only the base alone, the cascade and the streamed cascade (what the realised and
            streamed speedups need), with a one-batch warm-up; the composition bounds and the overhead, which need
            the saver and the base timed apart, are then None. A fraction of the full timing's cost (the demo uses
            it).

    Returns:
        A dict of images/s, speedups, their ratios, the overhead and the median seconds of every variant.
    """
    n = saver_inputs.shape[0] - saver_inputs.shape[0] % batch_size if saver_inputs.shape[0] >= batch_size else 0
    if n == 0:
        raise ValueError(f"Timing needs at least batch_size={batch_size} images, got {saver_inputs.shape[0]}.")
    batches = [(saver_inputs[i : i + batch_size], base_inputs[i : i + batch_size]) for i in range(0, n, batch_size)]
    saver, base = cascade.saver, cascade.base
    with torch.inference_mode():
        exited = torch.cat([cascade(pixel_values=s, base_pixel_values=b).exited for s, b in batches])
    remaining_batches = [
        b[~e] for (_, b), e in zip(batches, exited.split(batch_size), strict=True) if int((~e).sum()) > 0
    ]
    remaining_full_batches = list(torch.cat(remaining_batches).split(batch_size)) if remaining_batches else []

    def run_base():
        for _, base_batch in batches:
            base(pixel_values=base_batch)

    def run_cascade():
        for saver_batch, base_batch in batches:
            cascade(pixel_values=saver_batch, base_pixel_values=base_batch)

    def run_saver():
        for saver_batch, _ in batches:
            saver(pixel_values=saver_batch)

    def run_base_on_remaining():
        for base_batch in remaining_batches:
            base(pixel_values=base_batch)

    def paired_overhead_seconds() -> tuple[float, float]:
        # Per batch, the cascade with nothing exiting and the saver + base called directly, alternating which goes
        # first: slow drifts of the machine's speed then hit both alike, which whole-pass timings cannot promise.
        cascade_seconds = direct_seconds = 0.0
        for index, (saver_batch, base_batch) in enumerate(batches):
            for variant in (0, 1) if index % 2 == 0 else (1, 0):
                start = time.perf_counter()
                if variant == 0:
                    cascade(pixel_values=saver_batch, base_pixel_values=base_batch, threshold=1.0)
                    cascade_seconds += time.perf_counter() - start
                else:
                    saver(pixel_values=saver_batch)
                    base(pixel_values=base_batch)
                    direct_seconds += time.perf_counter() - start
        return cascade_seconds, direct_seconds

    def run_cascade_streamed():
        stream_inputs = ({"pixel_values": s, "base_pixel_values": b} for s, b in batches)
        for _ in cascade.forward_stream(stream_inputs, base_batch_size=batch_size):
            pass

    def run_base_on_remaining_full_batches():
        for base_batch in remaining_full_batches:
            base(pixel_values=base_batch)

    variants = {
        "base": run_base,
        "cascade": run_cascade,
        "saver": run_saver,
        "base_on_remaining": run_base_on_remaining,
        "cascade_streamed": run_cascade_streamed,
        "base_on_remaining_full_batches": run_base_on_remaining_full_batches,
    }
    if speedups_only:
        variants = {name: variants[name] for name in ("base", "cascade", "cascade_streamed")}
    times = {name: [] for name in [*variants, "cascade_nothing_exits", "saver_then_base"]}
    overheads = []
    report = progress or (lambda line: None)
    started = time.perf_counter()
    with torch.inference_mode():
        if speedups_only:  # warm-up on one batch: allocator, oneDNN primitive caches of both models
            saver_batch, base_batch = batches[0]
            cascade(pixel_values=saver_batch, base_pixel_values=base_batch, threshold=1.0)
        else:
            for function in [*variants.values(), paired_overhead_seconds]:  # warm-up: allocator, oneDNN caches
                function()
        timed_variants = len(variants) + (0 if speedups_only else 2)
        report(
            f"  warm-up done ({time.perf_counter() - started:.0f} s); {repeats} timed rounds of {timed_variants} "
            f"variants on {n} images follow"
        )
        for round_index in range(repeats):
            for name, function in variants.items():
                times[name].append(timed(function))
            if not speedups_only:
                cascade_seconds, direct_seconds = paired_overhead_seconds()
                times["cascade_nothing_exits"].append(cascade_seconds)
                times["saver_then_base"].append(direct_seconds)
                overheads.append(cascade_seconds / direct_seconds - 1)
            report(
                f"  round {round_index + 1}/{repeats}: base alone {times['base'][-1]:.2f} s, cascade "
                f"{times['cascade'][-1]:.2f} s ({time.perf_counter() - started:.0f} s so far)"
            )
    median = {name: statistics.median(values) for name, values in times.items() if values}

    exit_rate = float(exited.float().mean())
    relative_macs = cascade.config.saver_macs / cascade.config.base_macs + (1 - exit_rate)
    realised = median["base"] / median["cascade"]
    predicted = 1 / relative_macs
    composition = None if speedups_only else median["saver"] + median["base_on_remaining"]
    streamed_composition = None if speedups_only else median["saver"] + median["base_on_remaining_full_batches"]
    return {
        "batch_size": batch_size,
        "n": n,
        "exit_rate": exit_rate,
        "relative_macs": relative_macs,
        "base_images_per_second": n / median["base"],
        "cascade_images_per_second": n / median["cascade"],
        "realised_speedup": realised,
        "mac_predicted_speedup": predicted,
        "realised_over_predicted": realised / predicted,
        "composition_bound_speedup": None if composition is None else median["base"] / composition,
        "realised_over_composition_bound": None if composition is None else composition / median["cascade"],
        "overhead_vs_saver_then_base": statistics.median(overheads) if overheads else None,
        "streamed_images_per_second": n / median["cascade_streamed"],
        "streamed_speedup": median["base"] / median["cascade_streamed"],
        "streamed_over_predicted": median["base"] / median["cascade_streamed"] / predicted,
        "streamed_composition_bound_speedup": None
        if streamed_composition is None
        else median["base"] / streamed_composition,
        "median_seconds": median,
        "repeats": repeats,
    }


def measure_speedup(
    cascade,
    images: list,
    batch_size: int = 64,
    repeats: int = 3,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Times the cascade against its base alone on `images` with the cascade's own processor: the realised speedup
    (`forward` per batch), the streamed one (`forward_stream`) and the speedup MACs predict at the exit rate of these
    images ([`time_cascade`] with `speedups_only=True`). The demo and `tinysaver evaluate --measure-speedup` use it.

    Args:
        cascade: A `TinySaverForImageClassification` in eval mode, with MACs in its config.
        images: PIL images; the first `len(images) - len(images) % batch_size` are timed.
        batch_size: Images per call.
        repeats: Interleaved rounds; medians are reported.
        progress: Called with one line per round.

    Returns:
        [`time_cascade`]'s dict.
    """
    inputs = cascade.get_image_processor()(images=images, return_tensors="pt")
    pixel_values = inputs["pixel_values"]
    return time_cascade(
        cascade,
        pixel_values,
        inputs.get("base_pixel_values", pixel_values),
        batch_size,
        repeats=repeats,
        progress=progress,
        speedups_only=True,
    )


__all__ = ["measure_speedup", "time_cascade"]
