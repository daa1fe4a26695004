"""Probes AutoFlowGuide and fit with bad or unusual input; prints one Markdown row per probe kind.

The probe kinds are those of issue 32 (discrete sites, supports, shapes that change
between calls, flow options, data, initial values, sizes, the param store and saving,
checkpoints, training options, summaries) and more a user would plausibly hit. Each
probe runs in a forked child with its own timeout, a cleared param store and seed 0,
and is judged by hand-written checks into one outcome:

  works    ran and gave a correct result (shapes, supports, equality checked where cheap)
  named    refused with an error whose message names the site/option and says what to do
  generic  an error that does not name the site/option or gives no fix
  silent   ran but gave a wrong/stale result, or silently ignored an option
  hang     no result within the per-probe timeout (a crash of the child counts as generic)

Run from the repository root (a few minutes on two cores):

    OMP_NUM_THREADS=1 python benchmarks/bad_input.py
    python benchmarks/bad_input.py --only checkpoint   # probes whose group or case has this text
    python benchmarks/bad_input.py --timeout 120 --list
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import re
import resource
import select
import shutil
import signal
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass

import numpy as np
import pyro
import pyro.distributions as dist
import pyro.distributions.transforms as T
import pyro.poutine as poutine
import torch
from pyro.infer import Trace_ELBO, config_enumerate
from pyro.infer.autoguide import AutoNormal
from pyro.infer.autoguide.initialization import init_to_value

import pyro_flowguide as pfg
from pyro_flowguide.examples import eight_schools_centered
from pyro_flowguide.train import Callback, EarlyStopping, load_checkpoint
from pyro_flowguide.train.checkpoints import atomic_save, checksum
from pyro_flowguide.train.defaults import training_defaults

AutoFlowGuide = pfg.AutoFlowGuide

# --------------------------------------------------------------------------- the harness


class Outcome(Exception):
    """Raised by a probe to report ``works`` or ``silent`` with a message."""

    def __init__(self, outcome: str, message: str):
        super().__init__(message)
        self.outcome, self.message = outcome, message


def works(message: str):
    raise Outcome("works", message)


def silent(message: str):
    raise Outcome("silent", message)


@dataclass
class Probe:
    group: str
    case: str
    fn: object
    names: tuple  # each entry: a string or a tuple of alternatives the message must contain


PROBES: list[Probe] = []
CAUGHT: list = []  # warnings recorded while the current probe runs

# A message "says what to do" when it has one of these.
FIX = re.compile(
    r"\b(use|pass|choose|give|set|drop|remove|build|make|reparametri[sz]e|enumerate|instead|must be|"
    r"must return|should be|one of|subclass|wrap|impute|check|call|rename|delete|start|resume=False|"
    r"re-run|rerun|did you mean|needs?|e\.g\.|(options|names|sites) are)\b",
    re.I,
)


def probe(group: str, case: str, *names):
    def register(fn):
        PROBES.append(Probe(group, case, fn, tuple(names)))
        return fn

    return register


def one_line(text: str, limit: int = 160) -> str:
    text = re.sub(r"\s+", " ", str(text)).strip().replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def judge(error: BaseException, names: tuple) -> tuple[str, str]:
    text = f"{type(error).__name__}: {error}"
    has_names = all(any(n in text for n in ((alts,) if isinstance(alts, str) else alts)) for alts in names)
    return ("named" if names and has_names and FIX.search(str(error)) else "generic"), text


def warned(pattern: str) -> str | None:
    for w in CAUGHT:
        if re.search(pattern, str(w.message), re.I):
            return f"{w.category.__name__}: {w.message}"
    return None


def execute(p: Probe) -> tuple[str, str]:
    global CAUGHT
    torch.set_num_threads(1)
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    pyro.enable_validation(True)
    with warnings.catch_warnings(record=True) as CAUGHT:
        warnings.simplefilter("always")
        try:
            p.fn()
        except Outcome as o:
            return o.outcome, o.message
        except Exception as error:  # noqa: BLE001 - every error is judged
            traceback.print_exc(file=sys.stderr)
            return judge(error, p.names)
        finally:
            for folder in TMPDIRS:
                shutil.rmtree(folder, ignore_errors=True)
    return "generic", "probe returned without a verdict (a bug in this script)"


def run_in_child(p: Probe, timeout: float, memory_gib: float) -> tuple[str, str, float]:
    start = time.perf_counter()
    read, write = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: run the probe, send back its verdict, exit
        os.close(read)
        os.dup2(2, 1)  # the table owns stdout
        try:
            limit = int(memory_gib * 2**30)
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
            print(f"=== {p.group} / {p.case}", file=sys.stderr)
            outcome = execute(p)
        except BaseException as error:  # noqa: BLE001
            outcome = ("generic", f"{type(error).__name__}: {error}")
        data = json.dumps(outcome).encode()
        view = memoryview(data)
        while view:
            view = view[os.write(write, view):]
        os._exit(0)
    os.close(write)
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                return "hang", f"no result within {timeout:.0f} s (killed)", time.perf_counter() - start
            ready, _, _ = select.select([read], [], [], left)
            if ready:
                chunk = os.read(read, 1 << 16)
                if not chunk:
                    break
                chunks.append(chunk)
    finally:
        os.close(read)
    _, status = os.waitpid(pid, 0)
    seconds = time.perf_counter() - start
    if not chunks:
        how = f"signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status) else f"exit {os.WEXITSTATUS(status)}"
        return "generic", f"the probe's process died ({how}) without a result", seconds
    outcome, message = json.loads(b"".join(chunks))
    return outcome, message, seconds


# --------------------------------------------------------------------------- models and helpers

X = torch.linspace(-2.0, 2.0, 20)
Y = 1.0 + 0.5 * X + 0.3 * torch.randn(20, generator=torch.Generator().manual_seed(0))


def regression(x, y=None):
    a = pyro.sample("a", dist.Normal(0.0, 10.0))
    s = pyro.sample("s", dist.HalfNormal(5.0))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Normal(1.0 + a * x, s), obs=y)


def other_regression(x, y=None):  # same latent size as regression, other sites
    b = pyro.sample("b", dist.Normal(0.0, 3.0))
    t = pyro.sample("t", dist.LogNormal(0.0, 1.0))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Normal(b * x, t), obs=y)


def named_model(build):
    """Two models given the same ``__name__`` (notebook cells that each define ``model``)."""
    build.__name__ = build.__qualname__ = "model"
    return build


def model_normal_z(y):
    z = pyro.sample("z", dist.Normal(0.0, 3.0))
    with pyro.plate("data", len(y)):
        pyro.sample("y", dist.Normal(z, 1.0), obs=y)


def model_scale_z(y):  # the same latent name and size, another support and role
    z = pyro.sample("z", dist.LogNormal(0.0, 1.0))
    with pyro.plate("data", len(y)):
        pyro.sample("y", dist.Normal(0.0, z), obs=y)


def model_a_prior1(x, y=None):
    a = pyro.sample("a", dist.Normal(0.0, 1.0))
    s = pyro.sample("s", dist.HalfNormal(1.0))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Normal(a * x, s), obs=y)


def model_a_prior2(x, y=None):
    a = pyro.sample("a", dist.Normal(5.0, 1.0))
    s = pyro.sample("s", dist.HalfNormal(1.0))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Normal(a + x, s), obs=y)


named_model(model_normal_z)
named_model(model_scale_z)
named_model(model_a_prior1)
named_model(model_a_prior2)


def sized(n, extra=False):
    z = pyro.sample("z", dist.Normal(torch.zeros(n), 1.0).to_event(1))
    if extra:
        pyro.sample("w", dist.Normal(0.0, 1.0))
    pyro.sample("obs", dist.Normal(z.sum(), 1.0), obs=torch.tensor(0.0))


def quick(model, guide, *args, steps=5, **kwargs):
    return pfg.fit(model, guide, *args, steps=steps, progress=False, **kwargs)


def sample_sites(guide, *args, n=200):
    torch.manual_seed(1)
    with torch.no_grad():
        return guide.sample_posterior(n, *args)


def check_support(model, samples, *args) -> str:
    """Each site's samples against the support of the model's distribution (one prior trace)."""
    trace = poutine.trace(model).get_trace(*args)
    bad = []
    for name, value in samples.items():
        fn = trace.nodes[name]["fn"]
        inside = fn.support.check(value)
        if not bool(torch.as_tensor(inside).all()):
            bad.append(f"{name}: {int((~torch.as_tensor(inside)).sum())} draws outside {fn.support}")
        if not torch.isfinite(value).all():
            bad.append(f"{name}: non-finite draws")
    return "; ".join(bad)


def expect_no_flow_change(guide_fn, what):
    """Builds, calls and fits a guide; it must train a real flow, else the option was ignored."""
    guide = guide_fn()
    quick(regression, guide, X, Y)
    n = sum(p.numel() for p in guide.flow.parameters()) if getattr(guide, "flow", None) is not None else 0
    if n == 0:
        silent(f"accepted {what}; the guide has no flow layers (0 flow parameters), no warning")
    works(f"accepted {what}; flow with {n} parameters trained")


def same_samples(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


TMPDIRS: list[str] = []  # removed when the probe ends


def tmpdir() -> str:
    TMPDIRS.append(tempfile.mkdtemp(prefix="bad_input_"))
    return TMPDIRS[-1]


# --------------------------------------------------------------------------- discrete sites and observations


@probe("discrete", "Bernoulli latent, no enumeration", "'z'")
def _():
    def model():
        z = pyro.sample("z", dist.Bernoulli(0.3))
        pyro.sample("x", dist.Normal(z, 1.0), obs=torch.tensor(0.5))

    AutoFlowGuide(model)()
    silent("a discrete latent was accepted by the continuous guide")


@config_enumerate
def mixture(y):
    w = pyro.sample("w", dist.Dirichlet(torch.ones(2)))
    locs = pyro.sample("locs", dist.Normal(0.0, 5.0).expand([2]).to_event(1))
    with pyro.plate("data", len(y)):
        c = pyro.sample("c", dist.Categorical(w))
        pyro.sample("y", dist.Normal(locs[c], 1.0), obs=y)


MIX = torch.cat([torch.randn(10, generator=torch.Generator().manual_seed(1)) - 3, torch.randn(10, generator=torch.Generator().manual_seed(2)) + 3])


@probe("discrete", "@config_enumerate mixture, AutoFlowGuide(model) directly, fit default loss", "'c'")
def _():
    guide = AutoFlowGuide(mixture)
    result = quick(mixture, guide, MIX)
    draws = sample_sites(guide, MIX)
    bad = check_support(mixture, draws, MIX)
    if "c" in draws or bad or not np.isfinite(result.losses).all():
        silent(f"sites {sorted(draws)}; {bad or 'losses not finite'}")
    works(f"enumerated 'c'; guide over {sorted(draws)}; losses finite; draws inside supports")


@probe("discrete", "@config_enumerate mixture, guide on poutine.block(hide=['c']), fit default loss", "'c'")
def _():
    guide = AutoFlowGuide(poutine.block(mixture, hide=["c"]))
    result = quick(mixture, guide, MIX)
    draws = sample_sites(guide, MIX)
    bad = check_support(mixture, draws, MIX)
    if bad or not np.isfinite(result.losses).all():
        silent(bad or "losses not finite")
    works(f"guide over {sorted(draws)}; losses finite; draws inside supports")


@probe("discrete", "@config_enumerate mixture, fit(loss=Trace_ELBO()) given", "'c'", ("TraceEnum", "enumerat"))
def _():
    guide = AutoFlowGuide(poutine.block(mixture, hide=["c"]))
    result = quick(mixture, guide, MIX, loss=Trace_ELBO())
    w = warned("'c'|enumerat|not guide")
    silent(f"fit {result.stop_reason!r}, 'c' drawn from its prior, not enumerated (biased objective); "
           f"{'only notice: Pyro' + chr(39) + 's ' + w if w else 'no warning'}")


def fitted_inside_supports(model, data):
    """Fits AutoFlowGuide(model) a few steps; its draws, after checking they lie inside their supports."""
    guide = AutoFlowGuide(model)
    quick(model, guide, data)
    draws = sample_sites(guide, data)
    bad = check_support(model, draws, data)
    if bad:
        silent(bad)
    return draws


@probe("discrete", "Bernoulli observation given as a bool tensor", "'y'")
def _():
    def model(y):
        p = pyro.sample("p", dist.Beta(1.0, 1.0))
        with pyro.plate("data", len(y)):
            pyro.sample("y", dist.Bernoulli(p), obs=y)

    draws = fitted_inside_supports(model, torch.tensor([True, False, True, True, False, True]))
    works(f"p in (0, 1); posterior mean {float(draws['p'].mean()):.2f}")


@probe("discrete", "Poisson observation given as an int64 tensor", "'y'")
def _():
    def model(y):
        r = pyro.sample("r", dist.Gamma(2.0, 1.0))
        with pyro.plate("data", len(y)):
            pyro.sample("y", dist.Poisson(r), obs=y)

    draws = fitted_inside_supports(model, torch.tensor([1, 3, 2, 0, 4, 2]))
    works(f"r > 0; posterior mean {float(draws['r'].mean()):.2f}")


# --------------------------------------------------------------------------- supports and site shapes


@probe("support", "HalfNormal, Uniform(0, 1) and Dirichlet latents: draws inside supports")
def _():
    def model():
        s = pyro.sample("s", dist.HalfNormal(1.0))
        u = pyro.sample("u", dist.Uniform(0.0, 1.0))
        p = pyro.sample("p", dist.Dirichlet(torch.ones(3)))
        pyro.sample("x", dist.Normal(s + u + p[0], 1.0), obs=torch.tensor(1.0))

    guide = AutoFlowGuide(model)
    quick(model, guide)
    bad = check_support(model, sample_sites(guide))
    if bad:
        silent(bad)
    works("200 draws of s, u, p inside their supports")


def matrix_site(model, data, site, shape, what):
    """Fits a model with one matrix-valued latent; checks its draws' support and shape."""
    draws = fitted_inside_supports(model, data)
    if draws[site].shape != (200,) + shape:
        silent(f"shape {tuple(draws[site].shape)}")
    works(what)


