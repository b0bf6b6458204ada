"""Environments behind one protocol: the embedded MuJoCo minibench and (optionally) RLBench."""
