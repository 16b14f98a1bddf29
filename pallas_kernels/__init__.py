"""Pallas kernels for GPU (Triton) and TPU (Mosaic), import name
`glm.pallas_kernels`.

The fused attention kernels (ALiBi bias and causal / prefix / GLM / packed
masks computed in-kernel from a `glm.model.attention.AttentionSpec`), fused
LayerNorm and the int4 dequantising matmul land here with the kernels work;
the model uses the `'xla'` implementation of `glm.model.attention.attention`
today, which is the reference those kernels will be tested against.
"""
