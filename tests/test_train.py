"""Training: balance loss and bias rule by hand, the loss falls, a sharded step equals the
single-device step, SIGKILL + --resume reproduces the uninterrupted loss sequence, NaN stops,
the HF export loads back."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import REPO, fixture_path
from dsv3_jax import core, from_hf_pretrained, load_config
from dsv3_jax.balance import bias_delta, sequence_balance_loss, update_biases
from dsv3_jax.expert_parallel import ExpertParallel
from dsv3_jax.model import restacked_arrays
from dsv3_jax.sharding import batch_sharding, make_mesh
from dsv3_jax.train_step import (Objective, OptimizerConfig, init_train_state, make_train_step,
                                 state_shardings)


def _cfg(**changes):
  return load_config(fixture_path("tiny_v3")).replace(**changes)


def test_balance_loss_hand_computed():
  # E = 4 experts, K = 2, T = 2 tokens, two sequences.
  scores = jnp.array([[[1.0, 0.4, 0.4, 0.2],     # s' = [.5 .2 .2 .1]
                       [0.1, 0.3, 0.4, 0.2]],    # s' = [.1 .3 .4 .2]
                      [[0.3, 0.3, 0.3, 0.3],     # s' = [.25 .25 .25 .25]
                       [0.5, 0.0, 0.0, 1.5]]])   # s' = [.25 0 0 .75]
  experts = jnp.array([[[0, 1], [2, 1]],
                       [[3, 0], [3, 2]]], jnp.int32)
  # seq 0: counts [1 2 1 0], f = 4/(2·2)·counts = counts; P = [.3 .25 .3 .15] → 0.3+0.5+0.3 = 1.1
  # seq 1: counts [1 0 1 2];                      P = [.25 .125 .125 .5] → 0.25+0.125+1.0 = 1.375
  got = sequence_balance_loss(scores, experts, 4)
  np.testing.assert_allclose(float(got), (1.1 + 1.375) / 2, rtol=1e-6)
  # the gradient flows through P only: d/ds of f_i·s_i/Σs for seq 0 token 0
  g = jax.grad(lambda s: sequence_balance_loss(s, experts, 4))(scores)
  f0, s0 = np.array([1.0, 2.0, 1.0, 0.0]), np.array([1.0, 0.4, 0.4, 0.2])
  want = (f0 / s0.sum() - (f0 * s0).sum() / s0.sum() ** 2) / 2 / 2  # mean over T, then over B
  np.testing.assert_allclose(np.asarray(g[0, 0]), want, rtol=1e-5)


def test_cross_entropy_equals_optax_without_a_scatter():
  """The same value and gradient as optax's integer-label CE (bit for bit: the same arithmetic),
  with the label pick's backward a one-hot select instead of a scatter into [B, T, V] zeros."""
  import optax
  from dsv3_jax.train_step import cross_entropy

  logits = 3 * jax.random.normal(jax.random.key(0), (3, 17, 301))
  targets = jax.random.randint(jax.random.key(1), (3, 17), 0, 301)
  want_fn = lambda lg: optax.softmax_cross_entropy_with_integer_labels(lg, targets).mean()
  got_fn = lambda lg: cross_entropy(lg, targets)
  for wrap in (lambda f: f, jax.jit):
    got, g_got = wrap(jax.value_and_grad(got_fn))(logits)
    want, g_want = wrap(jax.value_and_grad(want_fn))(logits)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    np.testing.assert_array_equal(np.asarray(g_got), np.asarray(g_want))
  hlo = lambda f: jax.jit(jax.grad(f)).lower(logits).as_text()
  assert "scatter" in hlo(want_fn) and "scatter" not in hlo(got_fn)


@pytest.fixture(scope="module")
def tiny_trainer():
  """The tiny config's initial state and one compiled (non-donating) step, shared."""
  cfg = _cfg()
  oc = OptimizerConfig(lr=1e-2, warmup_steps=5, total_steps=40)
  graphdef, state = init_train_state(cfg, oc, seed=0, dtype=jnp.float32)
  return cfg, graphdef, state, make_train_step(graphdef, oc, Objective(bias_gamma=0.01),
                                               donate=False)


