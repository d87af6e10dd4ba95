"""The OpenAI-compatible HTTP gateway (``kvroute serve gateway``); see README.md."""
