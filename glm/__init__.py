"""glm: BLOOM, GLM-130B and UL2-style language models in JAX/Flax.

Modules: `config` (the frozen ModelConfig), `transformer` (the model),
`attention`, `layers`, `positions`, `partitioning` (logical axis names),
`losses`, `train`, `decoding`, `scoring`, `checkpoint`, `hf_bloom`
(Hugging Face BLOOM interop), `model_info` (parameter and FLOP counts),
`gin_config` and `cli`. `glm.data` (the repository's `data/` folder) builds
corpora, tokenizers and batches; `glm.pallas_kernels` holds the kernels.
"""

__version__ = '0.1.0'