def test_bias_update_direction(tiny_trainer):
  load = jnp.array([[10.0, 2.0, 6.0, 6.0], [0.0, 0.0, 0.0, 24.0]])  # means 6 and 6
  np.testing.assert_allclose(np.asarray(bias_delta(load, 0.01)),
                             [[-0.01, 0.01, 0.0, 0.0], [0.01, 0.01, 0.01, -0.01]])
  # in a real step: the step's new biases = old + γ·sign(mean load − load) of that step's routing
  cfg, graphdef, state, step = tiny_trainer
  tokens = _pattern_batch(100, 8, 16, cfg.vocab_size)
  model_state = nnx.merge_state(state.biases, state.params)
  _, _, aux = core.forward(graphdef, model_state, tokens[:, :-1], with_aux=True)
  new, _ = step(state, tokens)
  old_b = state.biases["moe_layers"]["mlp"]["gate"]["e_score_correction_bias"][...]
  new_b = new.biases["moe_layers"]["mlp"]["gate"]["e_score_correction_bias"][...]
  load = np.asarray(aux["moe_layers"].load)
  assert load.shape == (cfg.num_moe_layers, cfg.n_routed_experts)
  assert load.sum() == 8 * 16 * cfg.num_experts_per_tok * cfg.num_moe_layers
  want = np.asarray(old_b) + 0.01 * np.sign(load.mean(-1, keepdims=True) - load)
  np.testing.assert_allclose(np.asarray(new_b), want, atol=1e-7)
  assert np.any(np.asarray(new_b) > 0) and np.any(np.asarray(new_b) < 0)
  mtp_new = new.biases["mtp"][0]["block"]["mlp"]["gate"]["e_score_correction_bias"][...]
  mtp_load = np.asarray(aux["mtp"][0].load)
  np.testing.assert_allclose(np.asarray(mtp_new), 0.01 * np.sign(mtp_load.mean() - mtp_load),
                             atol=1e-7)
  with pytest.raises(ValueError, match="no routing statistics"):
    update_biases(state.biases, {"moe_layers": None, "mtp": ()}, 0.01)
  # statistics of the wrong number of layers would broadcast into a bias of another shape
  wrong = jax.tree.map(lambda a: a[:1], aux["moe_layers"])
  with pytest.raises(ValueError, match=r"shape \(2, 8\), its layers' expert load \(1, 8\)"):
    update_biases(state.biases, {"moe_layers": wrong, "mtp": aux["mtp"]}, 0.01)


def _pattern_batch(step, batch, seq, vocab):
  """Learnable sequences: t_{i+1} = (3·t_i + 7) mod V from a random start."""
  rng = np.random.default_rng(step)
  t = np.empty((batch, seq + 1), np.int32)
  t[:, 0] = rng.integers(0, vocab, batch)
  for i in range(seq):
    t[:, i + 1] = (3 * t[:, i] + 7) % vocab
  return jnp.asarray(t)


def test_loss_falls_on_tiny_config(tiny_trainer):
  cfg, _, state, step = tiny_trainer
  history = []
  for i in range(40):
    state, m = step(state, _pattern_batch(i, 8, 16, cfg.vocab_size))
    history.append({k: float(v) for k, v in m.items()})
  first, last = history[0], history[-1]
  assert first["ce"] > 5.0  # ~ln(256) at initialization
  assert last["ce"] < 0.5 * first["ce"], (first["ce"], last["ce"])
  assert last["mtp_ce"] < 0.5 * first["mtp_ce"], (first["mtp_ce"], last["mtp_ce"])
  assert all(np.isfinite(h["loss"]) and h["grad_norm"] > 0 for h in history)
  np.testing.assert_allclose(last["loss"], last["ce"] + 0.3 * last["mtp_ce"]
                             + last["balance_loss"], rtol=1e-6)