@probe("support", "LKJCholesky latent (corr_cholesky support)", "'L'")
def _():
    def model(data):
        L = pyro.sample("L", dist.LKJCholesky(3, 2.0))
        with pyro.plate("data", len(data)):
            pyro.sample("obs", dist.MultivariateNormal(torch.zeros(3), scale_tril=L), obs=data)

    matrix_site(model, torch.randn(10, 3), "L", (3, 3), "200 draws of L are correlation Cholesky factors, shape (3, 3)")


@probe("support", "Wishart latent (positive-definite support)", "'S'")
def _():
    def model(data):
        S = pyro.sample("S", dist.Wishart(df=torch.tensor(4.0), covariance_matrix=torch.eye(2)))
        with pyro.plate("data", len(data)):
            pyro.sample("obs", dist.MultivariateNormal(torch.zeros(2), covariance_matrix=S), obs=data)

    matrix_site(model, torch.randn(10, 2), "S", (2, 2), "200 draws of S are positive definite, shape (2, 2)")


@probe("support", "ProjectedNormal latent (sphere support)", "'d'", ("reparam", "Reparam"))
def _():
    def model():
        d = pyro.sample("d", dist.ProjectedNormal(torch.ones(3)))
        pyro.sample("x", dist.Normal(d[0], 1.0), obs=torch.tensor(0.5))

    guide = AutoFlowGuide(model)
    quick(model, guide)
    bad = check_support(model, sample_sites(guide))
    if bad:
        silent(bad)
    works("draws on the sphere")


