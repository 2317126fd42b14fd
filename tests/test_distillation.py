"""Progressive distillation: the target and loss against a float64 NumPy re-derivation,
and one round of the tiny model (checkpoints, bit-exact resume, sampling, report)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from simple_diffusion import checkpointing
from simple_diffusion import distill
from simple_diffusion import distillation
from simple_diffusion import input_pipeline
from simple_diffusion import models
from simple_diffusion import samplers
from simple_diffusion import sampling
from simple_diffusion import sharding
from simple_diffusion import train_step as train_step_lib

from conftest import load_config  # pylint: disable=g-bad-import-order

# One xdist worker runs this module (pytest.ini: --dist loadgroup), so its
# module-scoped fixtures are built once, not once per worker.
pytestmark = pytest.mark.xdist_group("distillation")

NULL = 10  # Null label of the closed-form teacher (10 classes).


def _logsnr_np(t):
    return 10.0 - 20.0 * t  # A linear schedule: t = 1 noise (-10), t = 0 data (+10).


def _logsnr_jnp(t):
    return 10.0 - 20.0 * t


def _v_np(z, logsnr, labels):
    """Closed-form 'teacher' in v-parametrisation, linear in z, with a label offset."""
    a = 0.3 * (1.0 + 0.05 * logsnr)[:, None, None, None]
    offset = np.where(labels == NULL, 0.0, 0.1 * (labels + 1.0))[:, None, None, None]
    return a * z + offset * np.linspace(-1, 1, z.shape[2])[None, None, :, None]


def _v_jnp(z, logsnr, labels):
    a = (0.3 * (1.0 + 0.05 * logsnr))[:, None, None, None]
    offset = jnp.where(labels == NULL, 0.0, 0.1 * (labels + 1.0))[:, None, None, None]
    return a * z + offset * jnp.linspace(-1, 1, z.shape[2])[None, None, :, None]


def _ab(logsnr):
    return (np.sqrt(1 / (1 + np.exp(-logsnr)))[:, None, None, None],
            np.sqrt(1 / (1 + np.exp(logsnr)))[:, None, None, None])


def _teacher_np(z, logsnr, labels, w):
    """(x_hat, eps_hat) of the guided closed-form teacher, float64."""
    v = (1 + w) * _v_np(z, logsnr, labels) - w * _v_np(z, logsnr, np.full_like(labels, NULL))
    alpha, sigma = _ab(logsnr)
    return alpha * z - sigma * v, sigma * z + alpha * v


def _problem(n=4, b=8, seed=0):
    rs = np.random.RandomState(seed)
    x = rs.uniform(-1, 1, (b, 4, 6, 1))
    eps = rs.normal(size=x.shape)
    t = np.arange(b) % n / n + 1.0 / n  # Every student step i / N, i = 1..N.
    labels = rs.randint(0, 10, b)
    return x, eps, t, labels


@pytest.mark.parametrize("w", [0.0, 1.5])
def test_target_is_two_teacher_ddim_steps(w):
    n = 4
    x, eps, t, labels = _problem(n)
    # Independent float64 re-derivation: two deterministic DDIM steps t -> t' -> t''.
    lt, lm, ls = _logsnr_np(t), _logsnr_np(t - 0.5 / n), _logsnr_np(t - 1.0 / n)
    at, st = _ab(lt)
    z_t = at * x + st * eps
    z = z_t
    for cur, nxt in ((lt, lm), (lm, ls)):
        x_hat, eps_hat = _teacher_np(z, cur, labels, w)
        an, sn = _ab(nxt)
        z = an * x_hat + sn * eps_hat
    z_s = z
    as_, ss = _ab(ls)
    x_tilde = (z_s - ss / st * z_t) / (as_ - ss / st * at)
    # One student DDIM step t -> t'' with x_hat = x_tilde lands on the teacher's z_t''.
    np.testing.assert_allclose(as_ * x_tilde + ss * (z_t - at * x_tilde) / st, z_s, atol=1e-10)

    teacher = samplers.make_denoiser(
        lambda z, l, lab: _v_jnp(z, l, lab), labels=jnp.asarray(labels, jnp.int32),
        null_label=NULL, guidance_scale=w)
    got_z, got_l, got_x = distillation.distillation_target(
        teacher, jnp.asarray(x, jnp.float32), jnp.asarray(eps, jnp.float32),
        jnp.asarray(t, jnp.float32), n, _logsnr_jnp)
    np.testing.assert_allclose(got_l, lt, rtol=1e-6)
    np.testing.assert_allclose(got_z, z_t, atol=1e-5)
    np.testing.assert_allclose(got_x, x_tilde, rtol=1e-4, atol=1e-4)


def test_student_equal_to_teacher_has_the_expected_loss():
    n = 4
    x, eps, t, labels = _problem(n, seed=1)
    lt, lm, ls = _logsnr_np(t), _logsnr_np(t - 0.5 / n), _logsnr_np(t - 1.0 / n)
    at, st = _ab(lt)
    z_t = at * x + st * eps
    x_first, _ = _teacher_np(z_t, lt, labels, 0.0)
    z = z_t
    for cur, nxt in ((lt, lm), (lm, ls)):
        x_hat, eps_hat = _teacher_np(z, cur, labels, 0.0)
        an, sn = _ab(nxt)
        z = an * x_hat + sn * eps_hat
    as_, ss = _ab(ls)
    x_tilde = (z - ss / st * z_t) / (as_ - ss / st * at)
    weight = np.maximum(np.exp(lt), 1.0)
    expected = np.mean(weight * np.mean((x_first - x_tilde) ** 2, axis=(1, 2, 3)))
    assert expected > 1e-4  # One teacher step is not two: the loss is not trivially 0.

    net = samplers.make_denoiser(lambda z, l, lab: _v_jnp(z, l, lab),
                                     labels=jnp.asarray(labels, jnp.int32))
    loss, metrics = distillation.distillation_loss(
        net, net, jnp.asarray(x, jnp.float32), jnp.asarray(eps, jnp.float32),
        jnp.asarray(t, jnp.float32), num_student_steps=n, logsnr_fn=_logsnr_jnp)
    np.testing.assert_allclose(float(loss), expected, rtol=2e-4)
    assert float(metrics["loss"]) == float(loss)


def test_exact_denoiser_gives_the_data_as_target_and_zero_loss():
    """For one data point x0 the exact denoiser predicts x0 everywhere; DDIM is then
    exact, so the target is x0 and a student equal to the teacher has zero loss."""
    n = 4
    x, eps, t, _ = _problem(n, seed=2)
    x = np.broadcast_to(x[:1], x.shape).copy()
    x0 = jnp.asarray(x, jnp.float32)

    def exact(z, logsnr, labels):  # v = (alpha z - x0) / sigma gives x_hat = x0.
        del labels
        alpha, sigma = jax.vmap(lambda l: jnp.stack(
            [jnp.sqrt(jax.nn.sigmoid(l)), jnp.sqrt(jax.nn.sigmoid(-l))]))(logsnr).T
        return (alpha[:, None, None, None] * z - x0) / sigma[:, None, None, None]

    net = samplers.make_denoiser(exact)
    _, _, x_tilde = distillation.distillation_target(
        net, x0, jnp.asarray(eps, jnp.float32), jnp.asarray(t, jnp.float32), n, _logsnr_jnp)
    np.testing.assert_allclose(x_tilde, x, atol=2e-4)
    loss, _ = distillation.distillation_loss(
        net, net, x0, jnp.asarray(eps, jnp.float32), jnp.asarray(t, jnp.float32),
        num_student_steps=n, logsnr_fn=_logsnr_jnp)
    assert float(loss) < 1e-5


def test_student_times_cover_the_grid_and_end_at_zero():
    t, tm, ts = distillation.sample_student_times(jax.random.key(0), 4096, 8)
    t, tm, ts = map(np.asarray, (t, tm, ts))
    assert set(np.round(t * 8).astype(int)) == set(range(1, 9))
    np.testing.assert_allclose(t - tm, 0.5 / 8, atol=1e-7)
    np.testing.assert_allclose(t - ts, 1.0 / 8, atol=1e-7)
    assert ts.min() == 0.0 and tm.min() == 0.5 / 8


def test_round_plan():
    c = distill.default_section()
    c.teacher_num_steps, c.final_num_steps = 128, 4
    assert [n for _, _, n in distill.round_plan(c)] == [64, 32, 16, 8, 4]
    c.final_num_steps = 3
    with pytest.raises(ValueError, match="power of 2"):
        distill.round_plan(c)


# ---------------------------------------------------------------------------
# One round on the tiny model.
# ---------------------------------------------------------------------------


def _distill_config(teacher_workdir, data_dir):
    c = load_config("tiny")
    c.data.data_dir = data_dir
    c.num_train_steps = 4        # Optimizer steps per round.
    c.checkpoint_every_steps = 2
    c.log_every_steps = 2
    c.optimizer.warmup_steps = 0
    c.ema_decays = (0.9,)
    c.distill = distill.default_section()
    c.distill.teacher_workdir = teacher_workdir
    c.distill.teacher_num_steps = 4
    c.distill.final_num_steps = 2  # One round: 4 -> 2 steps.
    c.distill.guidance_scale = 1.0
    c.distill.sample_num_images = 8
    c.distill.report.update(dict(teacher_steps=(2,), num_samples=16, num_reference=16,
                                 batch_size=16))
    return c


def _state_arrays(workdir, step):
    """Every array (params, Adam moments, EMA) of checkpoint ``step`` as NumPy."""
    path = os.path.join(workdir, "checkpoints", str(step), "state")
    with ocp.PyTreeCheckpointer() as ckptr:
        meta = ckptr.metadata(path).item_metadata.tree
        args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), meta)
        restored = ckptr.restore(path, args=ocp.args.PyTreeRestore(item=meta, restore_args=args))
    return jax.tree_util.tree_flatten_with_path(restored)[0]


@pytest.fixture(scope="module")
def distilled(tiny_run, fashion_mnist_dir, tmp_path_factory):
    """The tiny teacher distilled 4 -> 2 steps in one uninterrupted run."""
    teacher_dir, _ = tiny_run
    config = _distill_config(teacher_dir, fashion_mnist_dir)
    workdir = str(tmp_path_factory.mktemp("distill"))
    summary = distill.distill(config, workdir)
    return config, workdir, summary


class _Interrupted(Exception):
    pass


def test_round_checkpoints_and_resumes_bit_exactly(distilled, monkeypatch, tmp_path):
    config, workdir, summary = distilled
    rdir = distill.round_dir(workdir, 1, 2)
    assert summary[0]["step"] == 4 and np.isfinite(summary[0]["metrics"]["loss"])
    assert sorted(int(s) for s in os.listdir(os.path.join(rdir, "checkpoints"))
                  if s.isdigit()) == [2, 4]
    run_config = json.load(open(os.path.join(rdir, "config.json")))
    for section in ("sample", "eval"):
        s = run_config[section]
        assert (s["sampler"], s["num_steps"], s["eta"], s["clip_x"], s["guidance_scale"]) == (
            "ddim", 2, 0.0, True, 0.0)
    assert os.listdir(os.path.join(rdir, "samples")) == ["step_00000004.png"]

    # Interrupt a second run after its third step (checkpoint 2 saved, step 3 lost) ...
    real = input_pipeline.create_input_iterator

    def interrupting(*args, **kwargs):
        it = real(*args, **kwargs)
        if kwargs["start_step"] > 0:
            return it

        class Iter:
            count = 0

            def __next__(self):
                Iter.count += 1
                if Iter.count > 3:
                    raise _Interrupted()
                return next(it)

            def close(self):
                it.close()
        return Iter()

    monkeypatch.setattr(input_pipeline, "create_input_iterator", interrupting)
    other = str(tmp_path / "resumed")
    with pytest.raises(_Interrupted):
        distill.distill(config, other)
    other_rdir = distill.round_dir(other, 1, 2)
    assert checkpointing.Checkpointer(other_rdir, async_save=False).all_steps() == [2]
    # ... rerun the same command: it resumes from 2 and matches the uninterrupted run.
    assert distill.distill(config, other)[0]["step"] == 4
    for step in (2, 4):
        a, b = _state_arrays(rdir, step), _state_arrays(other_rdir, step)
        assert [p for p, _ in a] == [p for p, _ in b]
        for (path, x), (_, y) in zip(a, b):
            np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))
    # A finished round is skipped.
    assert distill.distill(config, other) == [{"round": 1, "step": 4, "skipped": True}]


def test_student_samples_with_half_the_teacher_steps(distilled):
    _, workdir, _ = distilled
    rdir = distill.round_dir(workdir, 1, 2)
    # What the sample CLI does: the run's config.json and its EMA params.
    config = sampling.load_run_config(rdir)
    options = samplers.SamplerOptions.from_config(config.sample)
    assert options.num_steps == 2 == json.load(open(os.path.join(
        rdir, "config.json")))["distillation"]["teacher_num_steps"] // 2
    mesh = sharding.create_mesh(-1, 1)
    abstract, _ = train_step_lib.sharded_abstract_params(
        models.create_model(config.model), config, mesh)
    ckpt = checkpointing.Checkpointer(rdir, async_save=False)
    params = ckpt.restore_params(ckpt.resolve_step(None), abstract, ema_index=0)
    ckpt.close()
    images, labels = sampling.generate(config, params, mesh, options, num_samples=8,
                                       labels=None, seed=0)
    assert images.shape == (8, 32, 32, 1) and images.dtype == np.uint8
    assert images.std() > 0 and list(labels) == list(range(8))


def test_report_table_at_tiny_scale(distilled):
    config, workdir, _ = distilled
    rows = distill.report(config, workdir)
    assert [(r["model"], r["sampler"], r["steps"], r["nfe"]) for r in rows] == [
        ("teacher ddim", "ddim", 2, 4), ("teacher ddpm", "ddpm", 2, 4),
        ("student round 1", "ddim", 2, 2)]
    for r in rows:
        assert np.isfinite(r["fd_effnet_lite0"]) and r["seconds_per_image"] > 0
    md = open(os.path.join(workdir, "report", "distillation.md")).read()
    assert "| student round 1 | ddim | 2 | 2 |" in md and "fd_effnet_lite0" in md
    assert json.load(open(os.path.join(workdir, "report", "distillation.json"))) == rows
