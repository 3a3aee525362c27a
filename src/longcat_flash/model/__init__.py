"""The math of LongCat-Flash: single device, no torch.distributed, no cache policy, no losses."""
from .attention import MLA, LatentCache
from .block import ScMoELayer
from .moe import LocalDispatcher, MoE, Router, RoutingInfo, TokenDispatcher
from .mtp import MTPHead
from .transformer import ModelOutput, Transformer

__all__ = ["MLA", "LatentCache", "ScMoELayer", "LocalDispatcher", "MoE", "Router", "RoutingInfo",
           "TokenDispatcher", "MTPHead", "ModelOutput", "Transformer"]