@probe("support", "Uniform(0, b) whose bound b is another latent (dependent support)", "'u'")
def _():
    def model():
        b = pyro.sample("b", dist.Gamma(2.0, 1.0))
        u = pyro.sample("u", dist.Uniform(0.0, b))
        pyro.sample("x", dist.Normal(u, 0.2), obs=torch.tensor(0.8))

    guide = AutoFlowGuide(model)
    guide()
    draws = sample_sites(guide, n=1000)
    out = int((draws["u"] >= draws["b"]).sum() + (draws["u"] <= 0).sum())
    try:
        result = quick(model, guide, steps=30)
        fitted = f"fit(steps=30): {result.stop_reason!r}, {result.num_skipped} of 30 steps skipped"
    except Exception as error:  # noqa: BLE001
        fitted = f"fit(steps=30): {type(error).__name__}: {error}"
    if out:
        silent(f"{out}/1000 guide draws have u outside (0, b) of their own b (u mapped with the set-up b); {fitted}")
    works(f"1000 draws with 0 < u < b; {fitted}")


@probe("support", "latent with event shape (2, 3)", "'W'")
def _():
    def model():
        W = pyro.sample("W", dist.Normal(torch.zeros(2, 3), 1.0).to_event(2))
        pyro.sample("x", dist.Normal(W.sum(), 1.0), obs=torch.tensor(1.0))

    guide = AutoFlowGuide(model)
    quick(model, guide)
    draws = sample_sites(guide)
    if draws["W"].shape != (200, 2, 3) or guide()["W"].shape != (2, 3):
        silent(f"shape {tuple(draws['W'].shape)}")
    works("draws of shape (200, 2, 3), a call gives (2, 3)")


@probe("support", "latent of size 0 next to a scalar latent", "'z'")
def _():
    def model():
        z = pyro.sample("z", dist.Normal(torch.zeros(0), 1.0).to_event(1))
        a = pyro.sample("a", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(a + z.sum(), 1.0), obs=torch.tensor(1.0))

    guide = AutoFlowGuide(model)
    quick(model, guide)
    draws = sample_sites(guide)
    if draws["z"].shape != (200, 0) or draws["a"].shape != (200,):
        silent(f"shapes {({k: tuple(v.shape) for k, v in draws.items()})}")
    works("z of shape (200, 0) and a of shape (200,)")


@probe("support", "model with no latent sites", ("no latent", "'y'"))
def _():
    def model(y):
        with pyro.plate("data", len(y)):
            pyro.sample("y", dist.Normal(0.0, 1.0), obs=y)

    guide = AutoFlowGuide(model)
    quick(model, guide, Y)
    silent("a guide with nothing to fit was built and fitted")


