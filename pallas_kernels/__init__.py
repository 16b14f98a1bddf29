"""Pallas kernels for GPU (Triton) and TPU (Mosaic), import name
`glm.pallas_kernels`.

  attention      `flash_attention`: fused softmax attention with ALiBi and
                 the causal / prefix / packed-segment pattern computed in
                 the kernel, forward and backward; `BlockSizes`; the plain
                 jnp references (`flash_attention_reference`,
                 `mha_forward_reference`, `mha_backward_reference`)
  common         what both backends share: BlockSizes, the tile-skipping
                 `block_map`, the in-tile pattern `tile_scores`
  attention_gpu  its Triton kernels (forward, dq, dk/dv)
  attention_tpu  its Mosaic kernels (forward, dq, dk/dv)

Import the modules (this file is documentation only, as every package
init here): `from glm.pallas_kernels import attention` and call
`attention.flash_attention(...)`. The model reaches them through
`ModelConfig.attention_impl = 'pallas'` or `'auto'` (`glm.model.fused`).
"""
