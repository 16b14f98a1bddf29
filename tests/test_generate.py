"""Generation with a KV cache: cached logits equal a full recomputation at
every step (every family and position scheme, prompts of different lengths
in one batch, a bidirectional prefix, each attention implementation);
greedy tokens equal transformers' `generate` on a converted BLOOM; the
sampling filters; determinism in the seed."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glm.errors import UserError
from glm.inference import decoding
from glm.inference import generate as gen
from glm.model.config import ModelConfig
from glm.model import transformer

FAMILIES = {
    'bloom': dict(position='alibi', embed_norm=True),
    'glm': dict(position='rope2d', norm_layout='deepnorm',
                mlp_activation='geglu'),
    'ul2': dict(position='rope', norm_type='rmsnorm', mlp_activation='swiglu',
                use_bias=False),
    'learned': dict(position='learned'),
}
PROMPT_LENGTHS = (3, 7, 1)


def make_cfg(family: str, **kw) -> ModelConfig:
  return ModelConfig(vocab_size=97, hidden=48, num_layers=2, num_heads=3,
                     mlp_dim=64, max_len=32, **FAMILIES[family], **kw)


def _steps(cfg, params, lay, new_tokens, prefix=None):
  """Prefill then one cached step per new token (teacher forced); returns
  the logits of every step [B, N, V] and the full sequence [B, S]."""
  model = transformer.Transformer(cfg)
  # Compiled (two shapes: the prefill and a step); eagerly it takes ~10x.
  apply = jax.jit(lambda v, b: model.apply(v, b, mutable=['cache']))
  b, p = lay['tokens'].shape
  seq = np.concatenate([lay['tokens'], new_tokens], 1)
  kv = {'kv_segment_ids': lay['segment_ids'],
        'kv_positions': lay['position_ids']}
  if prefix is not None:
    kv['kv_prefix'] = prefix
  cache = gen.init_cache(cfg, b, seq.shape[1])
  out = []
  for start, stop in [(0, p)] + [(t, t + 1) for t in range(p, seq.shape[1])]:
    batch = {'tokens': seq[:, start:stop],
             'segment_ids': lay['segment_ids'][:, start:stop],
             'position_ids': lay['position_ids'][:, start:stop],
             'cache_index': start, **kv}
    logits, new = apply({'params': params, 'cache': cache}, batch)
    cache = new['cache']
    out.append(logits[:, -1])
  return np.stack(out[:-1], 1), seq


@pytest.mark.parametrize('family', [
    'bloom', 'glm', pytest.param('ul2', marks=pytest.mark.slow), 'learned'])
def test_cached_logits_equal_full_recomputation(family):
  cfg = make_cfg(family)
  params = transformer.init_params(cfg, jax.random.PRNGKey(0))
  prompts = [list(range(5, 5 + n)) for n in PROMPT_LENGTHS]
  lay = gen.layout(prompts, 5)
  rng = np.random.RandomState(1)
  new = rng.randint(3, 97, (len(prompts), 5)).astype(np.int32)
  prefix = None
  if family == 'glm':  # a bidirectional prompt prefix (GLM's Part A)
    prefix = np.zeros(lay['segment_ids'].shape, bool)
    prefix[:, :lay['tokens'].shape[1]] = lay['segment_ids'][:, :7] == 1
  cached, seq = _steps(cfg, params, lay, new, prefix)
  batch = {'tokens': seq, 'segment_ids': lay['segment_ids'],
           'position_ids': lay['position_ids']}
  if prefix is not None:
    batch['prefix_mask'] = prefix
  full = transformer.Transformer(cfg).apply({'params': params}, batch)
  p = lay['tokens'].shape[1]
  want = np.asarray(full)[:, p - 1:-1]     # the logits that chose each token
  np.testing.assert_allclose(cached, want, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize('impl', [
    pytest.param('blockwise', marks=pytest.mark.slow), 'pallas'])
def test_every_attention_implementation_decodes(impl):
  """A prefill through 'blockwise' and the kernel (interpret mode), then
  cached steps (the two-block XLA attention), give the 'xla' logits."""
  prompts = [list(range(5, 5 + n)) for n in PROMPT_LENGTHS]
  lay = gen.layout(prompts, 3)
  new = np.full((len(prompts), 3), 11, np.int32)
  cfg = make_cfg('bloom')
  params = transformer.init_params(cfg, jax.random.PRNGKey(0))
  want, _ = _steps(cfg, params, lay, new)
  got, _ = _steps(cfg.replace(attention_impl=impl), params, lay, new)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-5)


def test_cache_has_logical_axes_and_layer_stack():
  cfg = make_cfg('bloom')
  axes = gen.cache_axes(cfg, 2, 10)
  cache = gen.init_cache(cfg, 2, 10)
  assert cache['layers']['attention']['key'].shape == (2, 2, 3, 10, 16)
  assert tuple(axes['layers']['attention']['key']) == (
      'layers', 'batch', 'heads', 'length', 'kv')


def test_greedy_generation_equals_transformers(tmp_path):
  torch = pytest.importorskip('torch')
  from test_hf_bloom import hf_greedy, make_hf_bloom  # pylint: disable=g-import-not-at-top
  from glm.hf import bloom  # pylint: disable=g-import-not-at-top
  model = make_hf_bloom(300, 64, 4, 2, seed=3)
  model.save_pretrained(tmp_path)
  cfg, params, _ = bloom.hf_to_glm(str(tmp_path))
  cfg = cfg.replace(dtype='float32')
  rng = np.random.RandomState(0)
  prompts = [rng.randint(3, 300, n).tolist() for n in (1, 9, 4, 6)]
  eos = model.config.eos_token_id
  got = gen.generate(cfg, params, prompts, max_new_tokens=16, eos_id=eos)
  p = max(map(len, prompts))
  ids = torch.zeros((len(prompts), p), dtype=torch.long)
  mask = torch.zeros((len(prompts), p), dtype=torch.long)
  for row, prompt in enumerate(prompts):
    ids[row, p - len(prompt):] = torch.tensor(prompt)
    mask[row, p - len(prompt):] = 1
  want, gap = hf_greedy(model, ids, 16, attention_mask=mask)
  assert gap > 1e-3, gap   # decisive choices: equal tokens on any CPU
  assert got == want
  assert len({tuple(r) for r in want}) == len(want)  # rows differ
  # One prompt at a time gives the same tokens as the batch.
  for prompt, row in zip(prompts, got):
    assert decoding.greedy_generate(cfg, params, prompt, 16, eos) == row


def test_filters_keep_the_top_tokens():
  logits = jnp.log(jnp.array([[0.4, 0.3, 0.2, 0.1]]))
  keep = lambda **kw: np.isfinite(np.asarray(gen.filter_logits(
      logits, gen.Sampling(temperature=1.0, **kw))))[0].tolist()
  assert keep(top_k=2) == [True, True, False, False]
  assert keep(top_p=0.5) == [True, True, False, False]    # 0.4 < 0.5
  # (Thresholds stay clear of the cumulative masses 0.4, 0.7, 0.9: at an
  # exact tie the last bit of softmax's rounding would decide.)
  assert keep(top_p=0.39) == [True, False, False, False]
  assert keep(top_p=0.75) == [True, True, True, False]
  assert keep(top_k=3, top_p=0.65) == [True, True, False, False]
  assert all(keep())
  scaled = gen.filter_logits(logits, gen.Sampling(temperature=0.5))
  np.testing.assert_allclose(scaled, logits * 2, rtol=1e-6)


def test_sampling_follows_the_distribution_and_the_seed():
  probs = np.array([0.5, 0.3, 0.15, 0.05])
  logits = jnp.tile(jnp.log(jnp.asarray(probs, jnp.float32)), (4000, 1))
  draw = lambda seed, **kw: np.asarray(gen.next_token(
      logits, jax.random.PRNGKey(seed), gen.Sampling(temperature=1.0, **kw)))
  counts = np.bincount(draw(0), minlength=4) / 4000
  np.testing.assert_allclose(counts, probs, atol=0.03)
  assert set(draw(1, top_k=2)) == {0, 1}
  np.testing.assert_array_equal(draw(2), draw(2))
  assert (draw(2) != draw(3)).any()


def test_generate_is_deterministic_in_the_seed():
  cfg = make_cfg('ul2')
  params = transformer.init_params(cfg, jax.random.PRNGKey(0))
  run = lambda seed: gen.generate(
      cfg, params, [[5, 6, 7], [8]], max_new_tokens=8, seed=seed,
      sampling=gen.Sampling(temperature=1.5, top_k=20, top_p=0.95))
  assert run(0) == run(0)
  assert run(0) != run(1)
  assert all(len(r) == 8 for r in run(0))


@pytest.mark.parametrize('kwargs, needle', [
    ({'sampling': gen.Sampling(temperature=-1.0)}, 'temperature=-1.0'),
    ({'sampling': gen.Sampling(top_p=0.0)}, 'top_p=0.0'),
    ({'sampling': gen.Sampling(top_k=-2)}, 'top_k=-2'),
    ({'max_new_tokens': 0}, 'max_new_tokens=0'),
    ({'max_new_tokens': 40}, 'exceeds max_len=32'),
])
def test_bad_requests_are_one_line_errors(kwargs, needle):
  cfg = make_cfg('learned')
  params = transformer.init_params(cfg, jax.random.PRNGKey(0))
  kwargs = {'max_new_tokens': 4, **kwargs}
  with pytest.raises(UserError, match=needle.replace('(', r'\(')):
    gen.generate(cfg, params, [[5, 6]], **kwargs)
  with pytest.raises(UserError, match='non-empty'):
    gen.generate(cfg, params, [[]], max_new_tokens=2)


# Beam search ---------------------------------------------------------------


def _tiny(vocab=5):
  cfg = ModelConfig(vocab_size=vocab, hidden=32, num_layers=2, num_heads=2,
                    mlp_dim=64, max_len=32, position='alibi')
  params = transformer.init_params(cfg, jax.random.PRNGKey(4))
  # Sharper distributions than the init's: fewer near-ties to compare.
  params = jax.tree.map(lambda a: a * 3.0, params)
  return cfg, params


def _brute_force(cfg, params, prompt, n, eos_id, length_penalty):
  """Every continuation of up to n tokens (ending at eos or at n), scored
  by a full forward: the best by sum(logp) / len ** length_penalty."""
  seqs = [[]]
  finished = []
  for _ in range(n):
    seqs = [s + [t] for s in seqs for t in range(cfg.vocab_size)]
    finished += [s for s in seqs if s[-1] == eos_id]
    seqs = [s for s in seqs if s[-1] != eos_id]
  cands = finished + seqs
  width = len(prompt) + n
  tokens = np.zeros((len(cands), width), np.int32)
  segs = np.zeros((len(cands), width), np.int32)
  for row, s in enumerate(cands):
    tokens[row, :len(prompt) + len(s)] = prompt + s
    segs[row, :len(prompt) + len(s)] = 1
  logp = jax.nn.log_softmax(transformer.Transformer(cfg).apply(
      {'params': params}, {'tokens': tokens, 'segment_ids': segs}))
  logp = np.asarray(logp)
  scores = [sum(logp[row, len(prompt) - 1 + j, t] for j, t in enumerate(s))
            / len(s) ** length_penalty for row, s in enumerate(cands)]
  best = cands[int(np.argmax(scores))]
  return best[:-1] if best and best[-1] == eos_id else best


def test_exhaustive_beam_equals_brute_force():
  """K = V^(n-1) beams over n new tokens cannot prune the best sequence."""
  from glm.inference import beam  # pylint: disable=g-import-not-at-top
  cfg, params = _tiny()
  prompts = [[1, 2, 3], [4], [2, 2]]
  got = beam.beam_search(cfg, params, prompts, max_new_tokens=3,
                         num_beams=25, length_penalty=0.0)
  for prompt, row in zip(prompts, got):
    assert row == _brute_force(cfg, params, prompt, 3, None, 0.0)


@pytest.mark.parametrize('length_penalty', [
    pytest.param(0.0, marks=pytest.mark.slow),
    pytest.param(1.0, marks=pytest.mark.slow), 2.0])
def test_beam_with_eos_and_length_penalty_equals_brute_force(length_penalty):
  """With K = V^n beams every hypothesis of up to n tokens survives, so
  the length-normalised choice among finished and unfinished ones is the
  brute-force one."""
  from glm.inference import beam  # pylint: disable=g-import-not-at-top
  cfg, params = _tiny(vocab=4)
  # Chosen so that the answers move with the penalty (empty, [3], [1, 1]).
  prompts = [[1, 2, 3], [1, 1], [2]]
  got = beam.beam_search(cfg, params, prompts, max_new_tokens=2,
                         num_beams=16, length_penalty=length_penalty,
                         eos_id=0)
  want = [_brute_force(cfg, params, p, 2, 0, length_penalty)
          for p in prompts]
  assert got == want


def test_one_beam_is_greedy():
  from glm.inference import beam  # pylint: disable=g-import-not-at-top
  cfg, params = _tiny(vocab=50)
  prompts = [[1, 2, 3], [4], [7, 8, 9, 10, 11]]
  assert beam.beam_search(cfg, params, prompts, max_new_tokens=6,
                          num_beams=1, eos_id=3) == gen.generate(
                              cfg, params, prompts, max_new_tokens=6,
                              eos_id=3)


def test_remat_models_decode():
  """A model built with remat (the recipes') decodes as without: the
  context's static prefill flag survives the remat transform."""
  cfg = make_cfg('glm', remat_policy='full')
  params = transformer.init_params(cfg, jax.random.PRNGKey(0))
  prompts = [list(range(5, 5 + n)) for n in PROMPT_LENGTHS]
  lay = gen.layout(prompts, 3)
  new = np.full((len(prompts), 3), 11, np.int32)
  want, _ = _steps(cfg.replace(remat_policy='none'), params, lay, new)
  got, _ = _steps(cfg, params, lay, new)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
