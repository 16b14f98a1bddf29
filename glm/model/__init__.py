"""The model: one configurable Transformer for BLOOM, GLM-130B and UL2.

Modules (import them directly, e.g. `from glm.model import transformer`):
  config       the frozen `ModelConfig` every module receives
  transformer  the Flax module `Transformer` and parameter helpers
  attention    the attention description (`AttentionSpec`), the one entry
               point `attention(q, k, v, spec, impl=...)` and its `'xla'`
               implementation, the `Attention` layer
  layers       `dense` (every weight product), norms, the MLP, embeddings
  positions    ALiBi slopes and bias, RoPE (1D and GLM's 2D), position ids
  info         parameter and FLOP counts from shapes alone
  checkpoint   self-describing model folders (config + weights + tokenizer)

This package imports nothing from the rest of glm except `glm.errors`:
parallelism (a pipeline runner) is handed to the Transformer, not imported.
"""
