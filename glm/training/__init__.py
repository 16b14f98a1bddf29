"""Training: the `train` entry point (a gin configurable) and its parts.

  loop         `train(...)`: the run, read top to bottom as a loop of named
               steps (restore, build data, step, log, evaluate, checkpoint)
  step         the jitted train and eval steps (micro-batch accumulation,
               NaN / spike policy, sharded under a mesh)
  state        the train state layout, its initialisation and shardings
  losses       cross-entropy, z-loss and the chunked output-layer loss
  optimizers   AdamW, learning-rate tables, batch-size ramps
  workdir      the run's files: config, settings history, metrics, progress,
               preemption
  checkpoints  the run's orbax checkpoints; broken ones skipped and kept
  tensorboard  TensorBoard event files without TensorFlow

The package is named `training` so that it never shadows the `train` gin
configurable.
"""