@probe("support", "sequential plate (for i in pyro.plate(...))", ("'data'", "'z_0'"))
def _():
    def model(y):
        for i in pyro.plate("data", len(y)):
            z = pyro.sample(f"z_{i}", dist.Normal(0.0, 1.0))
            pyro.sample(f"y_{i}", dist.Normal(z, 1.0), obs=y[i])

    guide = AutoFlowGuide(model)
    quick(model, guide, Y[:3])
    draws = sample_sites(guide, Y[:3])
    if sorted(draws) != ["z_0", "z_1", "z_2"]:
        silent(f"sites {sorted(draws)}")
    works("guide over z_0, z_1, z_2")


# --------------------------------------------------------------------------- shapes and structure between calls


@probe("shapes", "latent shape follows an int argument: z (3,) at set-up, (5,) later", "'z'")
def _():
    guide = AutoFlowGuide(sized, hidden_features=(8,))
    guide(3)
    out = guide(5)
    silent(f"guide(5) returned z of shape {tuple(out['z'].shape)}, no error")


@probe("shapes", "latent site drawn only when a keyword is set", "'w'")
def _():
    guide = AutoFlowGuide(sized, hidden_features=(8,))
    guide(3)
    out = guide(3, extra=True)
    silent(f"guide(3, extra=True) returned {sorted(out)}; 'w' left to its prior, no error")


def branching():
    c = pyro.sample("c", dist.Normal(0.0, 1.0))
    if c > 0:
        pyro.sample("b", dist.Normal(0.0, 1.0))
    pyro.sample("x", dist.Normal(c, 1.0), obs=torch.tensor(0.3))


@probe("shapes", "stochastic control flow (site b drawn only when c > 0)", "'b'")
def _():
    guide = AutoFlowGuide(branching, hidden_features=(8,))
    quick(branching, guide, steps=5)
    silent("fitted a model whose set of sites depends on a draw, no error")


@probe("shapes", "data length changes between calls (global latents only)", "'y'")
def _():
    guide = AutoFlowGuide(regression)
    quick(regression, guide, X, Y)
    out = guide(X[:10], Y[:10])
    draws = sample_sites(guide, X[:7], Y[:7])
    if out["a"].shape != () or draws["a"].shape != (200,):
        silent("wrong shapes")
    works("guide(x[:10], y[:10]) and sample_posterior on 7 points give scalar a, s")


@probe("shapes", "local latents under a plate whose size changes between calls", "'z'")
def _():
    def model(y):
        with pyro.plate("data", len(y)):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("y", dist.Normal(z, 1.0), obs=y)

    guide = AutoFlowGuide(model)
    guide(Y)
    out = guide(Y[:10])
    silent(f"guide(y[:10]) returned z of shape {tuple(out['z'].shape)} for 10 data, no error")


@probe("shapes", "model returns a value")
def _():
    def model(x, y=None):
        a = pyro.sample("a", dist.Normal(0.0, 10.0))
        with pyro.plate("data", x.shape[0]):
            return pyro.sample("y", dist.Normal(a * x, 1.0), obs=y)

    guide = AutoFlowGuide(model)
    quick(model, guide, X, Y)
    if sample_sites(guide, X, Y)["a"].shape != (200,):
        silent("wrong shape")
    works("fitted; draws of a have shape (200,)")


@probe("shapes", "model raises its own error", "my model cannot")
def _():
    def model(x):
        pyro.sample("a", dist.Normal(0.0, 1.0))
        raise ValueError("my model cannot handle this input")

    try:
        quick(model, AutoFlowGuide(model), X)
    except ValueError as error:
        if "my model cannot handle this input" in str(error):
            works(f"the model's own error reached the caller unchanged: {type(error).__name__}: {error}")
        raise
    silent("no error")


@probe("shapes", "non-callable model (a tensor)", ("model",), ("callable",))
def _():
    guide = AutoFlowGuide(X)
    guide()
    silent("a guide over a tensor ran")


# --------------------------------------------------------------------------- flow options


def option_probe(case, names, build, what):
    @probe("flow options", case, *names)
    def _():
        expect_no_flow_change(build, what)


option_probe("bogus=1", ("bogus",), lambda: AutoFlowGuide(regression, bogus=1), "bogus=1")
option_probe("bins=8 given to flow='MAF'", ("bins",), lambda: AutoFlowGuide(regression, "MAF", bins=8), "bins=8")
option_probe("hidden_features=(0,)", ("hidden_features",), lambda: AutoFlowGuide(regression, hidden_features=(0,)),
             "hidden_features=(0,)")
option_probe("bins=-3", ("bins",), lambda: AutoFlowGuide(regression, bins=-3), "bins=-3")
option_probe("hidden_features='64'", ("hidden_features",), lambda: AutoFlowGuide(regression, hidden_features="64"),
             "hidden_features='64'")
option_probe("transforms=0", ("transforms",), lambda: AutoFlowGuide(regression, transforms=0), "transforms=0")
option_probe("transforms=-1", ("transforms",), lambda: AutoFlowGuide(regression, "MAF", transforms=-1), "transforms=-1")


@probe("flow options", "unknown flow name flow='Bogus'", "Bogus", ("flow_names", "MAF"))
def _():
    expect_no_flow_change(lambda: AutoFlowGuide(regression, "Bogus"), "flow='Bogus'")


@probe("flow options", "flow as a Zuko Flow instance (an nn.Module) of the right size", "features")
def _():
    flow = pfg.flows.get_flow("MAF").make(2, transforms=2, hidden_features=(16,))
    expect_no_flow_change(lambda: AutoFlowGuide(regression, flow), "a Zuko MAF instance")


@probe("flow options", "flow as a Zuko Flow instance of the wrong size (3 features, 2 latents)", "features=2")
def _():
    flow = pfg.flows.get_flow("MAF").make(3, transforms=2, hidden_features=(16,))
    guide = AutoFlowGuide(regression, flow)
    quick(regression, guide, X, Y)
    silent("a 3-feature flow was used for 2 latents")


