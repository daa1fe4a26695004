"""Checkpoints of :func:`~pyro_flowguide.fit`: atomic writes, RNG states, restoring a run bit for bit."""

from __future__ import annotations

import os
import tempfile
from typing import TYPE_CHECKING, Sequence

import numpy as np
import pyro
import pyro.util
import torch
from pyro.optim.optim import _load_state_dict
from torch import Tensor

if TYPE_CHECKING:  # pragma: no cover
    from .callbacks import Callback
    from .loop import FitState

__all__ = [
    "CHECKPOINT_FORMAT",
    "CheckpointMismatchError",
    "atomic_save",
    "checkpoint_payload",
    "load_checkpoint",
    "restore",
    "rng_state",
    "set_rng_state",
    "store_params",
]

#: The ``format`` entry of every checkpoint :func:`~pyro_flowguide.fit` writes.
CHECKPOINT_FORMAT = "pyro_flowguide.fit/1"


class CheckpointMismatchError(ValueError):
    """Raised when a checkpoint's parameters do not match the model and guide being fitted."""


def store_params() -> dict[str, Tensor]:
    """Unconstrained parameters of the param store, by name (the tensors themselves)."""
    return dict(pyro.get_param_store().named_parameters())


def _copy_into_params(values: dict[str, Tensor]) -> None:
    params = store_params()
    with torch.no_grad():
        for name, value in values.items():
            params[name].copy_(value)


def atomic_save(payload: dict, path: str) -> None:
    """``torch.save(payload)`` to a temporary file in ``path``'s folder, then ``os.replace`` onto ``path``."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".ckpt-", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _callback_keys(callbacks: Sequence[Callback]) -> list[str]:
    seen: dict[str, int] = {}
    keys = []
    for cb in callbacks:
        name = type(cb).__name__
        seen[name] = seen.get(name, 0) + 1
        keys.append(f"{name}:{seen[name]}")
    return keys


def rng_state() -> dict:
    """Torch, numpy, python (and CUDA) RNG states as tensors, numbers and lists (``weights_only``-loadable)."""
    state = pyro.util.get_rng_state()
    version, internal, gauss = state["random"]
    np_name, np_keys, np_pos, np_has_gauss, np_cached = state["numpy"]
    out = {
        "torch": state["torch"],
        "python": {"version": version, "state": list(internal), "gauss": [] if gauss is None else [gauss]},
        "numpy": {
            "name": np_name,
            "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_cached),
        },
    }
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(state: dict) -> None:
    """Restores the RNG states that :func:`rng_state` encoded."""
    py = state["python"]
    npy = state["numpy"]
    pyro.util.set_rng_state(
        {
            "torch": state["torch"],
            "random": (py["version"], tuple(py["state"]), py["gauss"][0] if py["gauss"] else None),
            "numpy": (
                npy["name"],
                npy["keys"].numpy().astype(np.uint32),
                npy["pos"],
                npy["has_gauss"],
                npy["cached_gaussian"],
            ),
        }
    )
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_payload(state: FitState, callbacks: Sequence[Callback]) -> dict:
    """What a checkpoint holds: progress, parameters, optimiser and RNG states, the callbacks' states."""
    return {
        "format": CHECKPOINT_FORMAT,
        "step": state.step,
        "steps": state.steps,
        "smoothed_loss": state.smoothed_loss,
        "num_skipped": state.num_skipped,
        "losses": torch.tensor(state.losses, dtype=torch.float64),
        "params": {n: p.detach().clone() for n, p in store_params().items()},
        "optim": state.optim.get_state(),
        "rng": rng_state(),
        "callbacks": {k: cb.state_dict() for k, cb in zip(_callback_keys(callbacks), callbacks)},
    }


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Reads a :func:`fit` checkpoint with ``torch.load(..., weights_only=True)``.

    Returns:
        A dict with ``step``, ``losses``, ``params`` (unconstrained values by
        param-store name), ``optim``, ``rng`` and ``callbacks``.
    """
    payload = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(
            f"{os.fspath(path)!r} is not a pyro_flowguide fit checkpoint "
            f"(expected format {CHECKPOINT_FORMAT!r})"
        )
    return payload


def _check_params_match(saved: dict[str, Tensor], path: str) -> None:
    current = {n: tuple(p.shape) for n, p in store_params().items()}
    saved_shapes = {n: tuple(v.shape) for n, v in saved.items()}
    missing = sorted(set(saved_shapes) - set(current))
    extra = sorted(set(current) - set(saved_shapes))
    shapes = sorted(
        f"{n} (checkpoint {saved_shapes[n]}, now {current[n]})"
        for n in set(current) & set(saved_shapes)
        if current[n] != saved_shapes[n]
    )
    if missing or extra or shapes:
        parts = []
        if missing:
            parts.append(f"in the checkpoint but not in this model/guide: {missing}")
        if extra:
            parts.append(f"in this model/guide but not in the checkpoint: {extra}")
        if shapes:
            parts.append(f"different shapes: {shapes}")
        raise CheckpointMismatchError(
            f"checkpoint {path!r} was written for another model or guide; parameters "
            + "; ".join(parts)
            + ". Resume with the same model, guide and data, or start afresh with resume=False "
            "(and pyro.clear_param_store() if the store holds another guide's parameters)."
        )


def restore(state: FitState, payload: dict, callbacks: Sequence[Callback], path: str) -> None:
    """Puts a loaded checkpoint back: parameters, optimiser state, progress, callbacks' states, RNG states.

    Raises:
        CheckpointMismatchError: the checkpoint's parameters are not those of this model and guide.
    """
    _check_params_match(payload["params"], path)
    _copy_into_params(payload["params"])
    optim = state.optim
    by_tensor = {p: n for n, p in store_params().items()}
    waiting = dict(payload["optim"])
    # Optimisers already built (an optim reused across calls) take their state now;
    # the rest take it when SVI first meets their parameter.
    for p, torch_optim in optim.optim_objs.items():
        name = by_tensor.get(p)
        if name in waiting:
            _load_state_dict(torch_optim, waiting.pop(name))
    optim.set_state(waiting)
    state.step = int(payload["step"])
    state.losses = payload["losses"].tolist()
    state.smoothed_loss = float(payload["smoothed_loss"])
    state.num_skipped = int(payload["num_skipped"])
    saved_callbacks = payload.get("callbacks", {})
    for key, cb in zip(_callback_keys(callbacks), callbacks):
        if key in saved_callbacks:
            cb.load_state_dict(saved_callbacks[key])
    set_rng_state(payload["rng"])


# --------------------------------------------------------------------------- result