def test_weight_decay_spares_norms_of_scanned_stacks():
  """AdamW decays matrices only: RMSNorm weights are [L, D] in a scanned stack but vectors all
  the same. With zero gradients the update is -lr·wd·p on decayed parameters, 0 elsewhere."""
  from dsv3_jax.train_step import make_optimizer

  oc = OptimizerConfig(lr=1e-2, warmup_steps=0, weight_decay=0.1)
  _, state = init_train_state(_cfg(), oc, seed=0, dtype=jnp.float32)
  opt = make_optimizer(oc)
  zeros = jax.tree.map(jnp.zeros_like, state.params)
  updates, _ = opt.update(zeros, opt.init(state.params), state.params)
  seen = set()
  for path, var in nnx.to_flat_state(updates):
    p = np.asarray(_flat(state.params)[path])
    is_norm = "norm" in path[-2]
    seen.add((is_norm, p.ndim))
    want = 0 * p if is_norm else -1e-3 * p
    np.testing.assert_allclose(np.asarray(var.get_value()), want, rtol=1e-6, err_msg=str(path))
  assert {(True, 1), (True, 2), (False, 2), (False, 3), (False, 4)} <= seen, seen


def _flat(state: nnx.State) -> dict:
  return {path: var.get_value() for path, var in nnx.to_flat_state(state)}


def _restacked(state: nnx.State) -> dict:
  return {path: np.asarray(v) for path, v in restacked_arrays(state).items()}


def test_unstacked_layers_step_equals_scanned():
  """One optimizer step of the model with unstacked layers (unrolled, remat per layer) from the
  same init as the scanned model: the same loss and the same updated parameters and biases.

  Tolerance: both run the same float32 operations per layer; only XLA's fusion and reduction
  order may differ (the global gradient norm sums per-layer leaves instead of [L] stacks), i.e.
  a few ulp of the gradients (relative δ ≈ 1e-7). Adam's first update lr·g/(|g| + ε) moves by
  at most lr·δ/4 for a relative error δ of g, so parameters (|p| ≲ 1) agree to ~1e-7; atol 1e-6
  is ten times that, and 100× below lr·weight_decay·|p| for norm weights, which the scanned
  model once decayed as [L, D] "matrices" (a real difference this test caught)."""
  cfg = _cfg()
  oc = OptimizerConfig(lr=1e-2, warmup_steps=0, total_steps=10)  # lr > 0 in the first step
  tokens = jax.random.randint(jax.random.key(7), (4, 17), 0, cfg.vocab_size)
  results = []
  for kw in ({}, dict(unstack_layers=True, remat="dots_with_no_batch_dims_saveable")):
    graphdef, state = init_train_state(cfg, oc, seed=1, dtype=jnp.float32, **kw)
    new, m = make_train_step(graphdef, oc, Objective(bias_gamma=0.01), donate=False)(state,
                                                                                     tokens)
    results.append((state, new, m))
  (s0, s1, m), (u0, u1, mu) = results
  assert isinstance(u0.params["moe_layers"], nnx.State) and 0 in u0.params["moe_layers"]
  assert u0.params["moe_layers"][1]["mlp"]["experts"]["gate_proj"][...].shape == (
      cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.hidden_size)
  for k in ("loss", "ce", "mtp_ce", "balance_loss", "grad_norm", "load_imbalance"):
    np.testing.assert_allclose(float(mu[k]), float(m[k]), rtol=1e-6, err_msg=k)
  before, want, got = _restacked(s0.params), _restacked(s1.params), _restacked(u1.params)
  assert sorted(got) == sorted(want)
  for path in want:
    np.testing.assert_array_equal(_restacked(u0.params)[path], before[path], err_msg=str(path))
    assert np.abs(want[path] - before[path]).max() > 1e-3, path  # every parameter moved
    np.testing.assert_allclose(got[path], want[path], rtol=0, atol=1e-6, err_msg=str(path))
  b_want, b_got = _restacked(s1.biases), _restacked(u1.biases)
  assert sorted(b_got) == sorted(b_want)
  for path in b_want:
    assert np.abs(b_want[path]).max() > 0, path
    np.testing.assert_array_equal(b_got[path], b_want[path], err_msg=str(path))


_SHARD_CFG = dict(n_routed_experts=8, n_group=4, topk_group=2)
_SHARD_OC = OptimizerConfig(lr=3e-3, warmup_steps=1, total_steps=10)