@probe("flow options", "flow as a factory dim -> Pyro transform (T.planar)", "flow")
def _():
    guide = AutoFlowGuide(regression, lambda d: [T.planar(d), T.planar(d)])
    quick(regression, guide, X, Y)
    draws = sample_sites(guide, X, Y)
    bad = check_support(regression, draws, X, Y)
    if bad:
        silent(bad)
    works(f"two planar layers ({sum(p.numel() for p in guide.flow.parameters())} parameters); draws inside supports")


@probe("flow options", "noncentered=['nonexistent'] (no such site)", "nonexistent")
def _():
    guide = AutoFlowGuide(regression, noncentered=["nonexistent"])
    quick(regression, guide, X, Y)
    silent(f"accepted; noncentered_sites={guide.noncentered_sites!r}, no warning")


for _value in (0.0, -1.0, float("nan")):
    option_probe(f"init_scale={_value}", ("init_scale",), lambda v=_value: AutoFlowGuide(regression, init_scale=v),
                 f"init_scale={_value}")

option_probe("warm_start='yes'", ("warm_start",), lambda: AutoFlowGuide(regression, warm_start="yes"), "warm_start='yes'")


# --------------------------------------------------------------------------- data


def with_nans(t, n=3):
    t = t.clone()
    t[:n] = float("nan")
    return t


@probe("data", "NaN in the observed data", "'y'")
def _():
    quick(regression, AutoFlowGuide(regression), X, with_nans(Y))
    silent("fitted with NaN data")


@probe("data", "NaN in a covariate", ("'x'", "'y'"))
def _():
    quick(regression, AutoFlowGuide(regression), with_nans(X), Y)
    silent("fitted with a NaN covariate")


@probe("data", "NaN in a pyro.factor", "'penalty'")
def _():
    def model():
        pyro.sample("a", dist.Normal(0.0, 1.0))
        pyro.factor("penalty", torch.tensor(float("nan")))

    quick(model, AutoFlowGuide(model))
    silent("fitted with a NaN factor")


@probe("data", "data as numpy arrays", ("'y'", "numpy", "ndarray"), ("tensor", "torch.as_tensor"))
def _():
    guide = AutoFlowGuide(regression)
    quick(regression, guide, X.numpy(), Y.numpy())
    draws = sample_sites(guide, X.numpy(), Y.numpy())
    ref = AutoFlowGuide(regression)
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    quick(regression, ref, X, Y)
    a, b = float(draws["a"].mean()), float(sample_sites(ref, X, Y)["a"].mean())
    if abs(a - b) > 0.5:
        silent(f"posterior mean of a {a:.3f} with numpy data, {b:.3f} with tensors")
    works(f"posterior mean of a {a:.3f} (tensors: {b:.3f})")


@probe("data", "data as Python lists", ("'x'", "'y'", "list"), ("tensor", "torch.as_tensor"))
def _():
    guide = AutoFlowGuide(regression)
    quick(regression, guide, X.tolist(), Y.tolist())
    works("fitted with lists")


@probe("data", "observed value outside the likelihood's support (negative data, Gamma)", "'y'")
def _():
    def model(y):
        r = pyro.sample("r", dist.LogNormal(0.0, 1.0))
        with pyro.plate("data", len(y)):
            pyro.sample("y", dist.Gamma(2.0, r), obs=y)

    quick(model, AutoFlowGuide(model), torch.tensor([1.0, -0.5, 2.0]))
    silent("fitted with negative Gamma data")


@probe("data", "observed data of the wrong length for its plate (19 vs 20)", "'y'")
def _():
    quick(regression, AutoFlowGuide(regression), X, Y[:19])
    silent("fitted with mismatched lengths")


# --------------------------------------------------------------------------- initial values


def init_probe(case, model, values, site, args=()):
    @probe("init", case, f"'{site}'")
    def _():
        guide = AutoFlowGuide(model, init_loc_fn=init_to_value(values=values))
        quick(model, guide, *args)
        silent("accepted")


def simplex_model():
    pyro.sample("p", dist.Dirichlet(torch.ones(3)))
    pyro.sample("u", dist.Uniform(0.0, 1.0))
    pyro.sample("x", dist.Normal(0.0, 1.0), obs=torch.tensor(0.0))


init_probe("init_to_value s=-1 for a HalfNormal", regression, {"s": torch.tensor(-1.0)}, "s", (X, Y))
init_probe("init_to_value s=0 for a HalfNormal (boundary)", regression, {"s": torch.tensor(0.0)}, "s", (X, Y))
init_probe("init_to_value u=2 for a Uniform(0, 1)", simplex_model, {"u": torch.tensor(2.0)}, "u")
init_probe("init_to_value p=[0.5, 0.6, 0.1] (not a simplex) for a Dirichlet", simplex_model,
           {"p": torch.tensor([0.5, 0.6, 0.1])}, "p")
init_probe("init_to_value a=NaN", regression, {"a": torch.tensor(float("nan"))}, "a", (X, Y))
init_probe("init_to_value a of the wrong shape (3,)", regression, {"a": torch.zeros(3)}, "a", (X, Y))


@probe("init", "init_to_value with a misspelt site name ('sigma' for 's')", "'sigma'")
def _():
    guide = AutoFlowGuide(regression, init_loc_fn=init_to_value(values={"sigma": torch.tensor(1.0)}))
    quick(regression, guide, X, Y)
    w = warned("sigma")
    if w:
        works(f"warned: {w}")
    silent("the value for 'sigma' (no such site) was ignored without a warning; 's' started elsewhere")


# --------------------------------------------------------------------------- sizes


def wide(n):
    def model():
        z = pyro.sample("z", dist.Normal(torch.zeros(n), 1.0).to_event(1))
        pyro.sample("obs", dist.Normal(z.sum(), 1.0), obs=torch.tensor(0.0))

    model.__name__ = f"wide{n}"
    return model


def size_probe(n, options):
    shown = ", ".join(f"{k}={v}" for k, v in options.items()) or "default flow"

    @probe("size", f"{n:,} latent coordinates, {shown}", "SplineMAF", ("flow=", "structure="))
    def _():
        model = wide(n)
        guide = AutoFlowGuide(model, **options)
        start = time.perf_counter()
        quick(model, guide, steps=3)
        draws = sample_sites(guide, n=4)
        size = sum(p.numel() for p in guide.parameters())
        if draws["z"].shape != (4, n) or not torch.isfinite(draws["z"]).all():
            silent(f"draws of shape {tuple(draws['z'].shape)}")
        kind = "structured posterior" if guide.structured is not None else "full flow"
        works(f"{kind}, {size:,} parameters, set-up and 3 steps in {time.perf_counter() - start:.1f} s; draws (4, {n})")


