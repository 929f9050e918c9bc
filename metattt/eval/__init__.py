"""Experiments and their reports: the speculative-decoding evaluation (static / TTT / meta
conditions, paired differences), the TTT sweep, and the guided-decoding evaluation. The
algorithms they measure live in metattt.spec and metattt.ttt."""
