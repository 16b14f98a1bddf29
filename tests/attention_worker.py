"""Sharded train steps with each attention implementation, on 8 faked CPUs.

  JAX_NUM_CPU_DEVICES=8 python tests/attention_worker.py OUT_DIR [--wide]

For every family of tests/parallel_worker.py it runs a few real sharded train
steps with attention_impl 'pallas' (the GPU kernel in interpret mode, inside
shard_map) and 'blockwise' on the data x tensor x pipeline layout
(`DEFAULT_RUNS`; every family and implementation, and FSDP too, with
--wide), and the one-device 'xla' steps they must equal, writing
OUT_DIR/<family>/<impl>_<layout>.npz. Then it exports the sharded 'pallas'
train step of the GLM family (every family with --wide) for 'cuda' and
'tpu' and writes OUT_DIR/export.json (platforms, serialised size, kernel
custom calls found in the module).
Run by tests/test_attention_sharded.py in a subprocess.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

if __name__ == '__main__':  # before JAX starts; never when imported by tests
  os.environ.setdefault('JAX_NUM_CPU_DEVICES', '8')

import jax  # pylint: disable=g-import-not-at-top
import numpy as np

from glm.pallas_kernels import attention as pallas_kernels
from glm.parallel import mesh as mesh_lib
from glm.training import state as state_lib
from glm.training import step as step_lib

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import parallel_worker  # pylint: disable=g-import-not-at-top,wrong-import-position

IMPLS = ('pallas', 'blockwise')
# The default suite's share (the rest runs with --wide, behind `slow`):
# family -> implementations on the data x tensor x pipeline layout.
DEFAULT_RUNS = {'glm': ('pallas', 'blockwise')}
WIDE_LAYOUTS = ('combo', 'fsdp')
EXPORTED = ('glm',)
STEPS = 2


def export_step(cfg, platform: str) -> dict:
  """Exports the sharded 'pallas' train step for `platform`."""
  opt = parallel_worker.optimizer()
  state = parallel_worker.init_state(cfg, opt)
  mc = mesh_lib.MeshConfig.parse('data=2,tensor=2,pipeline=2',
                                 microbatches=2)
  mesh = mesh_lib.make_mesh(mc, jax.devices()[:mc.num_devices])
  step, _ = step_lib.make_train_step(cfg, opt, mesh_cfg=mc, mesh=mesh)
  state = jax.device_put(state, state_lib.state_shardings(state, cfg, mc,
                                                         mesh))
  batch = parallel_worker.make_batches('bloom', 1)[0]
  batch = jax.device_put(batch, mesh_lib.batch_shardings(batch, mesh))
  exported = step.export(state, batch, platforms=(platform,),
                         disabled_checks=pallas_kernels.EXPORT_CHECKS)
  blob = exported.serialize()
  back = jax.export.deserialize(blob)
  text = exported.mlir_module()
  return {'platforms': list(back.platforms), 'bytes': len(blob),
          'devices': back.nr_devices,
          'triton_calls': text.count('__gpu$xla.gpu.triton'),
          'mosaic_calls': text.count('tpu_custom_call')}


def main(out_dir: str, wide: bool) -> None:
  exports = {}
  for family, base in parallel_worker.FAMILIES.items():
    impls = IMPLS if wide else DEFAULT_RUNS.get(family, ())
    if not impls:
      continue
    os.makedirs(os.path.join(out_dir, family), exist_ok=True)
    batches = parallel_worker.make_batches(family, STEPS)
    ref = parallel_worker.run(base, batches, None)
    np.savez(os.path.join(out_dir, family, 'xla_single.npz'), **ref)
    for impl in impls:
      cfg = dataclasses.replace(base, attention_impl=impl)
      for layout in WIDE_LAYOUTS if wide else ('combo',):
        got = parallel_worker.run(cfg, batches, layout)
        np.savez(os.path.join(out_dir, family, f'{impl}_{layout}.npz'), **got)
        print(family, impl, layout, got['losses'], flush=True)
    if family not in EXPORTED and not wide:
      continue
    cfg = dataclasses.replace(base, attention_impl='pallas')
    exports[family] = {p: export_step(cfg, p) for p in ('cuda', 'tpu')}
    print(family, exports[family], flush=True)
  with open(os.path.join(out_dir, 'export.json'), 'w') as f:
    json.dump(exports, f, indent=1)


if __name__ == '__main__':
  main(sys.argv[1], '--wide' in sys.argv[2:])
