"""glm as a model of EleutherAI's lm-evaluation-harness (`lm_eval`).

`GlmLM` (registered as `glm`: `lm_eval --model glm --model_args
checkpoint=DIR`) loads any glm checkpoint (trained here, converted from
Hugging Face with its tokenizer, or quantised) or wraps a model in memory
(the trainer's periodic evaluation). It answers the harness's three request
types:

- `loglikelihood(context, continuation)` -> (sum log p(continuation),
  is_greedy). Token splits are the harness's own (`TemplateLM`: the context
  and continuation are encoded together and split), so they equal those of
  lm-eval's `hf` model on the same tokenizer.
- `loglikelihood_rolling(text)` -> the text's log-likelihood, scored in the
  harness's disjoint windows of at most `max_len` tokens, each with as much
  context as fits (`lm_eval.utils.get_rolling_token_windows`).
- `generate_until(context, gen_kwargs)` -> text, by KV-cache generation
  (`glm.inference.generate`), cut at the first stop string; a context that
  holds a blank ([MASK], [sMASK], [gMASK]) of a GLM tokenizer is infilled
  and the last blank's span returned (the blanks before it are few-shot
  examples', each followed by its answer).

Scoring is packed: every (context, continuation) pair is one segment, the
segments are packed first-fit into rows of `pack_len` tokens (longer ones
into rows of their own length bucket) with segment ids, and rows are batched
`batch_size` at a time, so the model compiles one shape per length bucket.
With a mesh the rows split over its data axes.

How a pair is scored (`scoring`): 'causal' feeds context + continuation
left to right, as lm-eval's `hf` model does; 'glm' scores the continuation
as GLM-130B does, as Part B of a [gMASK] example whose Part A (seen
bidirectionally) is the context; 'auto' (default) picks 'glm' for a
checkpoint trained mostly on GLM blank infilling and 'causal' otherwise.
The context length is the checkpoint's `max_len`.
"""

from __future__ import annotations

import collections
import functools
import sys
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from lm_eval import utils as lm_utils
# The harness indexes its own models only while its registry is empty: do
# it before `glm` joins, so that `hf` and the rest stay available.
import lm_eval.models  # pylint: disable=unused-import
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
import numpy as np

from glm.errors import UserError
from glm.inference import generate as generate_lib
from glm.inference import generate_cli
from glm.inference import infill as infill_lib
from glm.inference import scoring as scoring_lib
from glm.model import checkpoint as checkpoint_lib
from glm.model.config import ModelConfig
from glm.model.transformer import Transformer

SCORING = ('auto', 'causal', 'glm')


@functools.partial(jax.jit, static_argnums=0)
def _target_logprobs(cfg: ModelConfig, params: Any, batch: dict):
  """[R, T] log p(targets) and whether each target is the argmax."""
  inputs = {k: v for k, v in batch.items() if k != 'targets'}
  logits = Transformer(cfg).apply({'params': params}, inputs)
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  tgt = batch['targets']
  lp = jnp.take_along_axis(logp, tgt[..., None], axis=-1)[..., 0]
  return lp, jnp.argmax(logits, axis=-1) == tgt


def pack(lengths: Sequence[int], pack_len: int, max_len: int
         ) -> list[tuple[int, list[tuple[int, int]]]]:
  """Rows of segments: [(row length, [(segment, offset), ...]), ...].

  A segment of n tokens goes to a row of max(bucket(n), pack_len) tokens
  (`pack_len` capped at `max_len`), first fit in decreasing length."""
  pack_len = min(pack_len, max_len)
  rows: list[tuple[int, list[tuple[int, int]]]] = []
  free: dict[int, list[int]] = collections.defaultdict(list)  # len -> rows
  used: list[int] = []
  for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
    n = lengths[i]
    length = max(scoring_lib.bucket(n, max_len), pack_len)
    for r in free[length]:
      if used[r] + n <= length:
        rows[r][1].append((i, used[r]))
        used[r] += n
        break
    else:
      free[length].append(len(rows))
      rows.append((length, [(i, 0)]))
      used.append(n)
  return rows


