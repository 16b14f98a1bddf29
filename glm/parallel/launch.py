"""`glm launch-local`: several `glm train` processes on one machine.

For developing and testing multi-host runs without a cluster: N processes on
this machine, each with its own CPU devices, joined by `jax.distributed`
(process 0 hosts the coordinator, CPU collectives over gloo). Process 0's
output streams to the terminal; every process also writes
W/logs/process_<i>.log. If any process exits with an error, the others are
stopped and the message names the one that failed.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from typing import Sequence

from glm.errors import UserError


class LaunchError(UserError):
  """A launch that cannot start or a process that failed."""


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _workdir(train_args: Sequence[str]) -> str:
  for i, a in enumerate(train_args):
    if a == '--workdir' and i + 1 < len(train_args):
      return train_args[i + 1]
    if a.startswith('--workdir='):
      return a.split('=', 1)[1]
  raise LaunchError('the train arguments need --workdir W (after --).')


def _stop(procs, grace_s: float = 10.0) -> None:
  for p in procs:
    if p.poll() is None:
      p.send_signal(signal.SIGTERM)
  deadline = time.time() + grace_s
  for p in procs:
    try:
      p.wait(timeout=max(0.1, deadline - time.time()))
    except subprocess.TimeoutExpired:
      p.kill()
      p.wait()


def launch_local(num_processes: int, train_args: Sequence[str], *,
                 devices_per_process: int = 1, poll_s: float = 0.2) -> None:
  """Runs `glm train <train_args>` as `num_processes` joined processes."""
  if num_processes < 1:
    raise LaunchError(f'--num_processes={num_processes} must be >= 1.')
  if devices_per_process < 1:
    raise LaunchError(f'--devices_per_process={devices_per_process} must be '
                      '>= 1.')
  train_args = list(train_args)
  if train_args[:1] == ['train']:
    train_args = train_args[1:]
  for flag in ('--coordinator_address', '--num_processes', '--process_id'):
    if any(a.split('=')[0] == flag for a in train_args):
      raise LaunchError(f'{flag} is set by launch-local; remove it from the '
                        'train arguments.')
  workdir = os.path.abspath(_workdir(train_args))
  logs = os.path.join(workdir, 'logs')
  os.makedirs(logs, exist_ok=True)
  address = f'localhost:{free_port()}'
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             JAX_NUM_CPU_DEVICES=str(devices_per_process))
  procs, files = [], []
  print(f'glm launch-local: {num_processes} processes x '
        f'{devices_per_process} CPU device(s), coordinator {address}, logs in '
        f'{logs}', flush=True)
  try:
    for i in range(num_processes):
      cmd = [sys.executable, '-m', 'glm', 'train', *train_args,
             '--coordinator_address', address,
             '--num_processes', str(num_processes), '--process_id', str(i)]
      log = open(os.path.join(logs, f'process_{i}.log'), 'w')
      files.append(log)
      if i == 0:  # stream process 0 and keep a copy in its log
        p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, bufsize=1)
        os.set_blocking(p.stdout.fileno(), False)
      else:
        p = subprocess.Popen(cmd, env=env, stdout=log,
                             stderr=subprocess.STDOUT)
      procs.append(p)
    while True:
      _pump(procs[0], files[0])
      codes = [p.poll() for p in procs]
      failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
      if failed:
        i, code = failed[0]
        _stop(procs)
        _pump(procs[0], files[0])
        raise LaunchError(
            f'process {i} of {num_processes} exited with status {code}; '
            f'stopped the others. See {logs}/process_{i}.log.')
      if all(c == 0 for c in codes):
        _pump(procs[0], files[0])
        return
      time.sleep(poll_s)
  except KeyboardInterrupt:
    _stop(procs)
    raise
  finally:
    for f in files:
      f.close()


def _pump(proc, log) -> None:
  """Copies what process 0 printed so far to the terminal and its log."""
  try:
    text = proc.stdout.read()
  except (TypeError, ValueError):
    return
  if text:
    sys.stdout.write(text)
    sys.stdout.flush()
    log.write(text)
    log.flush()
