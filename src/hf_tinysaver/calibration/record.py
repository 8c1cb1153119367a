"""The calibration record: what a calibrated cascade or ESN stores in `config.calibration` and `calibration.json`.

Both kinds of cascade build one [`CalibrationRecord`] when they are calibrated (the plain cascade in
[`~hf_tinysaver.workflows.cascade.calibrate_cascade`], the ESN in [`~hf_tinysaver.workflows.esn.calibrate_and_evaluate`])
and store its [`CalibrationRecord.to_dict`] in the config, which keeps a plain dict (the shipped config classes do not
import hf_tinysaver). Readers (the model card, the drift monitor) go through [`CalibrationRecord.from_dict`], which
also reads the key names of older records, so cascades saved before still load and their cards still render.

The record holds no file paths: the trade-off plot of a saved cascade is the file `tradeoff.png` in its folder
([`~hf_tinysaver.storage.TRADEOFF_PLOT_FILE`]).

Example:

```python
>>> from hf_tinysaver.calibration.record import CalibrationRecord

>>> record = CalibrationRecord.from_dict({"objective": "max-drop", "threshold": 0.7, "drop": 0.4, "num_images": 500})
>>> record.accuracy_drop, record.n, record.date is None
(0.4, 500, True)
>>> CalibrationRecord.from_dict(record.to_dict()) == record
True
```
"""

from __future__ import annotations

import dataclasses
import datetime
from dataclasses import dataclass, field
from typing import Any

from ..models.configuration_tinysaver import TINYSAVER_VERSION

# Older key names -> the record's field names (the ESN's search results once named them so).
LEGACY_KEYS = {"drop": "accuracy_drop", "num_images": "n"}
# Keys old records held that the library no longer writes: the plot is found in the folder, not in the record.
DROPPED_KEYS = ("plot",)


def _today() -> str:
    return datetime.date.today().isoformat()


@dataclass
class CalibrationRecord:
    """The outcome of calibrating a cascade (saver then base) or an ESN (saver, ESN exits, then base).

    Every figure is measured on the calibration split. Fields a kind of cascade has no value for are None.

    Attributes:
        objective: The calibration objective (`"max-drop"`, `"exit-rate"`, `"budget"`, ...).
        threshold: The saver's threshold (an image exits when its confidence is greater).
        exit_rate: Fraction of images the saver answers.
        accuracy: Top-1 accuracy of the cascade.
        base_accuracy: Top-1 accuracy of the base alone.
        accuracy_drop: `100 * (base_accuracy - accuracy)`, in percentage points.
        relative_macs: Mean MACs per image of the cascade / MACs of the base alone.
        n: Number of calibration images.
        max_drop: The allowed accuracy drop of the `max-drop` objective (points).
        exit_thresholds: ESN only: the thresholds of the ESN exits after the saver.
        exit_rates: ESN only: the fraction of images answered at each answer point (saver, each exit, base).
        saver_accuracy: Top-1 accuracy of the saver alone.
        agreement: Fraction of images on which the cascade predicts what the base predicts.
        relative_saver_macs: Saver MACs / base MACs.
        confidence_level: The level of the accuracy guarantee, where one was asked for.
        certificate: The certificate of the chosen point (`method`, `target`, `level`, `n`, `bound`, ...), if any.
        certified_points: The certified operating points (for `set_operating_point`), if any.
        dataset: The calibration dataset (zoo name, folder or Hub id).
        split: The calibration split.
        shuffle_seed: The seed the split was permuted with before slicing, if any.
        saver: Name or path of the saver.
        base: Name or path of the base.
        confidence: The confidence metric.
        confidence_temperature: The temperature the saver's logits are divided by.
        hf_tinysaver_version: The library version that calibrated (None in records written before it was kept).
        date: ISO date of the calibration (None in records written before it was kept).
        provenance: What made the calibration: library, torch and transformers versions, device, hardware, dtype,
            threads and command ([`~hf_tinysaver.provenance.provenance`]; None in records written before it was
            kept).
        extra: Everything else the record holds (objective parameters, drift-monitor reference, search summary,
            ...), flattened into `to_dict()` after the fields.
    """

    objective: str | None = None
    threshold: float | None = None
    exit_rate: float | None = None
    accuracy: float | None = None
    base_accuracy: float | None = None
    accuracy_drop: float | None = None
    relative_macs: float | None = None
    n: int | None = None
    max_drop: float | None = None
    exit_thresholds: list[float] | None = None
    exit_rates: list[float] | None = None
    saver_accuracy: float | None = None
    agreement: float | None = None
    relative_saver_macs: float | None = None
    confidence_level: float | None = None
    certificate: dict[str, Any] | None = None
    certified_points: list[dict[str, Any]] | None = None
    dataset: str | None = None
    split: str | None = None
    shuffle_seed: int | None = None
    saver: str | None = None
    base: str | None = None
    confidence: str | None = None
    confidence_temperature: float | None = None
    hf_tinysaver_version: str | None = field(default_factory=lambda: TINYSAVER_VERSION)
    date: str | None = field(default_factory=_today)
    provenance: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.accuracy_drop is None and self.accuracy is not None and self.base_accuracy is not None:
            self.accuracy_drop = 100.0 * (self.base_accuracy - self.accuracy)

    @property
    def is_multi_exit(self) -> bool:
        """Whether this is an ESN's record (thresholds for exits after the saver)."""
        return self.exit_thresholds is not None

    @property
    def thresholds(self) -> list[float]:
        """Every threshold in exit order: the saver's, then the ESN exits' (empty when uncalibrated)."""
        return ([self.threshold] if self.threshold is not None else []) + list(self.exit_thresholds or [])

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready dict stored in `config.calibration` and `calibration.json`: every field, then `extra`."""
        output = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        output.update({key: value for key, value in self.extra.items() if key not in output})
        return output

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> CalibrationRecord:
        """Reads a record written by [`to_dict`] or by an earlier version of the library.

        Older key names (`drop`, `num_images`) are read as `accuracy_drop` and `n`; a record without `date` or
        `hf_tinysaver_version` keeps them None (it is not stamped now); the `plot` entry of older cascade records is
        dropped (the plot is `tradeoff.png` in the saved folder). Unknown keys go to `extra`.

        Args:
            data: The dict (e.g. `config.calibration`); None or `{}` gives an empty record.
        """
        data = dict(data or {})
        for old, new in LEGACY_KEYS.items():
            if old in data:
                value = data.pop(old)
                data.setdefault(new, value)
        for key in DROPPED_KEYS:
            data.pop(key, None)
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {name: data.pop(name, None) for name in names}
        return cls(**known, extra=data)

    @classmethod
    def create(cls, values: dict[str, Any]) -> CalibrationRecord:
        """A record of a calibration made now: `values` read as [`from_dict`] reads them, stamped with today's date,
        this library's version and, unless `values` holds one, the [`~hf_tinysaver.provenance.provenance`] of this
        process (pass `"provenance": model_provenance(model)` to record the model's device and dtype)."""
        from ..provenance import provenance

        record = cls.from_dict(values)
        record.date, record.hf_tinysaver_version = _today(), TINYSAVER_VERSION
        if record.provenance is None:
            record.provenance = provenance()
        return record


__all__ = ["CalibrationRecord"]
