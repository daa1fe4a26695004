"""Checkpoints of ``fit``: what a resume refuses (and why, by name), stale temporaries, a changed ``steps``."""

from __future__ import annotations

import math
import os
import random

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer.autoguide import AutoNormal

from pyro_flowguide.train import (
    Callback,
    CheckpointCorruptedError,
    CheckpointIncompleteError,
    CheckpointMismatchError,
    CheckpointModelMismatchError,
    CheckpointNonFiniteError,
    DEFAULT_FINAL_LR,
    fit,
    load_checkpoint,
)
from pyro_flowguide.train.checkpoints import atomic_save, checksum

torch.set_num_threads(1)

DATA = torch.tensor([0.3, -1.2, 0.8, 2.1, 0.4, -0.5, 1.7, 0.9])


def normal_model(y):
    z = pyro.sample("z", dist.Normal(0.0, 3.0))
    with pyro.plate("data", len(y)):
        pyro.sample("y", dist.Normal(z, 1.0), obs=y)


def scale_model(y):
    # Same latent name and size as normal_model: only the support and the role differ.
    z = pyro.sample("z", dist.LogNormal(0.0, 1.0))
    with pyro.plate("data", len(y)):
        pyro.sample("y", dist.Normal(0.0, z), obs=y)


def _write(path, model=normal_model, steps=5, **kwargs):
    pyro.clear_param_store()
    fit(model, AutoNormal(model), DATA, steps=steps, progress=False, seed=0, checkpoint=path, **kwargs)
    pyro.clear_param_store()


def _resume(path, model=normal_model, steps=10, **kwargs):
    pyro.clear_param_store()
    return fit(model, AutoNormal(model), DATA, steps=steps, progress=False, checkpoint=path, resume=True, **kwargs)


def _rewrite(path, edit):
    """Loads a checkpoint, edits it, stores it again with a valid checksum."""
    payload = torch.load(path, weights_only=True)
    edit(payload)
    payload["checksum"] = checksum(payload)
    atomic_save(payload, str(path))


def test_checkpoint_of_another_model_with_the_same_latent_size_is_refused(tmp_path):
    path = tmp_path / "ckpt.pt"
    _write(path, scale_model)
    with pytest.raises(CheckpointModelMismatchError, match="latent sites of the model differ") as info:
        _resume(path, normal_model)
    assert "support" in str(info.value) and "resume=False" in str(info.value)


def test_checkpoint_of_a_differently_configured_guide_is_refused(tmp_path):
    path = tmp_path / "ckpt.pt"
    _write(path)
    # Same parameters and model, but the checkpoint says it came from another guide configuration.
    _rewrite(path, lambda p: p["signature"]["guide"].append("noncentered_sites: ['z']"))
    with pytest.raises(CheckpointModelMismatchError, match="guide's options differ.*noncentered_sites"):
        _resume(path)


def test_corrupted_checkpoint_is_refused_by_its_checksum(tmp_path):
    path = tmp_path / "ckpt.pt"
    _write(path)
    payload = torch.load(path, weights_only=True)
    payload["params"]["AutoNormal.locs.z"] += 1.0  # changed without updating the checksum
    atomic_save(payload, str(path))
    with pytest.raises(CheckpointCorruptedError, match="checksum"):
        _resume(path)
    path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointCorruptedError, match="cannot be read"):
        _resume(path)


def test_no_single_byte_corruption_resumes_with_changed_contents(tmp_path):
    path = tmp_path / "ckpt.pt"
    _write(path)
    good = path.read_bytes()
    original = load_checkpoint(path)
    rng = random.Random(0)
    refused = 0
    for _ in range(40):
        data = bytearray(good)
        i = rng.randrange(len(data))
        data[i] = (data[i] + rng.randrange(1, 256)) % 256
        path.write_bytes(bytes(data))
        try:
            payload = load_checkpoint(path)
        except CheckpointMismatchError:
            refused += 1
            continue
        # Loaded: then it must hold exactly what was saved (the byte was padding).
        assert payload["checksum"] == original["checksum"] == checksum(payload)
    assert refused >= 30


def test_checkpoint_missing_an_entry_is_refused_naming_it(tmp_path):
    path = tmp_path / "ckpt.pt"
    _write(path)
    _rewrite(path, lambda p: p.pop("optim"))
    with pytest.raises(CheckpointIncompleteError, match="'optim'"):
        _resume(path)


def test_checkpoint_with_non_finite_parameters_is_refused(tmp_path):
    path = tmp_path / "ckpt.pt"
    _write(path)
    _rewrite(path, lambda p: p["params"]["AutoNormal.locs.z"].fill_(math.nan))
    with pytest.raises(CheckpointNonFiniteError, match="AutoNormal.locs.z"):
        _resume(path)


class _Fail(Callback):
    def on_step(self, state):
        if state.step == 3:
            raise RuntimeError("killed")


def test_stale_temporaries_are_removed_and_never_left(tmp_path):
    path = tmp_path / "ckpt.pt"
    _write(path, checkpoint_every=1)
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt"]  # a normal run leaves only the checkpoint
    stale = tmp_path / ".ckpt.pt.ckpt-abc123.tmp"  # what a save killed mid-write leaves
    stale.write_bytes(b"half")
    load_checkpoint(path)
    assert not stale.exists()
    stale.write_bytes(b"half")
    with pytest.raises(RuntimeError, match="killed"):
        _write(path, steps=10, checkpoint_every=1, callbacks=[_Fail()])
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt"]


class _LastLr(Callback):
    def on_end(self, state):
        self.lrs = {g["lr"] for o in state.optim.optim_objs.values() for g in o.param_groups}


def test_resuming_with_more_steps_decays_to_the_final_lr_over_the_new_steps(tmp_path):
    path = tmp_path / "ckpt.pt"
    _write(path, steps=100)
    seen = _LastLr()
    with pytest.warns(UserWarning, match="steps=100, resumed with steps=300"):
        result = _resume(path, steps=300, callbacks=[seen])
    assert result.steps == 300
    assert len(seen.lrs) == 1 and math.isclose(seen.lrs.pop(), DEFAULT_FINAL_LR, rel_tol=1e-4)


def test_checkpoint_of_a_non_centred_guide_names_the_option(tmp_path):
    from pyro_flowguide import AutoFlowGuide
    from pyro_flowguide.examples import eight_schools_centered

    path = tmp_path / "ckpt.pt"
    pyro.clear_param_store()
    fit(eight_schools_centered, AutoFlowGuide(eight_schools_centered, noncentered=["theta"]), steps=3,
        progress=False, seed=0, checkpoint=path, warm_start=False)
    pyro.clear_param_store()
    with pytest.raises(CheckpointModelMismatchError, match="guide's options differ.*noncentered"):
        fit(eight_schools_centered, AutoFlowGuide(eight_schools_centered, noncentered=False), steps=5,
            progress=False, checkpoint=path, resume=True)


def test_resuming_with_fewer_steps_than_done_says_that_none_run(tmp_path):
    path = tmp_path / "ckpt.pt"
    _write(path, steps=8)
    with pytest.warns(UserWarning, match="holds 8 steps already, at least steps=5, so no step runs"):
        result = _resume(path, steps=5)
    assert result.steps == 8
