"""Parallelism: the device mesh and everything laid out on it.

  partitioning  logical axis names and the one rule table to mesh axes
  mesh          `MeshConfig`, validation, the mesh, parameter and batch specs
  pipeline      GPipe and circular pipeline schedules (shard_map + ppermute)
  plan          `glm plan`: will a run fit? per-device memory on a mesh
  launch        `glm launch-local`: N joined processes on one machine

`partitioning`, `mesh` and `pipeline` do not import the model: the model's
logical axes, layer function and attention context are passed in.
"""
