"""`llm2clip4cxr push`: check a saved checkpoint, render its model card and upload it to the Hugging Face Hub."""

import json

from . import common

DESCRIPTION = """\
Upload a saved LLM2Vec4CXR / LLM2CLIP4CXR checkpoint (or a peft LoRA adapter folder) to the Hub.
Before uploading, the folder must hold safetensors weights only (pickle files are refused) and load in a
fresh Python process through this package; with --trust-remote-code also through its own remote code and,
for text encoders, through sentence-transformers (those checks run the folder's Python files, so they are
not tried without it). README.md is rendered from the package's card template, with the evaluation
results (--results, default the folder's results.json) as its model-index. Authentication: HF_TOKEN or
`hf auth login` (the token is never printed). --dry-run lists the files and prints the card, offline."""


def register(commands) -> None:
    parser = commands.add_parser(
        "push", help="publish a checkpoint on the Hugging Face Hub", description=DESCRIPTION, parents=[common.JSON]
    )
    parser.add_argument("model_dir", help="a folder written by save_pretrained, or a peft adapter folder")
    parser.add_argument("--repo-id", required=True, help="the Hub repository, ORG/NAME (created if missing)")
    parser.add_argument("--private", action="store_true", help="create the repository private")
    parser.add_argument(
        "--revision", help="branch to commit to (created if missing); with --create-pr, the PR's target"
    )
    parser.add_argument(
        "--commit-message", help="commit message (default: 'Upload <kind> checkpoint with llm2clip4cxr')"
    )
    parser.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    parser.add_argument("--dry-run", action="store_true", help="check and print the files and the card; send nothing")
    parser.add_argument(
        "--results", help="results.json of `llm2clip4cxr eval` for the model-index (default: MODEL_DIR/results.json)"
    )
    parser.add_argument("--results-model", help="which model of --results this checkpoint is (when it holds several)")
    parser.add_argument(
        "--model-name", help="name shown on the card (default: the folder's card's, else the repo name)"
    )
    parser.add_argument(
        "--base-model", help="Hub id of the base model (required for an adapter trained on a local folder)"
    )
    parser.add_argument(
        "--merge", action="store_true", help="merge a LoRA adapter into its base and push the merged weights"
    )
    parser.add_argument(
        "--keep-card", action="store_true", help="push the folder's own README.md instead of rendering one"
    )
    parser.add_argument(
        "--no-verify", action="store_true", help="skip the fresh-process load checks (not recommended)"
    )
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="also verify loading through the folder's own Python files (runs them)")
    parser.set_defaults(handler=run)


def run(args) -> int:
    from ..hub import push_to_hub

    plan = push_to_hub(
        args.model_dir, args.repo_id, private=args.private, revision=args.revision,
        commit_message=args.commit_message, create_pr=args.create_pr, dry_run=args.dry_run,
        results=args.results, results_model=args.results_model, model_name=args.model_name,
        base_model=args.base_model, keep_card=args.keep_card, merge=args.merge, verify=not args.no_verify,
        trust_remote_code=args.trust_remote_code,
    )
    if args.json:
        print(json.dumps({**plan.to_dict(), "dry_run": args.dry_run}, indent=2))
        return common.EXIT_OK
    print(plan.describe())
    if args.dry_run:
        print(f"dry run: nothing was sent to {args.repo_id}.")
    elif plan.commit is not None:
        where = getattr(plan.commit, "pr_url", None) or getattr(plan.commit, "commit_url", None)
        print(f"pushed {len(plan.paths_in_repo())} files to {args.repo_id}: {where}")
    return common.EXIT_OK
