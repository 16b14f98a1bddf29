"""Pallas kernels for GPU (Triton) and TPU (Mosaic), import name
`glm.pallas_kernels`.

The fused attention kernels (ALiBi bias and causal / prefix / GLM / packed
masks computed in-kernel), fused LayerNorm and the int4 dequantising matmul
land here with the kernels issue; the model currently uses the plain XLA
attention in `glm.attention`, which is what those kernels will be tested
against.
"""
