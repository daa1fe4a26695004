"""The package as a whole: import side effects, public names, and the set-up commands."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

import pyro_flowguide

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str) -> str:
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


_IMPORT_CHECK = """
import pyro, torch
import pyro.distributions as dist, torch.distributions as tdist
from pyro.distributions.torch_transform import TransformModule
from pyro.distributions.conditional import ConditionalTransformModule
tdist.Distribution.set_default_validate_args({setting})
classes = [tdist.Transform, tdist.TransformedDistribution, dist.TransformedDistribution,
           TransformModule, ConditionalTransformModule, tdist.Distribution]
before = [dict(vars(c)) for c in classes]
import pyro_flowguide
changed = [c.__name__ + '.' + k for c, b in zip(classes, before)
           for k in set(b) | set(vars(c)) if b.get(k, None) is not vars(c).get(k, None)]
print(tdist.Distribution._validate_args)
print(sorted(changed))
"""


@pytest.mark.slow  # a fresh interpreter imports torch, pyro and zuko
@pytest.mark.parametrize("setting", [True, False])
def test_import_changes_no_global_state(setting):
    validation, changed = _run(_IMPORT_CHECK.format(setting=setting)).splitlines()
    # Importing Zuko on its own switches validation off for the whole process;
    # the package must hand the user's setting back untouched.
    assert validation == str(setting)
    # Importing Zuko also adds a `call_and_ladj` method to torch's Transform,
    # which Zuko's own transforms need; it also blanks
    # `Distribution.arg_constraints`, which the package restores. Anything else
    # changed would be this package's doing.
    changed = eval(changed)  # noqa: S307 - a list literal printed by our own subprocess
    assert set(changed) <= {"Transform.call_and_ladj"}, changed


def test_version_and_public_names():
    assert re.fullmatch(r"\d+\.\d+\.\d+(\w+\d*)?", pyro_flowguide.__version__)
    assert isinstance(pyro_flowguide.__all__, list) and pyro_flowguide.__all__
    assert len(set(pyro_flowguide.__all__)) == len(pyro_flowguide.__all__)
    for name in pyro_flowguide.__all__:
        assert getattr(pyro_flowguide, name, None) is not None, f"__all__ names missing {name!r}"


@pytest.mark.parametrize("module", ["flows", "transforms", "guides", "diagnostics", "train"])
def test_submodules_declare_their_public_names(module):
    mod = getattr(pyro_flowguide, module)
    assert mod.__all__
    for name in mod.__all__:
        assert hasattr(mod, name), f"pyro_flowguide.{module}.__all__ names missing {name!r}"


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    commands = []
    for block in blocks:
        for line in block.splitlines():
            line = line.strip()
            if line.startswith("pip install"):
                commands.append(line)
    return commands


def test_readme_has_exactly_the_two_setup_commands():
    commands = _readme_commands()
    assert commands == [
        "pip install -c constraints.txt -e . && python -m pyro_flowguide.demo",
        'pip install -c constraints.txt -e ".[test]" && pytest',
    ]


def test_ci_runs_the_readme_test_command_verbatim():
    test_command = _readme_commands()[-1]
    ci = (ROOT / ".ci" / "run").read_text()
    assert f"README_TEST_COMMAND='{test_command}'" in ci
    assert 'eval "$README_TEST_COMMAND"' in ci
    # Nothing weaker: no marker or path filter is slipped in after the command.
    assert not re.search(r"pytest\s+(-m|-k|tests/)", ci)


def test_the_default_run_selects_the_slow_tests():
    import tomllib

    options = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    # `pytest` alone (README, CI) must run everything: no marker, keyword or path filter by default.
    assert not re.search(r"(^|\s)(-m|-k|--deselect|--ignore)(\s|=|$)", options.get("addopts", "")), options
    assert [m for m in options["markers"] if m.startswith("slow:")], options["markers"]
    conftest = (ROOT / "tests" / "conftest.py").read_text()
    assert "pytest_collection_modifyitems" not in conftest and "deselect" not in conftest


@pytest.mark.slow  # two fits and 100,000 exact draws
def test_posterior_demo_scores_both_guides_against_exact_draws():
    from pyro_flowguide.demo import posterior_demo

    result = posterior_demo(steps=30, verbose=False)
    assert set(result) == {"AutoNormal", "AutoFlowGuide"}
    for r in result.values():
        assert set(r) == {"w1", "khat", "ess_fraction", "verdict", "seconds"}
        assert 0 < r["ess_fraction"] <= 1 and r["verdict"] in ("good", "usable", "do not trust")
        assert 0 < r["w1"] < 5 and r["khat"] == r["khat"]


def test_demo_runs_and_reports_against_the_exact_density():
    from pyro_flowguide.demo import main

    result = main(steps=5, verbose=False)
    assert set(result) == {"test_nll", "true_nll", "gap", "seconds"}
    # The exact expectation of -log p is 1/2 log(2 pi e) + (2 log 2 - 1) / 2 = 1.612.
    assert abs(result["true_nll"] - 1.612) < 0.02
    assert result["gap"] == result["test_nll"] - result["true_nll"]
    assert result["gap"] > -0.05  # a flow cannot beat the true density by more than noise