@pytest.fixture(scope="module")
def single_device_run():
  """Three steps on one device: (tokens, [(state, metrics) after each step])."""
  cfg = _cfg(**_SHARD_CFG)
  tokens = [jax.random.randint(jax.random.key(i), (8, 13), 0, cfg.vocab_size) for i in range(3)]
  graphdef, state = init_train_state(cfg, _SHARD_OC, seed=3, dtype=jnp.float32)
  step = make_train_step(graphdef, _SHARD_OC)
  out = []
  for t in tokens:
    state, m = step(state, t)
    out.append((jax.device_get(state), jax.device_get(m)))
  return tokens, out


@pytest.mark.parametrize("mesh_shape,capacity,unstack", [
    (dict(data=2, expert=4), None, False),
    (dict(fsdp=2, tensor=2, expert=2), 100.0, False),  # so large that nothing is dropped
    (dict(fsdp=2, tensor=2, expert=2), None, True),  # per-layer arrays, remat per layer
])
def test_sharded_step_equals_single_device(single_device_run, mesh_shape, capacity, unstack):
  cfg, oc = _cfg(**_SHARD_CFG), _SHARD_OC
  tokens, reference = single_device_run
  mesh = make_mesh(**mesh_shape)
  ep = ExpertParallel(mesh, capacity_factor=capacity)
  kw = dict(unstack_layers=True, remat="nothing_saveable") if unstack else {}
  graphdef2, state2 = init_train_state(cfg, oc, seed=3, mesh=mesh, dtype=jnp.float32,
                                       expert_dispatch=ep, **kw)
  moe = state2.params["moe_layers"]
  spec = (moe[0] if unstack else moe)["mlp"]["experts"]["gate_proj"][...].sharding.spec
  assert spec[0 if unstack else 1] == "expert"  # no leading [L] axis on unstacked layers
  step2 = make_train_step(graphdef2, oc, shardings=state_shardings(state2))
  for t, (state, m) in zip(tokens, reference):
    state2, m2 = step2(state2, jax.device_put(t, batch_sharding(mesh)))
    for k in ("loss", "ce", "mtp_ce", "balance_loss", "grad_norm", "load_imbalance"):
      np.testing.assert_allclose(float(m2[k]), float(m[k]), rtol=2e-5, err_msg=k)
  want, got = _restacked(state.params), _restacked(state2.params)
  assert sorted(got) == sorted(want)
  for path in want:
    np.testing.assert_allclose(got[path], want[path], rtol=1e-4, atol=2e-6, err_msg=str(path))
  b_want, b_got = _restacked(state.biases), _restacked(state2.biases)
  assert sorted(b_got) == sorted(b_want)
  for path in b_want:
    np.testing.assert_array_equal(b_got[path], b_want[path], err_msg=str(path))


# ---- train.py in subprocesses ----------------------------------------------------------------
@pytest.fixture(scope="module")
def run_setup(tmp_path_factory):
  """A tiny corpus, config and prepared data directory shared by the train.py runs (and a
  persistent compilation cache, so runs of the same program compile it once)."""
  root = tmp_path_factory.mktemp("train")
  corpus = root / "corpus"
  corpus.mkdir()
  import sysconfig
  stdlib = sysconfig.get_paths()["stdlib"]
  for name in ("heapq.py", "bisect.py", "fnmatch.py", "shlex.py"):
    (corpus / name).write_bytes(open(os.path.join(stdlib, name), "rb").read())
  with open(fixture_path("tiny_v3") + "/config.json") as f:
    cfg = json.load(f)
  cfg.update(vocab_size=300, max_position_embeddings=512)
  (root / "config.json").write_text(json.dumps(cfg))
  from dsv3_jax import data
  data.prepare(str(corpus), str(root / "data"), 300, log=lambda m: None)
  return root


def _train_cmd(setup, out, *extra):
  return [sys.executable, os.path.join(REPO, "train.py"), "--config", str(setup / "config.json"),
          "--out", str(out), "--data-dir", str(setup / "data"), "--seq-len", "32", "--batch", "8",
          "--lr", "3e-3", "--warmup", "2", "--no-progress", "--eval-batches", "0", *extra]


