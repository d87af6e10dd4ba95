"""The ``kvroute`` command: the one place that wires components together."""
