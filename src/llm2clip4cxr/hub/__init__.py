"""Publishing checkpoints on the Hugging Face Hub: the push itself (`push`), the load checks run first in fresh
processes (`verify`, `verify_worker`), the model card rendered from the `hub_cards/` templates (`cards`) and
what kind of checkpoint a folder holds (`folder`).

    from llm2clip4cxr.hub import push_to_hub

    plan = push_to_hub("runs/contrastive/model", "my-org/llm2vec4cxr-small", dry_run=True)
"""

from .cards import build_card, model_card
from .folder import checkpoint_kind
from .push import PushPlan, files_to_push, merge_adapter, push_to_hub
from .verify import NOT_TRIED, CheckpointVerificationError, verify_checkpoint

__all__ = [
    "NOT_TRIED", "CheckpointVerificationError", "PushPlan", "build_card", "checkpoint_kind", "files_to_push",
    "merge_adapter", "model_card", "push_to_hub", "verify_checkpoint",
]
