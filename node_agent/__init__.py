"""node_agent: see README.md in this folder."""
