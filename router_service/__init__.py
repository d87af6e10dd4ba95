"""router_service: see README.md in this folder."""
