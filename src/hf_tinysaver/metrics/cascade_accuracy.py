"""Top-1 accuracy of a cascade, with its exit rate and agreement with the base, as an `evaluate` metric.

Shipped inside hf_tinysaver because `evaluate.load("accuracy")` fetches its script from the Hub; this file loads
offline with `evaluate.load(path)` (see `hf_tinysaver.evaluation.load_cascade_metric`).
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Top-1 accuracy of a TinySaver cascade's predictions and of the base model's predictions on the same images, the fraction of images that exited at the saver, and how often the cascade agrees with the base.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[int]`): The cascade's predicted class per image.
    references (`list[int]`): The true class per image.
    exited (`list[bool]`): Whether each image exited at the saver.
    base_predictions (`list[int]`): The base model's predicted class per image (the base alone).
Returns:
    accuracy, base_accuracy, exit_rate, agreement (cascade == base) as floats, and n.
Examples:
    >>> metric = evaluate.load("path/to/cascade_accuracy.py")
    >>> metric.compute(predictions=[0, 1], references=[0, 0], exited=[True, False], base_predictions=[0, 0])
    {'accuracy': 0.5, 'base_accuracy': 1.0, 'exit_rate': 0.5, 'agreement': 0.5, 'n': 2}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class CascadeAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Value("int64"),
                    "references": datasets.Value("int64"),
                    "exited": datasets.Value("bool"),
                    "base_predictions": datasets.Value("int64"),
                }
            ),
        )

    def _compute(self, predictions, references, exited, base_predictions):
        predictions = np.asarray(predictions)
        references = np.asarray(references)
        base_predictions = np.asarray(base_predictions)
        return {
            "accuracy": float(np.mean(predictions == references)),
            "base_accuracy": float(np.mean(base_predictions == references)),
            "exit_rate": float(np.mean(np.asarray(exited, dtype=bool))),
            "agreement": float(np.mean(base_predictions == predictions)),
            "n": int(len(predictions)),
        }