size_probe(1_000, {})
size_probe(1_000, {"hidden_features": (64, 64)})
size_probe(10_000, {})
size_probe(10_000, {"hidden_features": (64, 64)})


# --------------------------------------------------------------------------- the param store and saving


@probe("param store", "Pyro idiom: guide(...); pyro.get_param_store().load(path)")
def _():
    guide = AutoFlowGuide(regression)
    quick(regression, guide, X, Y, steps=20)
    before = sample_sites(guide, X, Y, n=16)
    path = os.path.join(tmpdir(), "store.pt")
    pyro.get_param_store().save(path)
    pyro.clear_param_store()
    pyro.set_rng_seed(123)
    fresh = AutoFlowGuide(regression)
    fresh(X, Y)
    pyro.get_param_store().load(path)
    after = sample_sites(fresh, X, Y, n=16)
    if not same_samples(before, after):
        silent("the loaded values were ignored: draws differ from the saved guide's")
    result = quick(regression, fresh, X, Y, steps=3, resume=False)
    works(f"identical draws after load; a following fit: {result.stop_reason}")


def b_disturbs_a(model_a, model_b) -> bool:
    """Fits a guide of model A, then one of model B without clearing the store: did A's draws change?"""
    guide_a = AutoFlowGuide(model_a)
    quick(model_a, guide_a, X, Y, steps=20)
    before = sample_sites(guide_a, X, Y, n=16)
    quick(model_b, AutoFlowGuide(model_b), X, Y + 5.0, steps=20)
    return not same_samples(before, sample_sites(guide_a, X, Y, n=16))


@probe("param store", "two AutoFlowGuides in one session on different models of the same latent size, no clear",
       "model", ("clear_param_store", "rename"))
def _():
    # The same sites and sizes; first under two model names, then both named 'model' (notebook cells).
    other_name = b_disturbs_a(regression, model_a_prior2)
    pyro.clear_param_store()
    same_name = b_disturbs_a(model_a_prior1, model_a_prior2)
    if other_name or same_name:
        silent(f"fitting guide B changed guide A's draws (shared parameter): with two model names "
               f"{'yes' if other_name else 'no'}, with both models named 'model' {'yes' if same_name else 'no'}; "
               "no error or warning")
    works("guide A's draws unchanged by fitting guide B (different names, and both named 'model')")


@probe("param store", "torch.save of a guide with non-centred sites, torch.load, sample_posterior")
def _():
    guide = AutoFlowGuide(eight_schools_centered)
    quick(eight_schools_centered, guide, steps=10)
    if not guide.noncentered_sites:
        silent("no non-centred sites chosen (probe premise)")
    before = sample_sites(guide, n=16)
    buffer = io.BytesIO()
    torch.save(guide, buffer)
    pyro.clear_param_store()
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    after = sample_sites(loaded, n=16)
    if not same_samples(before, after):
        silent("draws of the loaded guide differ")
    works(f"non-centred {list(guide.noncentered_sites)}: identical draws after load")


@probe("param store", "load_state_dict from a guide of another model (other size)", ("packed", "size"),
       ("model", "guide"))
def _():
    guide_a = AutoFlowGuide(regression)
    guide_a(X, Y)
    state = guide_a.state_dict()
    pyro.clear_param_store()
    guide_b = AutoFlowGuide(sized)
    guide_b(3)
    guide_b.load_state_dict(state)
    silent("loaded")


# --------------------------------------------------------------------------- checkpoints


def checkpointed(model, guide, *args, steps=5, **kwargs):
    folder = tmpdir()
    path = os.path.join(folder, "fit.ckpt")
    quick(model, guide, *args, steps=steps, checkpoint=path, **kwargs)
    pyro.clear_param_store()
    return path


def rewrite(path, edit):
    """Loads a checkpoint, edits it and stores it with a valid checksum (a tool that rewrites checkpoints)."""
    payload = torch.load(path, weights_only=True)
    edit(payload)
    payload["checksum"] = checksum(payload)
    atomic_save(payload, path)


@probe("checkpoint", "fit(resume=True) from another model's checkpoint, same latent name and size", "resume=False")
def _():
    path = checkpointed(model_scale_z, AutoFlowGuide(model_scale_z), Y)
    result = quick(model_normal_z, AutoFlowGuide(model_normal_z), Y, steps=10, checkpoint=path, resume=True)
    silent(f"resumed: {result.stop_reason} at step {result.steps}")


@probe("checkpoint", "a non-centred guide's checkpoint resumed into a centred guide", ("noncentered", "centred"))
def _():
    path = checkpointed(eight_schools_centered, AutoFlowGuide(eight_schools_centered))
    guide = AutoFlowGuide(eight_schools_centered, noncentered=False)
    result = quick(eight_schools_centered, guide, steps=10, checkpoint=path, resume=True)
    silent(f"resumed: {result.stop_reason} at step {result.steps}")


