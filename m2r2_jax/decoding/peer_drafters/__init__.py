"""The training-free speculative peers as drafters in the shared loop (decoding/speculative.py):
Draft & Verify / LayerSkip-style layer skipping, Lookahead decoding, REST; and `--drafter` options."""

from m2r2_jax.decoding.peer_drafters.draft_verify import DraftVerify, search_skip
from m2r2_jax.decoding.peer_drafters.lookahead import Lookahead
from m2r2_jax.decoding.peer_drafters.options import DRAFTERS, draft_options
from m2r2_jax.decoding.peer_drafters.rest import Datastore, Rest

__all__ = ["DRAFTERS", "Datastore", "DraftVerify", "Lookahead", "Rest", "draft_options", "search_skip"]
