"""UPipe ("Untied Ulysses"): headwise-chunked context-parallel attention."""

from .ops import upipe_attention
from .schedule import UPipeSchedule, valid_chunk_heads

__all__ = ["UPipeSchedule", "upipe_attention", "valid_chunk_heads"]
