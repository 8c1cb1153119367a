"""Publish a calibrated cascade on the Hub with a generated model card, then load it back by repo id.

    python examples/push_to_hub.py --model cifar10-cascade --repo-id your-name/cifar10-resnet20-resnet56

The token comes from `hf auth login` or HF_TOKEN. HF_ENDPOINT points the client at another Hub (the tests use a
local server that speaks the Hub's HTTP API).
"""

import argparse

from transformers import AutoModelForImageClassification, pipeline

from hf_tinysaver.hub.push import push_cascade

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--model", "-m", required=True, help="A saved (ideally calibrated) cascade folder.")
parser.add_argument("--repo-id", required=True)
parser.add_argument("--private", action="store_true")
args = parser.parse_args()

commit = push_cascade(args.model, args.repo_id, private=args.private, commit_message="Upload TinySaver cascade")
print(f"pushed: {commit.commit_url}")

# Anyone can now use it like any Hub classifier.
cascade = AutoModelForImageClassification.from_pretrained(args.repo_id, trust_remote_code=True)
classifier = pipeline("image-classification", model=args.repo_id, trust_remote_code=True)
print(
    f"loaded {type(cascade).__name__} with threshold {cascade.config.threshold:.4f}; labels: {classifier.model.config.num_labels}"
)
