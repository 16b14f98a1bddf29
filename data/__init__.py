"""Corpus, tokenizer and batch building for glm (import name `glm.data`).

The repository folder `data/` is installed as `glm.data`, so no generic
top-level `data` module lands in site-packages. Its modules turn text that
ships on the machine into training inputs: `sources` lists and reads that text
(Debian manual pages in many languages, made readable by `troff`, and the
Python standard library's docstrings and code); `corpus` builds from it a
deterministic, atomically written JSONL corpus with a manifest of the files
used; `tokenizer` trains and wraps a byte-fallback SentencePiece BPE
model that reserves the GLM and UL2 special tokens; `token_stream` turns a
split into a cached token stream; the objectives (`objectives`,
`glm_objective`, `ul2_objective`, `instructions`) build examples and
`pipeline` packs them into resume-exact batches (`tasks` registers them with
seqio).
Bad input (arguments, config, files) raises `errors.DataError`, a
`glm.errors.UserError`.
"""
