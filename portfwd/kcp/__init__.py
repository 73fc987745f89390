"""KCP, sans-IO: the ARQ engine (``engine``) and its wire codec (``wire``); imports nothing else
of portfwd."""

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

__all__ = ["Cmd", "ConvMismatch", "Kcp", "KcpConfig", "MalformedSegment", "OVERHEAD", "conv_of",
           "pack_segment", "unpack_segments"]
