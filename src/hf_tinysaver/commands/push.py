"""`tinysaver push REPO_ID FOLDER`: upload a saved cascade with its generated model card to the Hugging Face Hub.

The arguments come in the order of `hf upload REPO_ID LOCAL_PATH`. The old order `FOLDER REPO_ID` still works for one
release, with a deprecation warning: it is recognised by which of the two arguments is an existing folder.
"""

from __future__ import annotations

import argparse
import os
import warnings


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Registers the `push` subcommand."""
    parser = subparsers.add_parser(
        "push",
        help="upload a saved cascade, its processor, remote code and a generated model card to the Hub",
        description=(
            "Uploads a cascade folder written by `save_pretrained` to a Hub model repo in one commit: weights, "
            "config, processor, remote-code files, a model card generated from the calibration record (README.md) "
            "and the calibration's trade-off plot. The repo is created if needed. The arguments come in the order "
            "of `hf upload REPO_ID LOCAL_PATH`; the old order FOLDER REPO_ID still works for now, with a warning."
        ),
    )
    parser.add_argument("repo_id", metavar="REPO_ID", help="target repo, namespace/name")
    parser.add_argument("folder", metavar="FOLDER", help="folder written by `cascade.save_pretrained(FOLDER)`")
    parser.add_argument(
        "--token", default=None, help="Hub token with write access (default: HF_TOKEN, or `hf auth login`)"
    )
    parser.add_argument("--private", action="store_true", default=None, help="create the repo as private")
    parser.add_argument("--commit-message", default=None, help="commit message")
    parser.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing to main")
    parser.add_argument("--plot", default=None, help="trade-off plot (PNG) to show in the card")
    parser.add_argument("--card-only", action="store_true", help="upload only the model card (and the plot)")
    parser.set_defaults(func=run_push)
    return parser


def _is_repo_id(text: str) -> bool:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


def resolve_push_arguments(first: str, second: str) -> tuple[str, str]:
    """`(repo_id, folder)` from `push`'s two positional arguments, given as `REPO_ID FOLDER` or, deprecated,
    `FOLDER REPO_ID`.

    The old order is recognised when the first argument is an existing folder and the second is not, or when neither
    is a folder and only the second is a valid repo id (e.g. a mistyped path first); it warns with a `FutureWarning`.
    """
    old_order = (os.path.isdir(first) and not os.path.isdir(second)) or (
        not os.path.isdir(first) and not os.path.isdir(second) and not _is_repo_id(first) and _is_repo_id(second)
    )
    if not old_order:
        return first, second
    warnings.warn(
        f"`tinysaver push FOLDER REPO_ID` is deprecated and will stop working in the next release; the arguments "
        f"now come in the order of `hf upload`: `tinysaver push {second} {first}`.",
        FutureWarning,
        stacklevel=2,
    )
    return second, first


def run_push(args: argparse.Namespace) -> int:
    from ..hub.push import push_cascade

    repo_id, folder = resolve_push_arguments(args.repo_id, args.folder)
    # A `HubPushError` reaches `tinysaver`'s main, which prints it as one line and exits with 2.
    commit = push_cascade(
        folder,
        repo_id,
        token=args.token,
        private=args.private,
        commit_message=args.commit_message,
        create_pr=args.create_pr,
        plot=args.plot,
        card_only=args.card_only,
    )
    print(commit.pr_url or commit.commit_url)
    return 0


__all__ = ["add_parser", "resolve_push_arguments", "run_push"]
