"""fit(): non-finite guard, early stopping, checkpoints and resume, progress, memory."""

from __future__ import annotations

import copy
import math
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer.autoguide import AutoDelta, AutoNormal

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `benchmarks` is not installed

import pyro_flowguide as pfg  # noqa: E402
from benchmarks.memory import HAS_PROC, rss_mb  # noqa: E402
from pyro_flowguide.examples import GAUSSIAN_MIXTURE_DATA as GMM_DATA  # noqa: E402
from pyro_flowguide.examples import gaussian_mixture as gmm  # noqa: E402
from pyro_flowguide.train import (  # noqa: E402
    Callback,
    CheckpointMismatchError,
    EarlyStopping,
    NonFiniteGuard,
    NonFiniteLossError,
    fit,
    load_checkpoint,
)
from pyro_flowguide.transforms import flow_transform  # noqa: E402

torch.set_num_threads(1)

DATA = torch.tensor([0.3, -1.2, 0.8, 2.1, 0.4, -0.5, 1.7, 0.9])
FLAGS = {"mode": None}


def model(y):
    z = pyro.sample("z", dist.Normal(0.0, 3.0))
    loc = z
    if FLAGS["mode"] == "param":
        loc = z * math.nan  # Pyro's validation rejects it; without validation the loss is NaN
    if FLAGS["mode"] == "grad":
        # Finite value (0), NaN gradient: d sqrt(u)/du at u = 0 times du/dz = 0.
        pyro.factor("kink", torch.sqrt(z - z))
    if FLAGS["mode"] == "outlier":
        pyro.factor("outlier", torch.tensor(-1e30))  # a finite loss of 1e30, no gradient
    with pyro.plate("data", len(y)):
        pyro.sample("y", dist.Normal(loc, 1.0), obs=y)


def flow_guide(y):
    """A hand-written flow guide: affine then a small MAF, registered with pyro.module."""
    T = pyro.module("maf", _FLOW["T"])
    loc = pyro.param("loc", torch.zeros(1))
    base = dist.Normal(loc, 1.0).to_event(1)
    z = pyro.sample("z_vec", dist.TransformedDistribution(base, [T]), infer={"is_auxiliary": True})
    pyro.sample("z", dist.Delta(z[..., 0]))


_FLOW: dict = {}


def _new_flow_guide():
    torch.manual_seed(123)
    _FLOW["T"] = flow_transform("MAF", features=1, hidden_features=(8, 8), transforms=1)
    return flow_guide


@pytest.fixture(autouse=True)
def _reset_flags():
    # conftest gives every test a fresh param store and seed; this resets the test model's switch
    FLAGS["mode"] = None
    yield
    FLAGS["mode"] = None


def _params() -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in pyro.get_param_store().named_parameters()}


