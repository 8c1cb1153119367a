"""Which tiny ImageNet model should save EfficientNet-Lite2? Search the zoo, then check the winner on held-out images.

Candidates: MobileNet v1 0.25@128 / 0.5@160 / 0.75@192, MobileNet v2 1.0@224 (converted from int8 TFLite) and
EfficientNet-Lite0/1, on 1,300 real ImageNet validation images: search on the first half, evaluate the winning
calibrated cascade for real on the second half.

    python examples/search_imagenet.py [--max-drop 0.5] [--out imagenet-cascade] [--limit 200]
"""

import argparse

from hf_tinysaver.workflows.cascade import evaluate_cascade
from hf_tinysaver.workflows.search import save_winning_cascade, search_savers

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--base", default="efficientnet-lite2")
parser.add_argument(
    "--candidates",
    nargs="+",
    default=["mobilenet-v1-0.25-128", "mobilenet-v1-0.5-160", "mobilenet-v1-0.75-192", "mobilenet-v2-1.0-224",
             "efficientnet-lite0", "efficientnet-lite1"],
)  # fmt: skip
parser.add_argument("--max-drop", type=float, default=0.5)
parser.add_argument("--limit", type=int, default=None, help="Images per half (quick runs); default: all 650.")
parser.add_argument("--out", default="imagenet-cascade")
args = parser.parse_args()

search_split, evaluation_split = "validation[:50%]", "validation[50%:]"
if args.limit:
    search_split, evaluation_split = f"validation[:{args.limit}]", f"validation[650:{650 + args.limit}]"

result = search_savers(args.base, args.candidates, "imagenet-val-1300", search_split, primary_max_drop=args.max_drop)
print(result.table())
if result.winner is None:
    raise SystemExit(f"No candidate saves {args.base} at a {args.max_drop}-point drop.")

cascade, calibration = save_winning_cascade(result, args.out)
held_out = evaluate_cascade(cascade, "imagenet-val-1300", evaluation_split)
print(f"winner {result.winner.name}: {calibration.describe()}")
print(
    f"held-out ({held_out['n']} images): accuracy {100 * held_out['accuracy']:.2f} % vs base "
    f"{100 * held_out['base_accuracy']:.2f} %, exit rate {held_out['exit_rate']:.3f}, "
    f"relative MACs {held_out['relative_macs']:.3f}"
)
