"""kvroute shared core: block hashing, API stubs, settings, errors, telemetry.

This package imports no service package (enforced by import-linter).
"""

__version__ = "0.1.0"