def _env(setup):
  """train.py's environment: the shared compilation cache, and 2 host devices instead of the
  suite's 8 (still a data-parallel mesh with expert-parallel dispatch, at about 2/3 of the
  compile and step time of 8 on a 2-core machine)."""
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  return dict(os.environ, PYTHONUNBUFFERED="1", JAX_COMPILATION_CACHE_DIR=str(setup / "jit"),
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
              XLA_FLAGS=" ".join(flags + ["--xla_force_host_platform_device_count=2"]))


def _losses(out):
  recs = {}
  with open(os.path.join(out, "log.jsonl")) as f:
    for line in f:
      r = json.loads(line)
      if r.get("kind") not in ("eval", "summary"):
        recs.setdefault(r["step"], []).append(r["loss"])
  return recs


def test_kill_and_resume_reproduces_the_loss_sequence(run_setup, tmp_path):
  env = _env(run_setup)
  # 30 steps: long enough to be killed mid-run. Orbax starts a save only once the previous one
  # is on disk, so by step 14 (after the save of step 12 began) step 6 is complete.
  args = ("--steps", "30", "--ckpt-every", "6")
  ref = subprocess.run(_train_cmd(run_setup, tmp_path / "ref", *args), env=env, cwd=REPO,
                       capture_output=True, text=True, timeout=300)
  assert ref.returncode == 0, ref.stderr[-3000:]
  out = tmp_path / "killed"
  proc = subprocess.Popen(_train_cmd(run_setup, out, *args), env=env, cwd=REPO,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  log = out / "log.jsonl"
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    if log.exists() and max(_losses(out), default=0) >= 14:
      break
    time.sleep(0.01)
  assert proc.poll() is None, "the run ended before it could be killed: " + proc.stderr.read()[-2000:]
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  killed_at = max(_losses(out))
  assert killed_at < 30
  resumed = subprocess.run(_train_cmd(run_setup, out, *args, "--resume"), env=env, cwd=REPO,
                           capture_output=True, text=True, timeout=300)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  restored = int(resumed.stdout.split("resumed from step ")[1].split()[0])
  assert 6 <= restored <= killed_at
  want, got = _losses(tmp_path / "ref"), _losses(out)
  assert sorted(got) == sorted(want) == list(range(1, 31))
  for step in range(1, 31):
    for loss in got[step]:  # steps redone after the restore were logged twice: same values
      assert loss == want[step][0], (step, got[step], want[step])
  for step in range(restored + 1, killed_at + 1):
    assert len(got[step]) == 2, (step, got[step])
  # a fresh run must not silently overwrite an existing one
  again = subprocess.run(_train_cmd(run_setup, out, *args), env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=300)
  assert again.returncode != 0 and "--resume" in again.stderr


def test_resume_with_bf16_adam_moments(run_setup, tmp_path):
  """--adam-moments bfloat16: the checkpoints hold bf16 moments, and a run resumed from an
  earlier one (the last removed) redoes the remaining steps with the same losses."""
  import shutil

  import orbax.checkpoint as ocp

  env, out = _env(run_setup), tmp_path / "bf16"
  args = ("--steps", "6", "--ckpt-every", "3", "--sync-save", "--adam-moments", "bfloat16")
  first = subprocess.run(_train_cmd(run_setup, out, *args), env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=300)
  assert first.returncode == 0, first.stderr[-3000:]
  saved = ocp.StandardCheckpointer().metadata(str(out / "ckpt" / "6" / "state")).item_metadata
  dtypes = {str(leaf.dtype) for path, leaf in jax.tree.leaves_with_path(saved.tree)
            if "'mu'" in jax.tree_util.keystr(path) or "'nu'" in jax.tree_util.keystr(path)}
  assert dtypes == {"bfloat16"}
  shutil.rmtree(out / "ckpt" / "6")
  resumed = subprocess.run(_train_cmd(run_setup, out, *args, "--resume"), env=env, cwd=REPO,
                           capture_output=True, text=True, timeout=300)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "resumed from step 3" in resumed.stdout
  got = _losses(out)
  assert sorted(got) == list(range(1, 7))
  for step in range(4, 7):
    assert len(got[step]) == 2 and got[step][0] == got[step][1], (step, got[step])


def test_unstacked_layers_through_train_py(run_setup, tmp_path):
  """--unstack-layers --cast-weights-once: checkpoints remember the layout, a resume redoes the
  removed steps with the same losses, resuming without the flag is refused with a message, and
  --export writes the stacked checkpoint layout (it loads back)."""
  import shutil

  env, out = _env(run_setup), tmp_path / "unstacked"
  args = ("--steps", "4", "--ckpt-every", "2", "--sync-save", "--unstack-layers",
          "--cast-weights-once")
  first = subprocess.run(_train_cmd(run_setup, out, *args, "--export", str(tmp_path / "hf")),
                         env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert first.returncode == 0, first.stderr[-3000:]
  loaded = from_hf_pretrained(str(tmp_path / "hf"), jnp.float32)
  assert loaded.moe_layers is not None and not isinstance(loaded.moe_layers, nnx.List)
  shutil.rmtree(out / "ckpt" / "4")
  scanned = subprocess.run(_train_cmd(run_setup, out, "--steps", "4", "--resume"), env=env,
                           cwd=REPO, capture_output=True, text=True, timeout=600)
  assert scanned.returncode != 0
  assert "unstacked layers" in scanned.stderr and "--unstack-layers" in scanned.stderr
  resumed = subprocess.run(_train_cmd(run_setup, out, *args, "--resume"), env=env, cwd=REPO,
                           capture_output=True, text=True, timeout=600)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "resumed from step 2" in resumed.stdout
  got = _losses(out)
  assert sorted(got) == list(range(1, 5))
  for step in (3, 4):
    assert len(got[step]) == 2 and got[step][0] == got[step][1], (step, got[step])


def test_hf_export_of_unstacked_layers_equals_scanned(tmp_path):
  """hf_tensors restacks unstacked layers: the same initial parameters in either layout give
  the same tensors under the same names."""
  from dsv3_jax.hf_export import hf_tensors

  cfg, oc = _cfg(), OptimizerConfig()
  tensors = []
  for unstack in (False, True):
    _, state = init_train_state(cfg, oc, seed=4, dtype=jnp.float32, unstack_layers=unstack)
    tensors.append(hf_tensors(cfg, jax.device_get(nnx.merge_state(state.biases, state.params)),
                              jnp.float32))
  want, got = tensors
  assert sorted(got) == sorted(want) and any(".mlp.experts." in n for n in want)
  for name in want:
    np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(run_setup, tmp_path):
  out = tmp_path / "nan"
  r = subprocess.run(_train_cmd(run_setup, out, "--steps", "6", "--ckpt-every", "1",
                                "--lr", "1e30", "--warmup", "0", "--clip", "1e30"),
                     env=_env(run_setup), cwd=REPO, capture_output=True, text=True, timeout=300)
  assert r.returncode == 3, r.stdout[-2000:] + r.stderr[-2000:]
  assert "non-finite loss" in r.stdout
  good = sorted(int(d) for d in os.listdir(out / "ckpt") if d.isdigit())
  bad_step = int(r.stdout.split("non-finite loss at step ")[1].split()[0])
  assert good and max(good) == bad_step - 1
  logged = _losses(out)
  assert max(logged) == bad_step - 1 and all(np.isfinite(v[0]) for v in logged.values())


def test_hf_export_loads_back(tmp_path):
  from dsv3_jax.hf_export import export_hf

  cfg = _cfg()
  oc = OptimizerConfig()
  graphdef, state = init_train_state(cfg, oc, seed=5, dtype=jnp.float32)
  biases = jax.tree.map(lambda b: b + jax.random.normal(jax.random.key(1), b.shape), state.biases)
  full = nnx.merge_state(biases, state.params)
  export_hf(str(tmp_path), cfg, jax.device_get(full), dtype=jnp.float32)
  loaded = from_hf_pretrained(str(tmp_path), jnp.float32)
  tokens = jax.random.randint(jax.random.key(2), (2, 9), 0, cfg.vocab_size)
  want, want_mtp = core.forward(graphdef, full, tokens)
  got, got_mtp = core.forward(*core.split(loaded), tokens)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  np.testing.assert_array_equal(np.asarray(got_mtp[0]), np.asarray(want_mtp[0]))


def test_fused_attention_option_matches_einsum_form():
  """attn_impl="xla" runs the training attention through jax.nn.dot_product_attention (the
  "cudnn" choice differs only in the implementation string, GPU only)."""
  from dsv3_jax import Transformer

  cfg = _cfg()
  ref = Transformer(cfg, rngs=nnx.Rngs(0))
  fused = Transformer(cfg, rngs=nnx.Rngs(0), attn_impl="xla")
  tokens = jax.random.randint(jax.random.key(0), (2, 11), 0, cfg.vocab_size)
  want = np.asarray(ref(tokens))
  np.testing.assert_allclose(np.asarray(fused(tokens)), want, rtol=1e-5, atol=1e-5)
  assert np.abs(want).max() > 0.1
  with pytest.raises(ValueError, match="attn_impl.*cudnn_mla"):
    Transformer(cfg, rngs=nnx.Rngs(0), attn_impl="flash")
  from dsv3_jax.mla import default_training_attention
  if jax.devices()[0].platform == "cpu":   # train.py --attn-impl auto: the einsum form here
    assert default_training_attention() is None


@pytest.mark.skipif(jax.devices()[0].platform != "gpu", reason="cuDNN fused attention")
def test_cudnn_attention_forms_match_einsum():
  """attn_impl "cudnn" (v zero-padded to the qk head dim) and "cudnn_mla" (cuDNN's MLA form, v
  unpadded), with DeepSeek's head dims (qk 128 + 64 rope, v 128): logits and parameter
  gradients of a bf16 forward/backward are as close to the float32 einsum form as the bf16
  einsum form is. Bound: twice the bf16 einsum form's relative error per array, or 1e-2 (its
  errors reach 6e-2 on some gradients: bf16 rounding, not attention)."""
  from dsv3_jax import Transformer

  cfg = _cfg(qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, num_attention_heads=2)
  tokens = jax.random.randint(jax.random.key(0), (2, 64), 0, cfg.vocab_size)

  def outputs(impl, dtype):
    graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0), attn_impl=impl,
                                             dtype=dtype))
    f = lambda p: nnx.merge(graphdef, p)(tokens).astype(jnp.float32)
    grads = jax.grad(lambda p: (f(p) ** 2).mean())(params)
    return [f(params)] + jax.tree.leaves(grads)

  rel = lambda a, b: float(jnp.linalg.norm(a - b) / jnp.maximum(jnp.linalg.norm(b), 1e-30))
  exact = outputs(None, jnp.float32)
  bound = [max(2 * rel(a, b), 1e-2) for a, b in zip(outputs(None, jnp.bfloat16), exact)]
  for impl in ("cudnn", "cudnn_mla"):
    errors = [rel(a, b) for a, b in zip(outputs(impl, jnp.bfloat16), exact)]
    bad = [(i, e, b) for i, (e, b) in enumerate(zip(errors, bound)) if e > b]
    assert not bad, (impl, bad)


