"""The research harness: the experiments behind RESULTS.md, on top of train.py (python -m research.<name>)."""
