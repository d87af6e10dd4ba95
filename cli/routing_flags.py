"""The routing core's policy flags, shared by every role that builds a routing core.

``kvroute serve router``, ``serve gateway`` and ``serve epp`` all run the same core, so they take
the same policy settings (``--kv-*``, ``--session-*``, ``--random-*``) and the decode-node
settings of prefill/decode pairs (``--pd-*``), declared and read here once.
"""

from __future__ import annotations

import argparse
from typing import Any

from kvroute.settings import add_arguments, from_namespace
from router_service.disagg import DisaggSettings
from router_service.policies.factory import settings_classes


def add_policy_arguments(p: argparse.ArgumentParser) -> None:
    """One argument group per policy settings class, plus the prefill/decode pair settings."""
    for cls in settings_classes():
        add_arguments(p.add_argument_group(f"{cls.__name__} (policy settings)"),  # type: ignore[arg-type]
                      cls)
    add_arguments(p.add_argument_group("DisaggSettings (decode node of prefill/decode pairs)"),  # type: ignore[arg-type]
                  DisaggSettings)


def policy_settings(args: argparse.Namespace) -> dict[type[Any], Any]:
    """The settings objects :func:`add_policy_arguments` declared, read from ``args``."""
    return {cls: from_namespace(cls, args) for cls in [*settings_classes(), DisaggSettings]}
