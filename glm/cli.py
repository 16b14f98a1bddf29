"""The `glm` command line: `glm <subcommand> ...` or `python -m glm ...`.

  glm info    --gin_file F [--gin.NAME=VALUE ...] [--seq_len T]
  glm plan    --gin_file F --mesh tensor=4,pipeline=12 --device_memory 80GB
              [--zero1] [--micro_batch N] [--seq_len T] [--microbatches M]
              [--remat full|dots|dots_no_batch|none] [--dtype D] [--json]
              [--lower_layers L]
  glm train   --gin_file F [--gin_file F2 ...] [--gin.NAME=VALUE ...] --workdir W
              [--mesh data=2,tensor=2,pipeline=2] [--accept_new_settings]
              [--coordinator_address H:P --num_processes N --process_id I]
  glm launch-local --num_processes N [--devices_per_process K] -- <train args>
  glm convert hf-to-glm --hf_dir D --out C
  glm convert glm-to-hf --checkpoint C --out D
  glm score   --checkpoint C --input IN.jsonl --output OUT.jsonl
  glm generate --checkpoint C (--input IN.jsonl --output OUT.jsonl | --prompt
              TEXT) [--max_new_tokens N] [--temperature T] [--top_k K]
              [--top_p P] [--num_beams B] [--length_penalty A] [--seed S]
              [--batch_size N] [--mode auto|continue|infill]
  glm quantize --checkpoint C --bits 8|4 --out Q [--matmul xla|pallas|auto]
  glm eval    --checkpoint C --tasks T1,T2 [--include_path DIR]
              [--num_fewshot K] [--limit N] [--batch_size B]
              [--scoring auto|causal|glm] [--mesh data=N] [--data_dir D]
              [--log_samples] --output OUT.json
  glm sweep   --gin_file F [--gin.NAME=VALUE ...] (--sweep S.yaml | --axis
              NAME=V1,V2 ...) --workdir D [--parallel N] [--mesh M]
  glm plot    W1 W2 ... --out fig.png [--title T]
  glm data preview --task T [--n N --seed S --seq_len T]
  glm data card | fertility [--data_dir D]

Errors in the input (a bad gin binding, a missing file, a token outside the
vocab, ...) are `glm.errors.UserError`s: they print one line `glm <cmd>:
error: ...` and exit with status 2, leaving no partial output (GLM_DEBUG=1
shows their traceback too). Any other exception is a bug and shows its
traceback.

Each command imports what it needs when it runs, so that `glm --help` and
`glm info` start without loading the trainer, orbax or TensorFlow.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from typing import Sequence

from glm.errors import UserError


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog='glm', description='BLOOM, GLM-130B and UL2-style language models '
      'in JAX/Flax. Gin bindings are passed as --gin.NAME=VALUE.')
  sub = p.add_subparsers(dest='command', required=True, metavar='COMMAND')

  info = sub.add_parser('info', help='parameter and FLOP counts of a model '
                        'config (no weights are allocated)')
  info.add_argument('--gin_file', action='append', required=True)
  info.add_argument('--seq_len', type=int, default=None,
                    help='sequence length for the attention FLOPs '
                    '(default: the model max_len)')

  plan = sub.add_parser('plan', help='will it fit? per-device memory of '
                        'parameters, gradients, optimiser state and '
                        'activations on a mesh (nothing is allocated)')
  plan.add_argument('--gin_file', action='append', required=True)
  plan.add_argument('--mesh', default='',
                    help="axis sizes, e.g. 'tensor=4,pipeline=12,data=8'")
  plan.add_argument('--device_memory', required=True,
                    help='per-device memory: 80GB, 80G, 80e9 or 96GiB')
  plan.add_argument('--zero1', action='store_true',
                    help='shard the optimiser state over data (ZeRO-1)')
  plan.add_argument('--micro_batch', type=int, default=None,
                    help='rows per accumulation round (default: one row per '
                    'data shard per pipeline microbatch)')
  plan.add_argument('--seq_len', type=int, default=None)
  plan.add_argument('--microbatches', type=int, default=None,
                    help='pipeline microbatches (default: one per stage)')
  plan.add_argument('--remat', default=None,
                    help='none, full, dots or dots_no_batch (default: the '
                    "model's remat_policy)")
  plan.add_argument('--dtype', default='bfloat16', help='compute dtype')
  plan.add_argument('--param_dtype', default=None,
                    help='training weights and gradients: float32, or '
                    'bfloat16 with fp32 master weights in the optimiser '
                    "state (default: the model's param_dtype)")
  plan.add_argument('--json', action='store_true',
                    help='print a JSON object instead of the table')
  plan.add_argument('--lower_layers', type=int, default=0,
                    help='also lower the sharded train step with this many '
                    'layers on the full mesh (faked CPU devices)')

  train = sub.add_parser('train', help='train a model (t5x-style gin run)')
  train.add_argument('--gin_file', action='append', required=True)
  train.add_argument('--workdir', required=True)
  train.add_argument('--accept_new_settings', action='store_true',
                     help='resume a workdir whose run settings (batch, '
                     'sequence length, mixture, schedule, steps, dtype) '
                     'differ from this command\'s; the earlier config.gin '
                     'is kept and the step of the change recorded')
  train.add_argument('--mesh', default=None,
                     help="device mesh, e.g. 'data=2,tensor=2,pipeline=2' "
                     '(sets MeshConfig in gin; default: data over all)')
  train.add_argument('--coordinator_address', default=None,
                     help='host:port of process 0 (multi-host runs)')
  train.add_argument('--num_processes', type=int, default=None)
  train.add_argument('--process_id', type=int, default=None)

  launch = sub.add_parser(
      'launch-local', help='run `glm train` as N joined local processes '
      '(CPU collectives), for developing multi-host runs')
  launch.add_argument('--num_processes', type=int, required=True)
  launch.add_argument('--devices_per_process', type=int, default=1)
  launch.add_argument('train_args', nargs=argparse.REMAINDER,
                      help='-- followed by the arguments of glm train')

  convert = sub.add_parser('convert', help='Hugging Face BLOOM <-> glm')
  csub = convert.add_subparsers(dest='direction', required=True,
                                metavar='DIRECTION')
  h2g = csub.add_parser('hf-to-glm', help='HF BLOOM folder -> glm checkpoint')
  h2g.add_argument('--hf_dir', required=True)
  h2g.add_argument('--out', required=True)
  g2h = csub.add_parser('glm-to-hf', help='glm checkpoint -> HF BLOOM folder')
  g2h.add_argument('--checkpoint', required=True)
  g2h.add_argument('--out', required=True)

  score = sub.add_parser('score', help='per-token log-probs of sequences')
  score.add_argument('--checkpoint', required=True)
  score.add_argument('--input', required=True)
  score.add_argument('--output', required=True)
  score.add_argument('--batch_size', type=int, default=8)
  gen = sub.add_parser('generate', help='continue prompts: greedy, sampling '
                       '(temperature, top-k, top-p) or beam search')
  gen.add_argument('--checkpoint', required=True)
  gen.add_argument('--input')
  gen.add_argument('--output')
  gen.add_argument('--prompt')
  gen.add_argument('--max_new_tokens', type=int, default=64)
  gen.add_argument('--temperature', type=float, default=0.0,
                   help='0 (default) is greedy')
  gen.add_argument('--top_k', type=int, default=0)
  gen.add_argument('--top_p', type=float, default=1.0)
  gen.add_argument('--num_beams', type=int, default=1)
  gen.add_argument('--length_penalty', type=float, default=1.0)
  gen.add_argument('--seed', type=int, default=0)
  gen.add_argument('--batch_size', type=int, default=8)
  gen.add_argument('--mode', default='auto',
                   help="auto (default: infill prompts holding [MASK] / "
                   "[sMASK] / [gMASK], continue the rest), continue, or "
                   "infill (GLM blank infilling; [gMASK] appended where a "
                   "prompt has no blank)")
  qz = sub.add_parser('quantize', help='INT8 / INT4 weight-only copy of a '
                      'checkpoint (GLM-130B scheme)')
  qz.add_argument('--checkpoint', required=True)
  qz.add_argument('--bits', type=int, required=True)
  qz.add_argument('--out', required=True)
  qz.add_argument('--matmul', default='xla',
                  help='the quantised matmul: xla (default), pallas (the '
                  'kernel) or auto (the kernel on GPU / TPU)')
  ev = sub.add_parser('eval', help='lm-evaluation-harness tasks (glm\'s '
                      'local zero-shot suite: --tasks glm_zero_shot)')
  ev.add_argument('--checkpoint', required=True)
  ev.add_argument('--tasks', required=True,
                  help='comma-separated task or group names')
  ev.add_argument('--include_path', action='append', default=[],
                  help='a folder of task YAMLs (repeatable)')
  ev.add_argument('--num_fewshot', type=int, default=None)
  ev.add_argument('--limit', default=None,
                  help='examples per task (or a fraction below 1)')
  ev.add_argument('--batch_size', type=int, default=8)
  ev.add_argument('--scoring', default='auto',
                  help="auto (default), causal, or glm (continuations as "
                  "Part B of a [gMASK] example, as GLM-130B scores)")
  ev.add_argument('--mesh', default=None,
                  help="split the batch over devices, e.g. 'data=8'")
  ev.add_argument('--data_dir', default='.cache/data',
                  help='the corpus folder the local tasks are built from')
  ev.add_argument('--log_samples', action='store_true',
                  help='keep every request and response in OUT.json')
  ev.add_argument('--output', required=True)
  from glm.experiments import sweep_cli  # pylint: disable=g-import-not-at-top
  sweep_cli.add_parsers(sub)
  data = sub.add_parser('data', help='inspect data: preview examples, the '
                        'data card, the tokenizer fertility report')
  dsub = data.add_subparsers(dest='data_command', required=True,
                             metavar='DATA_COMMAND')
  preview = dsub.add_parser('preview', help='print N unpacked examples of a '
                            'task, one JSON object per line')
  preview.add_argument('--task', required=True)
  preview.add_argument('--n', type=int, default=3)
  preview.add_argument('--seed', type=int, default=0)
  preview.add_argument('--seq_len', type=int, default=128)
  preview.add_argument('--split', default='train', choices=('train', 'valid'))
  preview.add_argument('--data_dir', default='.cache/data')
  for name, text in (('card', 'write and print the data card'),
                     ('fertility', 'tokenizer fertility per language')):
    dsub.add_parser(name, help=text, add_help=False)  # report_cli parses
  return p


def _cmd_data(args, bindings) -> None:
  del bindings
  if args.data_command != 'preview':
    from glm.data import report_cli  # pylint: disable=g-import-not-at-top
    code = report_cli.main([args.data_command, *args.rest])
    if code:
      raise SystemExit(code)
    return
  from glm.data import pipeline  # pylint: disable=g-import-not-at-top
  if args.task not in pipeline.TASKS:
    raise UserError(f'--task {args.task!r} is not one of {pipeline.TASKS}.')
  if args.n < 1 or args.seq_len < 16:
    raise UserError(f'--n={args.n} must be >= 1 and --seq_len='
                     f'{args.seq_len} >= 16.')
  split = pipeline.open_split(os.path.abspath(args.data_dir), args.split,
                              seed=0)
  pipe = pipeline.Pipeline(split, pipeline.DataConfig.for_task(args.task),
                           seq_len=args.seq_len, seed=args.seed)
  for i in range(args.n):
    record = pipeline.preview_record(pipe.example(args.task, i),
                                     split.special)
    print(json.dumps(record, ensure_ascii=False), flush=True)


def _cmd_info(args, bindings) -> None:
  from glm import gin_config  # pylint: disable=g-import-not-at-top
  from glm.model import info as model_info  # pylint: disable=g-import-not-at-top
  from glm.model.config import ModelConfig  # pylint: disable=g-import-not-at-top
  gin_config.parse(args.gin_file, bindings)
  print(json.dumps(model_info.info(ModelConfig(), args.seq_len)))


def _cmd_plan(args, bindings) -> None:
  from glm import gin_config  # pylint: disable=g-import-not-at-top
  from glm.parallel import mesh  # pylint: disable=g-import-not-at-top
  from glm.parallel import plan  # pylint: disable=g-import-not-at-top
  from glm.model.config import ModelConfig  # pylint: disable=g-import-not-at-top
  gin_config.parse(args.gin_file, bindings)
  overrides = {'zero1': True} if args.zero1 else {}
  if args.microbatches is not None:
    overrides['microbatches'] = args.microbatches
  mc = mesh.MeshConfig.parse(args.mesh, **overrides)
  if args.lower_layers:  # before anything asks JAX for its backend
    import jax  # pylint: disable=g-import-not-at-top
    jax.config.update('jax_num_cpu_devices', mc.num_devices)
    jax.config.update('jax_platforms', 'cpu')
  cfg = ModelConfig()
  if args.param_dtype is not None:
    cfg = cfg.replace(param_dtype=args.param_dtype)
  result = plan.plan(cfg, mc, device_memory=args.device_memory,
                     micro_batch=args.micro_batch, seq_len=args.seq_len,
                     remat=args.remat, dtype=args.dtype)
  if args.lower_layers:
    result['lowered'] = plan.lower_train_step(
        cfg.replace(dtype=args.dtype, remat_policy=result['remat']),
        mc, layers=args.lower_layers,
        micro_batch=result['micro_batch'], seq_len=result['seq_len'])
  print(json.dumps(result) if args.json else plan.format_plan(result))
  if args.lower_layers and not args.json:
    low = result['lowered']
    print(f'lowered the sharded train step with {low["layers"]} layers on '
          f'{low["devices"]} faked devices in {low["lower_s"]:.1f}s '
          f'({low["collective_permutes"]} collective permutes, '
          f'{low["all_reduces"]} all-reduces in the StableHLO)')


def _cmd_train(args, bindings) -> None:
  multi = (args.coordinator_address, args.num_processes, args.process_id)
  if any(v is not None for v in multi):
    if any(v is None for v in multi):
      raise UserError('--coordinator_address, --num_processes and '
                       '--process_id go together; give all three.')
    import jax  # pylint: disable=g-import-not-at-top
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(args.coordinator_address, args.num_processes,
                               args.process_id)
  from glm import gin_config  # pylint: disable=g-import-not-at-top
  from glm.parallel import mesh  # pylint: disable=g-import-not-at-top
  from glm.training import loop  # pylint: disable=g-import-not-at-top
  if args.mesh is not None:
    sizes = mesh.MeshConfig.parse(args.mesh).shape
    bindings = [*bindings, 'train.mesh = @MeshConfig()',
                *(f'MeshConfig.{a} = {n}' for a, n in sizes.items())]
  gin_config.parse(args.gin_file, bindings)
  gin_config.check_required('train')
  loop.train(workdir=args.workdir,
             accept_new_settings=args.accept_new_settings)


def _cmd_launch_local(args, bindings) -> None:
  del bindings
  from glm.parallel import launch  # pylint: disable=g-import-not-at-top
  train_args = args.train_args
  if train_args[:1] == ['--']:
    train_args = train_args[1:]
  if not train_args:
    raise UserError('give the train arguments after --, as in glm '
                     'launch-local --num_processes 2 -- --gin_file F '
                     '--workdir W.')
  launch.launch_local(args.num_processes, train_args,
                      devices_per_process=args.devices_per_process)


def _cmd_convert(args, bindings) -> None:
  del bindings
  from glm.data import hf_tokenizer  # pylint: disable=g-import-not-at-top
  from glm.hf import bloom as hf_bloom  # pylint: disable=g-import-not-at-top
  from glm.inference import scoring  # pylint: disable=g-import-not-at-top
  from glm.model import checkpoint  # pylint: disable=g-import-not-at-top
  if args.direction == 'hf-to-glm':
    if not os.path.isdir(args.hf_dir):
      raise hf_bloom.HFConversionError(
          f'--hf_dir {args.hf_dir!r} is not a folder; pass a Hugging Face '
          'BLOOM folder with config.json.')
    cfg, params, hf = hf_bloom.hf_to_glm(args.hf_dir)
    tok_path = os.path.join(args.hf_dir, 'tokenizer.json')
    tok_path = tok_path if os.path.isfile(tok_path) else None
    if tok_path:
      tok = hf_tokenizer.HFTokenizer(tok_path)
      if tok.vocab_size > cfg.vocab_size:
        raise hf_bloom.HFConversionError(
            f'{tok_path} has {tok.vocab_size} ids but the model only '
            f'{cfg.vocab_size}; put the tokenizer the model was trained '
            'with in --hf_dir.')
    out = checkpoint.save(args.out, cfg, params, tokenizer_path=tok_path,
                          meta={'converted_from': 'hf-bloom',
                                'hf_config': hf})
    print(f'wrote glm checkpoint {out}'
          + ('' if tok_path else ' (no tokenizer.json in --hf_dir: text '
             'input needs one)'), file=sys.stderr)
  else:
    cfg = checkpoint.load_config(args.checkpoint)
    hf_bloom.check_bloom_compatible(cfg)
    _, params = checkpoint.load(args.checkpoint)
    hf_extra = checkpoint.read_manifest(args.checkpoint)['meta'].get(
        'hf_config')
    hf, sd = hf_bloom.glm_to_hf(cfg, params, hf_extra)
    tok = scoring.checkpoint_tokenizer(args.checkpoint)
    with checkpoint.atomic_dir(args.out) as tmp:
      if tok is not None:
        hf.update(hf_tokenizer.write_for_transformers(tok, tmp))
      hf_bloom.write_hf_dir(tmp, hf, sd)
    print(f'wrote Hugging Face BLOOM folder {os.path.abspath(args.out)}'
          + ('' if tok else ' (the checkpoint has no tokenizer)'),
          file=sys.stderr)


def _cmd_score(args, bindings) -> None:
  del bindings
  from glm.inference import scoring  # pylint: disable=g-import-not-at-top
  if args.batch_size < 1:
    raise UserError(f'--batch_size={args.batch_size} must be >= 1.')
  scoring.run(args.checkpoint, args.input, args.output,
              batch_size=args.batch_size)


def _cmd_quantize(args, bindings) -> None:
  del bindings
  from glm.inference import quantize  # pylint: disable=g-import-not-at-top
  quantize.run(args.checkpoint, bits=args.bits, out=args.out,
               matmul=args.matmul)


def _cmd_generate(args, bindings) -> None:
  del bindings
  from glm.inference import generate_cli  # pylint: disable=g-import-not-at-top
  options = generate_cli.Options(
      max_new_tokens=args.max_new_tokens, temperature=args.temperature,
      top_k=args.top_k, top_p=args.top_p, num_beams=args.num_beams,
      length_penalty=args.length_penalty, seed=args.seed,
      batch_size=args.batch_size, mode=args.mode)
  generate_cli.run(args.checkpoint, input_path=args.input,
                   output_path=args.output, prompt=args.prompt,
                   options=options)


def _cmd_eval(args, bindings) -> None:
  del bindings
  from glm.evaluation import eval_cli  # pylint: disable=g-import-not-at-top
  if args.batch_size < 1:
    raise UserError(f'--batch_size={args.batch_size} must be >= 1.')
  eval_cli.run(args.checkpoint, tasks=args.tasks, output=args.output,
               include_path=args.include_path, num_fewshot=args.num_fewshot,
               limit=args.limit, batch_size=args.batch_size,
               scoring=args.scoring, mesh=args.mesh, data_dir=args.data_dir,
               log_samples=args.log_samples)


def _cmd_sweep(args, bindings) -> int:
  from glm.experiments import sweep_cli  # pylint: disable=g-import-not-at-top
  return sweep_cli.cmd_sweep(args, bindings)


def _cmd_plot(args, bindings) -> None:
  del bindings
  from glm.experiments import sweep_cli  # pylint: disable=g-import-not-at-top
  sweep_cli.cmd_plot(args)


_COMMANDS = {'info': _cmd_info, 'plan': _cmd_plan, 'train': _cmd_train,
             'launch-local': _cmd_launch_local,
             'convert': _cmd_convert, 'score': _cmd_score,
             'quantize': _cmd_quantize,
             'generate': _cmd_generate, 'eval': _cmd_eval,
             'data': _cmd_data, 'sweep': _cmd_sweep, 'plot': _cmd_plot}


def _quiet_closed_loop(hook):
  """An unraisable-exception hook that drops asyncio's 'Event loop is
  closed' errors.

  When one array of an orbax checkpoint fails to read, orbax closes its
  event loop while TensorStore still completes the other reads; their
  callbacks then fail on TensorStore's threads and Python reports each as
  an unraisable exception, after glm has already named the real problem.
  """
  def quiet(unraisable):
    exc = unraisable.exc_value
    if isinstance(exc, RuntimeError) and str(exc) == 'Event loop is closed':
      return
    hook(unraisable)
  return quiet


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  sys.unraisablehook = _quiet_closed_loop(sys.unraisablehook)
  own = argv.index('--') if 'launch-local' in argv[:1] and '--' in argv else (
      len(argv))  # launch-local passes everything after -- to train
  bindings = [a[len('--gin.'):] for a in argv[:own] if a.startswith('--gin.')]
  rest = [a for a in argv[:own] if not a.startswith('--gin.')] + argv[own:]
  args, extra = _parser().parse_known_args(rest)
  if getattr(args, 'data_command', None) in ('card', 'fertility'):
    args.rest = extra  # options of glm.data.report_cli
  elif extra:
    _parser().error(f'unrecognized arguments: {" ".join(extra)}')
  if bindings and args.command not in ('info', 'plan', 'train', 'sweep'):
    _parser().error(f'--gin.* bindings are not used by {args.command}.')
  bad = [b for b in bindings if '=' not in b]
  if bad:
    _parser().error(f'--gin.{bad[0]} has no value; write --gin.NAME=VALUE.')
  name = {'convert': lambda: f'convert {args.direction}',
          'data': lambda: f'data {args.data_command}'}.get(
              args.command, lambda: args.command)()
  try:
    rc = _COMMANDS[args.command](args, bindings)
  except UserError as e:
    if os.environ.get('GLM_DEBUG'):
      raise
    msg = ' '.join(str(e).split())
    # gin appends where the error was raised; the message already says it.
    msg = re.sub(r"\s*In call to configurable '[^']*' \(.*\)$", '', msg)
    print(f'glm {name}: error: {msg}', file=sys.stderr)
    return 2
  return rc or 0  # glm sweep: 1 when a variant failed


if __name__ == '__main__':
  sys.exit(main())