def _same(a, b) -> bool:
    """Bitwise equality of nested dicts/lists of tensors and numbers."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if torch.is_tensor(a):
        return torch.equal(a, b)
    return a == b


class BadSteps(Callback):
    """Makes the model non-finite on the chosen (1-based) steps; records state after each step."""

    def __init__(self, mode: str, bad: set[int], forever_from: int | None = None):
        self.mode, self.bad, self.forever_from = mode, bad, forever_from
        self.params, self.optim = [], []

    def _arm(self, next_step: int) -> None:
        on = next_step in self.bad or (self.forever_from is not None and next_step >= self.forever_from)
        FLAGS["mode"] = self.mode if on else None

    def on_start(self, state):
        self.params.append(_params())
        self.optim.append(copy.deepcopy(state.optim.get_state()))
        self._arm(state.step + 1)

    def on_step(self, state):
        self.params.append(_params())
        self.optim.append(copy.deepcopy(state.optim.get_state()))
        self._arm(state.step + 1)


# ---------------------------------------------------------------------------- 1. NaN guard


@pytest.mark.parametrize(
    "mode,validate",
    [("param", True), ("param", False), ("grad", True)],
    ids=["invalid-parameter-error", "nan-loss", "nan-gradient"],
)
def test_non_finite_steps_are_skipped_bit_exactly(mode, validate):
    bad = {3, 4, 7}
    recorder = BadSteps(mode, bad)
    with pyro.validation_enabled(validate):
        result = fit(model, AutoNormal(model), DATA, steps=10, progress=False, seed=0, callbacks=[recorder])
    assert result.num_skipped == len(bad)
    assert result.stop_reason == "completed"
    for step in range(1, 11):
        same_params = _same(recorder.params[step], recorder.params[step - 1])
        same_optim = _same(recorder.optim[step], recorder.optim[step - 1])
        if step in bad:
            assert same_params and same_optim, f"step {step} changed the state"
        else:
            assert not same_params, f"step {step} did not update the parameters"
    if mode == "grad":
        assert all(math.isfinite(v) for v in result.losses)  # the loss itself was fine
    else:
        assert all(not math.isfinite(result.losses[s - 1]) for s in bad)
    assert all(math.isfinite(result.losses[s - 1]) for s in set(range(1, 11)) - bad)


@pytest.mark.parametrize("validate", [True, False])
def test_consecutive_bad_steps_stop_fit_naming_the_site(validate):
    recorder = BadSteps("param", set(), forever_from=4)
    with pyro.validation_enabled(validate), pytest.raises(NonFiniteLossError) as info:
        fit(
            model,
            AutoNormal(model),
            DATA,
            steps=50,
            progress=False,
            seed=0,
            callbacks=[recorder, NonFiniteGuard(max_consecutive=5)],
        )
    err = info.value
    assert "5 consecutive steps" in str(err)
    assert "'y'" in str(err) and any("'y'" in s for s in err.sites)
    assert not any("'z'" in s for s in err.sites)  # the latent is fine, only the likelihood is not
    assert err.result.steps == 8 and err.result.num_skipped == 5


def test_other_errors_are_not_swallowed():
    def broken(y):
        pyro.sample("z", dist.Normal(0.0, 1.0))
        raise RuntimeError("a bug in the model")

    with pytest.raises(RuntimeError, match="a bug in the model"):
        fit(broken, AutoNormal(model), DATA, steps=3, progress=False)


# ---------------------------------------------------------------------------- 2. early stopping


class Record(Callback):
    def __init__(self):
        self.params, self.smoothed = {}, {}

    def on_step(self, state):
        self.params[state.step] = _params()
        self.smoothed[state.step] = state.smoothed_loss


@pytest.mark.slow
def test_early_stopping_stops_on_plateau_and_restores_best():
    record = Record()
    stopper = EarlyStopping(patience=100, min_delta=0.01)
    result = fit(
        model, AutoNormal(model), DATA, steps=5000, progress=False, seed=0, callbacks=[record, stopper]
    )
    assert result.stop_reason.startswith("early stopping")
    assert result.steps < 5000
    best = stopper.best_step
    assert result.steps - best == 100
    # The best smoothed loss is not beaten by more than min_delta afterwards ...
    assert all(record.smoothed[s] >= stopper.best - 0.01 for s in range(best, result.steps + 1))
    # ... and the parameters now in the store are exactly those of that step, not the last.
    assert _same(_params(), record.params[best])
    assert not _same(record.params[result.steps], record.params[best])


class OutlierAt(Callback):
    """Makes the loss of one (1-based) step 1e30; records the smoothed loss after each step."""

    def __init__(self, step):
        self.step, self.smoothed = step, {}

    def on_start(self, state):
        FLAGS["mode"] = "outlier" if state.step + 1 == self.step else None

    def on_step(self, state):
        self.smoothed[state.step] = state.smoothed_loss
        FLAGS["mode"] = "outlier" if state.step + 1 == self.step else None


def test_one_outlier_loss_neither_wrecks_the_smoothed_loss_nor_stops_the_fit():
    outlier = OutlierAt(94)
    stopper = EarlyStopping(patience=200)
    result = fit(
        model, AutoNormal(model), DATA, steps=2000, progress=False, seed=0, callbacks=[outlier, stopper]
    )
    assert result.losses[93] == pytest.approx(1e30, rel=1e-3)
    assert max(outlier.smoothed[s] for s in range(94, result.steps + 1)) < 1e3
    assert result.steps != 294 and stopper.best_step > 94
    assert math.isfinite(result.smoothed_loss) and result.smoothed_loss < 1e3


def test_early_stopping_reused_for_a_second_fit_starts_afresh():
    stopper = EarlyStopping(patience=50, min_delta=0.01)
    first = fit(model, AutoNormal(model), DATA, steps=1500, progress=False, seed=0, callbacks=[stopper])
    assert first.stop_reason.startswith("early stopping")
    far = DATA + 10.0  # a higher loss throughout: never below the first fit's best
    pyro.clear_param_store()
    alone = fit(model, AutoNormal(model), far, steps=first.steps + 100, progress=False, seed=0)
    want = _params()
    pyro.clear_param_store()
    second = fit(
        model, AutoNormal(model), far, steps=first.steps + 100, progress=False, seed=0, callbacks=[stopper]
    )
    # The stopper judged the second fit on its own: it ran as it would have without it.
    assert (second.steps, second.stop_reason) == (alone.steps, alone.stop_reason)
    assert _same(_params(), want)


# ---------------------------------------------------------------------------- 3. checkpoints


def _optim():
    return pyro.optim.ClippedAdam({"lr": 0.02, "clip_norm": 10.0, "lrd": 0.999})


class StopAt(Callback):
    def __init__(self, step):
        self.step = step

    def on_step(self, state):
        if state.step == self.step:
            state.stop_reason = "stopped by test"


@pytest.mark.slow
@pytest.mark.parametrize("guide_kind", ["autonormal", "flow"])
def test_resume_is_bit_exact(tmp_path, guide_kind):
    def make_guide():
        return AutoNormal(model) if guide_kind == "autonormal" else _new_flow_guide()

    n = 25
    full = fit(model, make_guide(), DATA, steps=2 * n, optim=_optim(), progress=False, seed=1)
    want = _params()

    # N steps, checkpoint, then a fresh process state (store, guide, optimiser) resumes N more.
    path = tmp_path / "ckpt.pt"
    pyro.clear_param_store()
    first = fit(model, make_guide(), DATA, steps=n, optim=_optim(), progress=False, seed=1, checkpoint=path)
    assert first.steps == n and load_checkpoint(path)["step"] == n
    pyro.clear_param_store()
    torch.manual_seed(999)  # whatever the RNG state now, the checkpoint's is restored
    resumed = fit(
        model, make_guide(), DATA, steps=2 * n, optim=_optim(), progress=False, checkpoint=path, resume=True
    )
    assert resumed.steps == 2 * n
    assert _same(_params(), want)
    assert torch.equal(torch.as_tensor(resumed.losses), torch.as_tensor(full.losses))


def test_resume_with_defaults_after_interruption(tmp_path):
    full = fit(model, AutoNormal(model), DATA, steps=40, progress=False, seed=2)
    want = _params()
    path = tmp_path / "ckpt.pt"
    pyro.clear_param_store()
    cut = fit(
        model, AutoNormal(model), DATA, steps=40, progress=False, seed=2, checkpoint=path, callbacks=[StopAt(17)]
    )
    assert cut.stop_reason == "stopped by test" and load_checkpoint(path)["step"] == 17
    pyro.clear_param_store()
    resumed = fit(model, AutoNormal(model), DATA, steps=40, progress=False, checkpoint=path, resume=True)
    assert _same(_params(), want)
    assert torch.equal(torch.as_tensor(resumed.losses), torch.as_tensor(full.losses))


def test_checkpoint_loads_weights_only_and_refuses_other_models(tmp_path):
    path = tmp_path / "ckpt.pt"
    fit(model, AutoNormal(model), DATA, steps=5, progress=False, checkpoint=path)
    payload = torch.load(path, weights_only=True)
    assert payload["step"] == 5 and "AutoNormal.locs.z" in payload["params"]

    def other(y):
        w = pyro.sample("w", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        with pyro.plate("data", len(y)):
            pyro.sample("y", dist.Normal(w.sum(-1, keepdim=True), 1.0), obs=y)

    pyro.clear_param_store()
    with pytest.raises(CheckpointMismatchError, match="latent sites of the model differ") as info:
        fit(other, AutoNormal(other), DATA, steps=10, progress=False, checkpoint=path, resume=True)
    assert "'z" in str(info.value) and "'w" in str(info.value)


_KILL_SCRIPT = textwrap.dedent(
    """
    import io, sys, time, torch, pyro, pyro.distributions as dist
    from pyro.infer.autoguide import AutoNormal
    from pyro_flowguide.train import fit

    real_save, calls = torch.save, []

    def slow_save(obj, f):
        # Write half of the bytes, announce it, and hang: the parent kills us mid-write.
        calls.append(1)
        if len(calls) < 3:
            return real_save(obj, f)
        buf = io.BytesIO()
        real_save(obj, buf)
        data = buf.getvalue()
        f.write(data[: len(data) // 2])
        f.flush()
        print("WRITING", flush=True)
        time.sleep(60)

    torch.save = slow_save

    def model():
        pyro.sample("z", dist.Normal(torch.zeros(1000), 1.0).to_event(1))

    fit(model, AutoNormal(model), steps=100, progress=False, seed=0,
        checkpoint=sys.argv[1], checkpoint_every=2)
    """
)


@pytest.mark.slow
def test_sigkill_during_checkpoint_write_leaves_a_loadable_checkpoint(tmp_path):
    path = tmp_path / "ckpt.pt"
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILL_SCRIPT, str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        line = proc.stdout.readline()
        assert line.strip() == "WRITING", proc.stderr.read()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    leftovers = [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    assert leftovers, "the kill did not interrupt a write"
    payload = load_checkpoint(path)
    assert payload["step"] == 4  # the last complete checkpoint (steps 2 and 4 were written)
    assert payload["params"]["AutoNormal.locs.z"].shape == (1000,)


# ---------------------------------------------------------------------------- 4. progress


def test_progress_false_prints_nothing(capfd):
    fit(model, AutoNormal(model), DATA, steps=30, progress=False, seed=0)
    out, err = capfd.readouterr()
    assert out == "" and err == ""


def test_progress_bar_shows_the_loss(capfd):
    fit(model, AutoNormal(model), DATA, steps=30, progress=True, seed=0)
    _, err = capfd.readouterr()
    assert "30/30" in err
    assert re.search(r"loss -?\d+(\.\d+)?", err), err


# ---------------------------------------------------------------------------- defaults


def test_defaults_follow_protocol_a():
    optim = pfg.train.default_optim(3000)
    torch_optim = optim.pt_optim_constructor
    assert torch_optim is pyro.optim.clipped_adam.ClippedAdam
    args = optim.pt_optim_args
    assert args["lr"] == 1e-2 and args["clip_norm"] == 10.0
    assert math.isclose(args["lr"] * args["lrd"] ** 3000, 1e-3, rel_tol=1e-9)
    result = fit(model, AutoNormal(model), DATA, steps=2, progress=False)
    assert result.num_particles == 4 and result.vectorized is True


def test_falls_back_to_sequential_particles_with_one_warning():
    def shape_bound(y):
        # A batch dimension without a plate: cannot take an outer particle plate.
        z = pyro.sample("z", dist.Normal(torch.zeros(3), 1.0))
        pyro.sample("y", dist.Normal(z.sum(), 1.0), obs=y.sum())

    with pytest.warns(UserWarning, match="sequential particles") as record:
        result = fit(shape_bound, AutoNormal(shape_bound), DATA, steps=5, progress=False)
    assert len([w for w in record if "sequential" in str(w.message)]) == 1
    assert result.vectorized is False and result.num_particles == 4
    assert all(math.isfinite(v) for v in result.losses)


def test_particle_count_follows_the_guide_unless_given():
    guide = pfg.AutoFlowGuide(model)
    result = fit(model, guide, DATA, steps=2, progress=False)
    assert result.num_particles == 32 and result.vectorized is True
    pyro.clear_param_store()
    result = fit(model, pfg.AutoFlowGuide(model), DATA, steps=2, num_particles=3, progress=False)
    assert result.num_particles == 3 and result.vectorized is True
    pyro.clear_param_store()
    result = fit(model, pfg.AutoFlowGuide(model), DATA, steps=2, vectorize_particles=False, progress=False)
    assert result.num_particles == 4 and result.vectorized is False  # sequential: capped

    def shape_bound(y):
        z = pyro.sample("z", dist.Normal(torch.zeros(3), 1.0))
        pyro.sample("y", dist.Normal(z.sum(), 1.0), obs=y.sum())

    pyro.clear_param_store()
    with pytest.warns(UserWarning, match="32 vectorised particles .*using 4 sequential"):
        result = fit(shape_bound, pfg.AutoFlowGuide(shape_bound), DATA, steps=2, progress=False)
    assert result.num_particles == 4 and result.vectorized is False


@pytest.mark.slow
def test_learning_rate_schedule_follows_the_guide_unless_given(monkeypatch):
    from pyro_flowguide.train.defaults import TRAINING_DEFAULTS, TrainingDefaults, training_defaults

    class LastLearningRates(pfg.train.Callback):
        def on_end(self, state):
            self.lrs = {g["lr"] for o in state.svi.optim.optim_objs.values() for g in o.param_groups}

    class SlowerGuide(AutoNormal):
        pass

    monkeypatch.setitem(TRAINING_DEFAULTS, SlowerGuide, TrainingDefaults(final_lr=1e-4))
    for guide, final in ((AutoNormal(model), pfg.train.DEFAULT_FINAL_LR), (SlowerGuide(model), 1e-4)):
        pyro.clear_param_store()
        seen = LastLearningRates()
        fit(model, guide, DATA, steps=50, progress=False, callbacks=[seen])
        assert len(seen.lrs) == 1 and math.isclose(seen.lrs.pop(), final, rel_tol=1e-6)
    amortized = TRAINING_DEFAULTS[pfg.AutoAmortizedFlowGuide]
    assert (amortized.final_lr, amortized.num_particles) == (1e-4, 8)
    assert training_defaults(pfg.AutoFlowGuide(model)).final_lr == 3e-4
    # The structured posterior trains with the same budget whichever class builds it.
    structured = training_defaults(pfg.AutoStructuredFlowGuide(model))
    assert (structured.final_lr, structured.num_particles) == (3e-4, 32)


def test_result_plot_and_repr():
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    result = fit(model, AutoNormal(model), DATA, steps=20, progress=False)
    assert "steps=20" in repr(result)
    ax = result.plot()
    assert ax.get_xlabel() == "step"


# ---------------------------------------------------------------------------- 5. memory


@pytest.mark.slow
@pytest.mark.skipif(not HAS_PROC, reason="needs /proc")
def test_memory_stays_flat():
    # The acceptance figure (20,000 steps, < 20 MB) comes from
    # `python benchmarks/fit_overhead.py --memory`; here 3,000 steps must stay
    # under the same per-step budget (3 MB), enough to catch a cache that keeps graphs.
    def target():
        z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        pyro.sample("w", dist.Normal(z.sum(-1), 1.0))

    guide = pfg.AutoFlowGuide(target, hidden_features=(8, 8), transforms=1)
    fit(target, guide, steps=500, progress=False, seed=0)  # warm up the allocator and lazy imports
    before = rss_mb()
    result = fit(target, guide, steps=3_000, progress=False)
    grown = rss_mb() - before
    assert result.steps == 3_000
    assert grown < 3, f"RSS grew by {grown:.1f} MB"


# ---------------------------------------------------------------------------- 5. enumeration, convergence

def _gmm_init(site):
    # The tutorial's initialisation: equal weights, half the data's spread, two data points as locs.
    if site["name"] == "weights":
        return torch.ones(2) / 2
    if site["name"] == "scale":
        return (GMM_DATA.var() / 2).sqrt()
    return GMM_DATA[torch.tensor([0, 2])]


def test_enumerated_discrete_sites_train_with_trace_enum_elbo(recwarn):
    guide = AutoDelta(poutine.block(gmm, expose=["weights", "locs", "scale"]), init_loc_fn=_gmm_init)
    result = fit(
        gmm, guide, GMM_DATA, steps=200, optim=pyro.optim.Adam({"lr": 0.1}), num_particles=1, progress=False, seed=0
    )
    assert not [w for w in recwarn if "not guide" in str(w.message)]
    losses = torch.as_tensor(result.losses)
    assert torch.isfinite(losses).all() and losses[-20:].mean() < losses[:20].mean()
    locs = pyro.param("AutoDelta.locs").detach().sort().values
    assert torch.allclose(locs, torch.tensor([0.5, 11.0]), atol=0.5)


def test_a_loss_that_ignores_enumerated_sites_is_refused():
    guide = AutoDelta(poutine.block(gmm, expose=["weights", "locs", "scale"]), init_loc_fn=_gmm_init)
    with pytest.raises(ValueError, match="enumerates site.*'assignment'.*TraceEnum_ELBO"):
        fit(gmm, guide, GMM_DATA, steps=2, loss=pyro.infer.Trace_ELBO(), progress=False)


@pytest.mark.parametrize("steps", [2.5, -1, "10", True])
def test_steps_must_be_a_whole_number(steps):
    with pytest.raises(ValueError, match="steps must be a whole number"):
        fit(model, AutoNormal(model), DATA, steps=steps, progress=False)


@pytest.mark.parametrize("lr", [0.0, -0.01, float("nan")])
def test_a_learning_rate_that_cannot_train_is_refused(lr):
    with pytest.raises(ValueError, match=f"lr must be a finite number > 0, got {lr}"):
        fit(model, AutoNormal(model), DATA, steps=5, optim=pyro.optim.ClippedAdam({"lr": lr}), progress=False)


def test_an_unconverged_run_warns_and_says_so():
    from pyro_flowguide.examples import linear_regression

    x = torch.linspace(-2, 2, 50)
    y = 9.0 + 0.5 * x + 0.3 * torch.randn(50, generator=torch.Generator().manual_seed(0))
    with pytest.warns(UserWarning, match="still falling.*more steps"):
        short = fit(linear_regression, AutoNormal(linear_regression), x, y, steps=300, progress=False, seed=0)
    assert short.converged is False
    pyro.clear_param_store()
    long = fit(model, AutoNormal(model), DATA, steps=1000, progress=False, seed=0)
    assert long.converged is True
