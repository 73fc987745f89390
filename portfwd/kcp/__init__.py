"""KCP, sans-IO: the ARQ engine (``engine``) and its wire codec (``wire``); imports nothing else
of portfwd."""

from .budget import ReassemblyBudget
from .engine import Kcp, KcpConfig
from .wire import (
           OVERHEAD,
           Cmd,
           ConvMismatch,
           MalformedSegment,
           conv_of,
           pack_segment,
           unpack_segments,
)

__all__ = ["Cmd", "ConvMismatch", "Kcp", "KcpConfig", "MalformedSegment", "OVERHEAD",
           "ReassemblyBudget", "conv_of", "pack_segment", "unpack_segments"]
