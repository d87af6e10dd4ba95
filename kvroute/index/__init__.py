"""One prefix index for the registry and the router's mirror of it (see :mod:`.base`)."""

from kvroute.index.base import HashArray, PrefixIndex
from kvroute.index.bitmask import BitmaskIndex
from kvroute.index.slots import SlotTable

__all__ = ["BitmaskIndex", "HashArray", "PrefixIndex", "SlotTable"]
