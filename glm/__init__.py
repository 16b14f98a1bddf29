"""glm: BLOOM, GLM-130B and UL2-style language models in JAX/Flax.

Subpackages, by concern:
  glm.model           the Transformer, its config, attention, layers, positions
  glm.parallel        the device mesh, partitioning rules, pipeline, `glm plan`
  glm.training        the `train` entry point, steps, state, losses, optimisers
  glm.evaluation      held-out evaluation
  glm.inference       scoring and decoding
  glm.hf              Hugging Face BLOOM interop
  glm.data            corpus, tokenizer, objectives, batches (folder `data/`)
  glm.pallas_kernels  Pallas kernels (folder `pallas_kernels/`)
Top-level modules: `cli` (the `glm` command), `gin_config` (gin at the
edge) and `errors` (`UserError`, the base of every error meant for users).
"""

__version__ = '0.1.0'
