"""Scores of benchmarks as a whole, as their evaluation code computes them: captioning (CIDEr-D, BLEU), the yes/no
benchmarks POPE and MME (per-answer metrics are :mod:`lit_internvl.scoring`'s); ``evaluate`` prints them."""
