"""`tinysaver push DIR REPO_ID`: upload a saved cascade with its generated model card to the Hugging Face Hub."""

from __future__ import annotations

import argparse

from ..hub.push import push_cascade


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Registers the `push` subcommand."""
    parser = subparsers.add_parser(
        "push",
        help="upload a saved cascade, its processor, remote code and a generated model card to the Hub",
        description=(
            "Uploads a cascade folder written by `save_pretrained` to a Hub model repo in one commit: weights, "
            "config, processor, remote-code files, a model card generated from the calibration record (README.md) "
            "and the calibration's trade-off plot. The repo is created if needed."
        ),
    )
    parser.add_argument("directory", metavar="DIR", help="folder written by `cascade.save_pretrained(DIR)`")
    parser.add_argument("repo_id", metavar="REPO_ID", help="target repo, namespace/name")
    parser.add_argument(
        "--token", default=None, help="Hub token with write access (default: HF_TOKEN, or `hf auth login`)"
    )
    parser.add_argument("--private", action="store_true", default=None, help="create the repo as private")
    parser.add_argument("-m", "--commit-message", default=None, help="commit message")
    parser.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing to main")
    parser.add_argument("--plot", default=None, help="trade-off plot (PNG) to show in the card")
    parser.add_argument("--card-only", action="store_true", help="upload only the model card (and the plot)")
    parser.set_defaults(func=run_push)
    return parser


def run_push(args: argparse.Namespace) -> int:
    # A `HubPushError` reaches `tinysaver`'s main, which prints it as one line and exits with 2.
    commit = push_cascade(
        args.directory,
        args.repo_id,
        token=args.token,
        private=args.private,
        commit_message=args.commit_message,
        create_pr=args.create_pr,
        plot=args.plot,
        card_only=args.card_only,
    )
    print(commit.pr_url or commit.commit_url)
    return 0


__all__ = ["add_parser", "run_push"]
