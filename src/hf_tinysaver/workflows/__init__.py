"""The library side of every command: cascade, ESN, search, timing and the demo."""