def _causal_segment(ctx: Sequence[int], cont: Sequence[int],
                    max_len: int) -> dict:
  """Context + continuation, left-truncated to `max_len` inputs (as
  lm-eval's `hf` model does); the last len(cont) targets are scored."""
  whole = (list(ctx) + list(cont))[-(max_len + 1):]
  n = len(whole) - 1
  return {'tokens': whole[:-1], 'targets': whole[1:],
          'position_ids': list(range(n)), 'prefix': [False] * n,
          'scored': min(len(cont), n)}


def _glm_segment(ctx: Sequence[int], cont: Sequence[int], max_len: int,
                 ids: infill_lib.BlankIds, gmask_positions: str) -> dict:
  """Part A = context + [gMASK] (bidirectional), Part B = <sop> + the
  continuation but its last token; the continuation is scored."""
  cont = list(cont)[-(max_len - 2):]
  part_a = list(ctx)[max(0, len(ctx) - (max_len - 1 - len(cont))):]
  part_a = (part_a or [ids.eos if ids.eos is not None else ids.eop])
  part_a = part_a + [ids.gmask]
  n_a, n_b = len(part_a), len(cont)
  after = list(range(n_b))                                 # 0 at <sop>
  if gmask_positions == 'continue':
    b_pos = [n_a + j for j in after]
  else:
    b_pos = [n_a - 1] * n_b
  part_b = [ids.sop] + cont[:-1] if cont else []  # nothing to score
  return {'tokens': part_a + part_b,
          'targets': [0] * n_a + cont,
          'position_ids': list(range(n_a)) + b_pos,
          'block_position_ids': [0] * n_a + [j + 1 for j in after],
          'prefix': [True] * n_a + [False] * n_b, 'scored': n_b}


