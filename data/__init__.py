"""Corpus, tokenizer and batch building for glm (import name `glm.data`).

The repository folder `data/` is installed as `glm.data`, so no generic
top-level `data` module lands in site-packages. Its modules turn text that
ships on the machine into training inputs: `corpus` builds a deterministic,
atomically written JSONL corpus with a manifest of its sources (Debian manual
pages in many languages, made readable by `troff`, and Python standard-library
docstrings); `tokenizer` trains and wraps a byte-fallback SentencePiece BPE
model that reserves the GLM and UL2 special tokens; `causal_lm` turns a corpus
split into a cached token stream and serves resume-exact causal-LM batches.
"""