@probe("checkpoint", "40 random single-byte corruptions, each loaded", "checkpoint")
def _():
    path = checkpointed(regression, AutoFlowGuide(regression), X, Y)
    good = open(path, "rb").read()
    original = load_checkpoint(path)
    rng = np.random.default_rng(0)
    refused, same, changed, other = 0, 0, 0, []
    for _ in range(40):
        data = bytearray(good)
        i = int(rng.integers(len(data)))
        data[i] = (data[i] + int(rng.integers(1, 256))) % 256
        open(path, "wb").write(bytes(data))
        try:
            payload = load_checkpoint(path)
        except pfg.CheckpointMismatchError:
            refused += 1
            continue
        except Exception as error:  # noqa: BLE001
            other.append(type(error).__name__)
            continue
        if payload.get("checksum") == original["checksum"] == checksum(payload):
            same += 1
        else:
            changed += 1
    summary = f"{refused} refused by name, {same} loaded identical contents, {changed} loaded changed contents"
    if other:
        raise RuntimeError(f"{summary}; {len(other)} other errors: {sorted(set(other))}")
    if changed:
        silent(summary)
    open(path, "wb").write(good[: len(good) // 2])
    try:
        quick(regression, AutoFlowGuide(regression), X, Y, steps=10, checkpoint=path, resume=True)
    except pfg.CheckpointMismatchError as error:
        raise Outcome("named", f"{summary}; a truncated file: {type(error).__name__}: {error}")
    silent(f"{summary}; a truncated file resumed")


@probe("checkpoint", "a checkpoint with NaN parameters (saved by a diverged run)", ("NaN", "non-finite"))
def _():
    class Poison(Callback):
        def on_end(self, state):
            with torch.no_grad():
                for _, p in pyro.get_param_store().named_parameters():
                    p.fill_(float("nan"))  # Poison runs before the final checkpoint save

    path = checkpointed(regression, AutoFlowGuide(regression), X, Y, callbacks=[Poison()])
    payload = torch.load(path, weights_only=True)
    if not any(torch.isnan(v).any() for v in payload["params"].values() if torch.is_tensor(v)):
        rewrite(path, lambda p: [v.fill_(float("nan")) for v in p["params"].values()])
    result = quick(regression, AutoFlowGuide(regression), X, Y, steps=10, checkpoint=path, resume=True)
    silent(f"resumed: {result.stop_reason} at step {result.steps}")


@probe("checkpoint", "a checkpoint missing a key ('optim')", "'optim'")
def _():
    path = checkpointed(regression, AutoFlowGuide(regression), X, Y)
    rewrite(path, lambda p: p.pop("optim"))
    result = quick(regression, AutoFlowGuide(regression), X, Y, steps=10, checkpoint=path, resume=True)
    silent(f"resumed: {result.stop_reason} at step {result.steps}")


@probe("checkpoint", "stale .ckpt-*.tmp files next to the checkpoint")
def _():
    folder = tmpdir()
    path = os.path.join(folder, "fit.ckpt")
    stale = os.path.join(folder, ".fit.ckpt.ckpt-abc123.tmp")
    open(stale, "wb").write(b"half a checkpoint")
    quick(regression, AutoFlowGuide(regression), X, Y, steps=5, checkpoint=path, checkpoint_every=1)
    left = sorted(os.listdir(folder))
    if left != ["fit.ckpt"]:
        silent(f"files left: {left}")
    works("after a checkpointed fit only fit.ckpt is left")


@probe("checkpoint", "resume with a larger steps (50 -> 150): final learning rate", "steps")
def _():
    class LastLr(Callback):
        def on_end(self, state):
            self.lrs = {g["lr"] for o in state.optim.optim_objs.values() for g in o.param_groups}

    guide = AutoFlowGuide(regression)
    path = checkpointed(regression, guide, X, Y, steps=50)
    seen = LastLr()
    guide = AutoFlowGuide(regression)
    result = quick(regression, guide, X, Y, steps=150, checkpoint=path, resume=True, callbacks=[seen])
    final = training_defaults(guide).final_lr
    lr = max(seen.lrs)
    if result.steps != 150 or not math.isclose(lr, final, rel_tol=1e-3):
        silent(f"{result.steps} steps, final lr {lr:.3g} (default {final:.3g})")
    w = warned("steps=50")
    works(f"150 steps, final lr {lr:.3g} = the default's {final:.3g}; {'warned' if w else 'no warning'}")


@probe("checkpoint", "resume with a smaller steps than the checkpoint's step (50 -> 20)", "steps")
def _():
    path = checkpointed(regression, AutoFlowGuide(regression), X, Y, steps=50)
    saved = load_checkpoint(path)["params"]
    result = quick(regression, AutoFlowGuide(regression), X, Y, steps=20, checkpoint=path, resume=True)
    store = {k: v.detach() for k, v in pyro.get_param_store().named_parameters()}
    restored = all(torch.equal(store[k], v) for k, v in saved.items() if k in store)
    w = warned("steps=20|step 50")
    if result.steps != 50 or not restored:
        silent(f"returned steps={result.steps}, checkpoint's parameters restored: {restored}")
    works(f"no step run (steps counts the steps done, 50 >= 20); checkpoint's parameters restored; "
          f"{result.stop_reason}; {'warned: ' + w if w else 'no warning'}")


# --------------------------------------------------------------------------- training options


@probe("training", "EarlyStopping instance reused for a second fit (AutoNormal)")
def _():
    def run(stopper, seed):
        pyro.clear_param_store()
        guide = AutoNormal(regression)
        result = pfg.fit(regression, guide, X, Y, steps=1000, progress=False, seed=seed, callbacks=[stopper])
        return result, {k: v.detach().clone() for k, v in pyro.get_param_store().items()}

    reused = EarlyStopping(patience=20, min_delta=0.5)
    first, _ = run(reused, 0)
    second, params = run(reused, 1)
    fresh, params_fresh = run(EarlyStopping(patience=20, min_delta=0.5), 1)
    same = second.steps == fresh.steps and all(torch.equal(params[k], params_fresh[k]) for k in params)
    if not same:
        silent(f"reused: stopped at {second.steps}; fresh: {fresh.steps} (first fit stopped at {first.steps})")
    works(f"reused and fresh instance give the same second fit (stopped at {second.steps}; first fit {first.steps})")


ARMED = {"on": False}


def outlier_model(x, y=None):
    regression(x, y)
    if ARMED["on"]:
        ARMED["on"] = False
        pyro.factor("outlier", torch.tensor(-1e30))


@probe("training", "one finite outlier loss of 1e30 at step 100, EarlyStopping(patience=50) (AutoNormal)")
def _():
    class Arm(Callback):
        def on_step(self, state):
            if state.step == 99:
                ARMED["on"] = True

    def run(extra):
        pyro.clear_param_store()
        guide = AutoNormal(outlier_model)
        stopper = EarlyStopping(patience=50)
        result = pfg.fit(outlier_model, guide, X, Y, steps=600, progress=False, seed=0, callbacks=[stopper] + extra)
        return result, stopper

    clean, s_clean = run([])
    hit, s_hit = run([Arm()])
    if not any(l > 1e29 for l in hit.losses):
        raise RuntimeError("the outlier was not injected")
    if hit.steps < clean.steps - 50 or s_hit.best_step < min(s_clean.best_step, 100):
        silent(f"with the outlier: stopped at {hit.steps}, best step {s_hit.best_step}; "
               f"without: {clean.steps}, best step {s_clean.best_step}")
    works(f"with the outlier: {hit.steps} steps ({hit.stop_reason[:40]}); without: {clean.steps}")


@probe("training", "steps=0")
def _():
    guide = AutoFlowGuide(regression)
    result = quick(regression, guide, X, Y, steps=0)
    if result.steps != 0 or guide(X, Y)["a"].shape != ():
        silent(f"steps={result.steps}")
    works(f"0 steps, {result.stop_reason}; the guide is set up")


@probe("training", "steps=-1", "steps")
def _():
    quick(regression, AutoFlowGuide(regression), X, Y, steps=-1)
    silent("accepted")


@probe("training", "steps=2.5 (not an int)", "steps")
def _():
    result = quick(regression, AutoFlowGuide(regression), X, Y, steps=2.5)
    silent(f"ran {result.steps} steps for steps=2.5, no warning")


@probe("training", "lr=0 (optim=ClippedAdam({'lr': 0.0}))", "lr")
def _():
    guide = AutoFlowGuide(regression)
    guide(X, Y)
    start = guide.packed.detach().clone()
    result = quick(regression, guide, X, Y, steps=10, optim=pyro.optim.ClippedAdam({"lr": 0.0}))
    moved = float((guide.packed.detach() - start).abs().max())
    w = warned(r"\blr\b|learning rate")
    if w:
        works(f"warned: {w}")
    silent(f"fit {result.stop_reason!r} with lr=0: parameters moved {moved:g}, no warning")


@probe("training", "lr=-0.01 (optim=ClippedAdam({'lr': -0.01}))", "lr", ("optim", "positive"))
def _():
    result = quick(regression, AutoFlowGuide(regression), X, Y, steps=10, optim=pyro.optim.ClippedAdam({"lr": -0.01}))
    silent(f"ran with a negative lr: {result.stop_reason}")


@probe("training", "num_particles=0", "num_particles")
def _():
    result = quick(regression, AutoFlowGuide(regression), X, Y, num_particles=0)
    silent(f"ran with num_particles=0: {result.num_particles} particles, losses {result.losses[:2]}")


@probe("training", "fit with a guide built for another model", ("'a'", "'b'", "model"), ("guide",))
def _():
    guide = AutoFlowGuide(regression)
    guide(X, Y)
    result = quick(other_regression, guide, X, Y)
    w = warned("not guide|not model")
    silent(f"fit {result.stop_reason!r}: the guide drew a, s; the model drew b, t from their priors; "
           f"{'only notice: Pyro' + chr(39) + 's ' + w if w else 'no warning'}")


BROKEN = {"on": False}


def breaking_model(x, y=None):
    regression(x, y)
    if BROKEN["on"]:
        pyro.factor("bad", torch.tensor(float("nan")))


@probe("training", "log-density turns NaN from step 3 on", "'bad'")
def _():
    class Break(Callback):
        def on_step(self, state):
            if state.step == 3:
                BROKEN["on"] = True

    quick(breaking_model, AutoFlowGuide(breaking_model), X, Y, steps=60, callbacks=[Break()])
    silent("completed with a NaN log-density")


# --------------------------------------------------------------------------- summaries and diagnostics


def fitted():
    guide = AutoFlowGuide(regression)
    quick(regression, guide, X, Y, steps=10)
    return guide


@probe("summaries", "sample_posterior(0)", "num_samples")
def _():
    draws = fitted().sample_posterior(0, X, Y)
    silent(f"returned shape {tuple(draws['a'].shape)}")


@probe("summaries", "sample_posterior(-1)", "num_samples")
def _():
    draws = fitted().sample_posterior(-1, X, Y)
    silent(f"returned shape {tuple(draws['a'].shape)}")


@probe("summaries", "quantiles([1.5]) (outside [0, 1])", "quantile")
def _():
    q = fitted().quantiles([1.5], X, Y)
    silent(f"returned a={q['a'].tolist()}, s={q['s'].tolist()}")


@probe("summaries", "to_inference_data without the observed y", "'y'")
def _():
    guide = fitted()
    idata = pfg.to_inference_data(regression, guide, X, num_samples=20)
    groups = list(getattr(idata, "groups", lambda: list(idata.children))())
    w = warned("observes no site")
    if w:
        works(f"warned: {w}")
    silent(f"returned groups {groups} for a model call with y=None (no observed data, no log-likelihood)")


@probe("summaries", "to_inference_data with data of another length than x", "'y'")
def _():
    pfg.to_inference_data(regression, fitted(), X, Y[:10], num_samples=20)
    silent("accepted")


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="run the probes whose group or case contains this text")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per probe (default 60)")
    parser.add_argument("--memory", type=float, default=12.0, help="address-space cap per probe, GiB (default 12)")
    parser.add_argument("--list", action="store_true", help="list the probes and exit")
    args = parser.parse_args()
    chosen = [p for p in PROBES if args.only.lower() in f"{p.group} {p.case}".lower()]
    if args.list:
        for i, p in enumerate(chosen, 1):
            print(f"{i:3d} {p.group:12s} {p.case}")
        return
    start = time.perf_counter()
    counts = {k: 0 for k in ("works", "named", "generic", "silent", "hang")}
    print("| # | group | case | outcome | message (first ~160 chars, one line) |")
    print("|---|---|---|---|---|")
    for i, p in enumerate(chosen, 1):
        outcome, message, seconds = run_in_child(p, args.timeout, args.memory)
        counts[outcome] += 1
        print(f"| {i} | {p.group} | {one_line(p.case, 200)} | {outcome} | {one_line(message)} |", flush=True)
        print(f"[{i}/{len(chosen)}] {outcome:7s} {seconds:5.1f} s  {p.group} / {p.case}", file=sys.stderr, flush=True)
    print()
    print(f"{len(chosen)} probes in {time.perf_counter() - start:.0f} s: "
          + ", ".join(f"{k} {v}" for k, v in counts.items()))


if __name__ == "__main__":
    main()