@register_model('glm')
class GlmLM(TemplateLM):
  """An lm-eval model over a glm checkpoint or an in-memory model."""

  def __init__(self, checkpoint: str | None = None, *,
               cfg: ModelConfig | None = None, params: Any = None,
               tokenizer: Any = None, meta: dict | None = None,
               batch_size: int | str | None = 8, pack_len: int = 256,
               scoring: str = 'auto', mesh: Any = None, seed: int = 0,
               progress: bool = True, **unused):
    super().__init__()
    del unused  # device, max_batch_size: the harness's generic arguments
    if checkpoint is not None:
      cfg = checkpoint_lib.load_config(checkpoint)
      tokenizer = scoring_lib.checkpoint_tokenizer(checkpoint)
      meta = checkpoint_lib.read_manifest(checkpoint).get('meta', {})
      _, params = checkpoint_lib.load(checkpoint)
      if tokenizer is None:
        raise UserError(f'checkpoint {checkpoint!r} has no tokenizer; the '
                        'harness sends text, so evaluation needs one '
                        '(convert with its tokenizer.json).')
    if cfg is None or params is None or tokenizer is None:
      raise UserError('GlmLM needs checkpoint=DIR, or cfg, params and '
                      'tokenizer.')
    self.cfg, self.params, self.tokenizer = cfg, params, tokenizer
    self.mesh = mesh
    shards = 1 if mesh is None else mesh.shape['data'] * mesh.shape['fsdp']
    rows = 8 if batch_size in (None, 'auto') else int(batch_size)
    if rows < 1:
      raise UserError(f'batch_size={batch_size} must be >= 1.')
    self.batch_rows = -(-rows // shards) * shards
    self.pack_len = int(pack_len)
    self.seed = seed
    self.progress = progress
    self.blank_ids = _blank_ids(tokenizer)
    self.scoring = _pick_scoring(scoring, meta or {}, self.blank_ids)

  # -- what TemplateLM asks for ----------------------------------------------

  @property
  def eot_token_id(self) -> int:
    return self.tokenizer.eos_id

  @property
  def prefix_token_id(self) -> int:
    bos = getattr(self.tokenizer, 'bos_id', None)
    return self.eot_token_id if bos is None else bos

  @property
  def max_length(self) -> int:
    return self.cfg.max_len

  def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                 **kwargs) -> list[int]:
    del add_special_tokens, kwargs  # glm's tokenizers add none
    return list(self.tokenizer.encode(string))

  def tok_decode(self, tokens: Sequence[int]) -> str:
    return self.tokenizer.decode(tokens)

  # -- scoring ---------------------------------------------------------------

  def _segment(self, ctx, cont) -> dict:
    if self.scoring == 'glm':
      return _glm_segment(ctx, cont, self.max_length, self.blank_ids,
                          self.cfg.gmask_positions)
    return _causal_segment(ctx, cont, self.max_length)

  def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False,
                            **kwargs) -> list[tuple[float, bool]]:
    del disable_tqdm, kwargs
    segs = [self._segment(ctx, cont) for _, ctx, cont in requests]
    return self.score_segments(segs)

  def score_segments(self, segs: Sequence[dict]) -> list[tuple[float, bool]]:
    """(sum of the scored targets' log-probs, all of them argmax) per
    segment, in order."""
    rows = pack([len(s['tokens']) for s in segs], self.pack_len,
                self.max_length)
    by_len: dict[int, list] = collections.defaultdict(list)
    for length, members in rows:
      by_len[length].append(members)
    out: list[Any] = [None] * len(segs)
    t0 = last = time.time()
    done = 0
    for length, group in sorted(by_len.items()):
      for start in range(0, len(group), self.batch_rows):
        chunk = group[start:start + self.batch_rows]
        batch = self._batch(segs, chunk, length)
        lp, greedy = (np.asarray(x) for x in self._run(batch))
        for r, members in enumerate(chunk):
          for i, off in members:
            seg = segs[i]
            end = off + len(seg['tokens'])
            sl = slice(end - seg['scored'], end)
            out[i] = (float(lp[r, sl].sum()), bool(greedy[r, sl].all()))
        done += sum(len(m) for m in chunk)
        if self.progress and time.time() - last > 10:
          last = time.time()
          print(f'glm eval: scored {done}/{len(segs)} requests, '
                f'{last - t0:.0f}s', file=sys.stderr, flush=True)
    return out

  def _batch(self, segs, chunk, length: int) -> dict[str, np.ndarray]:
    shape = (self.batch_rows, length)
    fields = ['tokens', 'targets', 'position_ids']
    if self.cfg.position == 'rope2d':
      fields.append('block_position_ids')
    batch = {k: np.zeros(shape, np.int32) for k in fields}
    batch['segment_ids'] = np.zeros(shape, np.int32)
    batch['prefix_mask'] = np.zeros(shape, bool)
    for r, members in enumerate(chunk):
      for k, (i, off) in enumerate(members):
        seg = segs[i]
        sl = slice(off, off + len(seg['tokens']))
        for f in fields:
          batch[f][r, sl] = seg.get(f, 0)
        batch['segment_ids'][r, sl] = k + 1
        batch['prefix_mask'][r, sl] = seg['prefix']
    return batch

  def _run(self, batch: dict[str, np.ndarray]):
    if self.mesh is None:
      return _target_logprobs(self.cfg, self.params, batch)
    from glm.parallel import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
    with self.mesh:
      return _target_logprobs(self.cfg, self.params,
                              mesh_lib.put_global(batch, self.mesh))

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False
                            ) -> list[float]:
    del disable_tqdm
    windows, owner = [], []
    for n, (text,) in enumerate(r.args for r in requests):
      for ctx, cont in map(lm_utils.make_disjoint_window,
                           lm_utils.get_rolling_token_windows(
                               token_list=self.tok_encode(text),
                               prefix_token=self.prefix_token_id,
                               max_seq_len=self.max_length, context_len=1)):
        windows.append(self._segment(ctx, cont))
        owner.append(n)
    totals = [0.0] * len(requests)
    for n, (ll, _) in zip(owner, self.score_segments(windows)):
      totals[n] += ll
    return totals

  # -- generation ------------------------------------------------------------

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    del disable_tqdm
    groups: dict[str, list[int]] = collections.defaultdict(list)
    args = [r.args for r in requests]
    for n, (_, kw) in enumerate(args):
      groups[repr(sorted((kw or {}).items()))].append(n)
    out: list[str] = [''] * len(args)
    for members in groups.values():
      kw = dict(args[members[0]][1] or {})
      texts = self._generate([args[n][0] for n in members], kw)
      for n, text in zip(members, texts):
        out[n] = text
    return out

  def _generate(self, contexts: Sequence[str], kw: dict) -> list[str]:
    until = kw.pop('until', None) or []
    until = [until] if isinstance(until, str) else list(until)
    max_new = int(kw.pop('max_gen_toks', 256))
    sample = bool(kw.pop('do_sample', False))
    temperature = float(kw.pop('temperature', 1.0 if sample else 0.0))
    options = generate_cli.Options(
        max_new_tokens=max_new, temperature=temperature if sample else 0.0,
        top_k=int(kw.pop('top_k', 0) or 0),
        top_p=float(kw.pop('top_p', 1.0) or 1.0),
        seed=self.seed, batch_size=self.batch_rows)
    keep = max(1, self.max_length - max_new - 2)  # + [gMASK], <sop>
    prompts = [self.tok_encode(c)[-keep:] or [self.prefix_token_id]
               for c in contexts]
    ids = self.blank_ids
    blank = [ids is not None and (self.scoring == 'glm'
                                  or any(t in ids.blanks for t in p))
             for p in prompts]
    new: list[Any] = [None] * len(prompts)
    for want_blank in (False, True):
      idx = [i for i, b in enumerate(blank) if b == want_blank]
      if not idx:
        continue
      part = [prompts[i] for i in idx]
      if want_blank:
        res = self._infill_last(part, max_new)
      else:
        res = generate_cli.decode_all(self.cfg, self.params, part, options,
                                      self.eot_token_id)
      for i, r in zip(idx, res):
        new[i] = r
    return [_cut(self.tok_decode(toks), until) for toks in new]


  def _infill_last(self, prompts: Sequence[Sequence[int]], max_new: int
                   ) -> list[list[int]]:
    """The span greedy decoding fills the last blank of each prompt with
    ([gMASK] appended where there is none). Blanks before it stay blanks
    of Part A: in a few-shot prompt they are the examples', each followed
    by its answer."""
    ids = self.blank_ids

    def decode(batch, length, n):
      del n
      rows = [(p, max(i for i, t in enumerate(p) if t in ids.blanks))
              for p in batch]
      generate_lib.check_request(self.cfg, length + 1, max_new,
                                 generate_lib.Sampling())
      lay = infill_lib.layout(self.cfg, rows, ids, max_new, length)
      return generate_lib.decode(self.cfg, self.params, lay,
                                 max_new_tokens=max_new, stop=ids.stop)
    return generate_cli.in_batches(
        [infill_lib.with_blank(p, ids) for p in prompts],
        generate_cli.Options(batch_size=self.batch_rows), self.max_length,
        decode, what='glm eval')


def _cut(text: str, until: Sequence[str]) -> str:
  """The text before the first stop string."""
  for stop in until:
    if stop and stop in text:
      text = text[:text.index(stop)]
  return text


def _blank_ids(tokenizer) -> infill_lib.BlankIds | None:
  from glm.data import objectives  # pylint: disable=g-import-not-at-top
  special = objectives.SpecialIds.from_tokenizer(tokenizer)
  if special is None or not special.has_infilling:
    return None
  return infill_lib.BlankIds.from_special(special)


def _pick_scoring(scoring: str, meta: dict,
                  ids: infill_lib.BlankIds | None) -> str:
  if scoring not in SCORING:
    raise UserError(f'scoring={scoring!r} is not one of {SCORING}.')
  if scoring == 'auto':
    mixture = meta.get('mixture') or {}
    main = max(mixture, key=mixture.get) if mixture else 'causal_lm'
    scoring = 'glm' if main == 'glm_blank_infilling' and ids else 'causal'
  if scoring == 'glm' and ids is None:
    raise UserError("scoring='glm' needs a tokenizer with GLM's [gMASK] and "
                    "<sop>; use scoring='causal'.")
  return scoring
