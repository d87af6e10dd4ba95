"""engine_sim: see README.md in this folder."""