def test_shipped_demo_checkpoint_models_python():
  """demo/stdlib-coder loads with its tokenizer and predicts unseen Python far better than an
  untrained model (ln 4096 = 8.3 nats): this repository's own train.py, not in its training
  data and heavy with English help text, scores 5.0 nats (next token) and 5.2 (MTP); the
  held-out stdlib split scored 2.6 at the end of training."""
  from dsv3_jax.tokenizer import Tokenizer

  ckpt = os.path.join(REPO, "demo", "stdlib-coder")
  model = from_hf_pretrained(ckpt, jnp.float32)
  assert model.cfg == load_config(os.path.join(REPO, "configs", "demo.json"))
  assert os.path.getsize(os.path.join(ckpt, "model.safetensors")) <= 30 * 2**20
  tok = Tokenizer(ckpt)
  with open(os.path.join(REPO, "train.py")) as f:
    ids = tok.encode(f.read())[:257]
  tokens = jnp.asarray([ids], jnp.int32)
  logits, (mtp,) = core.forward(*core.split(model), tokens[:, :-1])
  ce = float(-jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], -1).mean())
  mtp_ce = float(-jnp.take_along_axis(jax.nn.log_softmax(mtp), tokens[:, 2:, None], -1).mean())
  assert ce < 6.0 and mtp_ce < 6.0, (ce, mtp_ce)
