"""One prefix index for the registry and the router's mirror of it (see :mod:`.base`)."""

from kvroute.index.base import DEVICE, OFFLOADED, TIERS, HashArray, PrefixIndex
from kvroute.index.bitmask import BitmaskIndex
from kvroute.index.slots import SlotTable

__all__ = ["DEVICE", "OFFLOADED", "TIERS", "BitmaskIndex", "HashArray", "PrefixIndex",
           "SlotTable"]
