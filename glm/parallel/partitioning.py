"""Logical axis names and the one rule table that maps them onto a mesh.

Every parameter and every main activation of the model carries logical axis
names (`nn.with_logical_partitioning` / `nn.with_logical_constraint`). Outside
of a mesh context the constraints are no-ops, so the model runs unchanged on one
device; `LOGICAL_AXIS_RULES` is what a sharded run hands to
`nn.logical_axis_rules` to place each logical axis on the mesh axes
(`data`, `fsdp`, `tensor`, `pipeline`; see glm/parallel/mesh.py). A run can
replace the table in gin (the name predates the `parallel` package):
`glm.mesh.axis_rules.table = [('batch', ('data', 'fsdp')), ...]`.

The defaults give: data parallelism (batch over data and fsdp), FSDP (the
embed dimension of every weight over fsdp), Megatron tensor parallelism
(column-parallel q/k/v and FFN-in on heads / mlp, row-parallel attention-out
and FFN-out on the same axes, vocab-parallel embedding and logits) and stages
of the stacked layer axis over pipeline.
"""

from __future__ import annotations

from typing import Any

# Logical names used by the model:
#   batch, length          activations' leading axes
#   embed                  model width (hidden)
#   heads, kv              attention heads and per-head dims
#   mlp                    feed-forward width
#   vocab                  (padded) vocabulary
#   layers                 the stacked layer axis of a scanned model
#   position               rows of a learned absolute position table
#   glu                    the two halves of a gated FFN (never sharded)
LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    ('batch', ('data', 'fsdp')),
    ('length', None),
    ('embed', 'fsdp'),
    ('heads', 'tensor'),
    ('kv', None),
    ('mlp', 'tensor'),
    ('vocab', 'tensor'),
    ('layers', 'pipeline'),
    ('position', None),
    ('glu', None),
)

LOGICAL_NAMES = frozenset(name for name, _ in LOGICAL_AXIS_RULES)
