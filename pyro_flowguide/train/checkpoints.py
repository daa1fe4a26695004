"""Checkpoints of :func:`~pyro_flowguide.fit`: atomic writes, RNG states, restoring a run bit for bit.

A checkpoint carries a signature of the model's latent sites and of the guide
and a sha256 checksum of its contents; :func:`load_checkpoint` and
:func:`restore` refuse a corrupted, incomplete or non-finite checkpoint, or
one of another model or guide, with a :class:`CheckpointMismatchError`
subclass that names the problem.
"""

from __future__ import annotations

import glob
import hashlib
import os
import re
import tempfile
from typing import TYPE_CHECKING, Any, Sequence

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
    "CheckpointCorruptedError",
    "CheckpointIncompleteError",
    "CheckpointMismatchError",
    "CheckpointModelMismatchError",
    "CheckpointNonFiniteError",
    "check_resumable",
    "checksum",
    "fit_signature",
    "remove_stale_temporaries",
    "atomic_save",
    "checkpoint_payload",
    "load_checkpoint",
    "restore",
    "rng_state",
    "set_rng_state",
    "store_params",
]

#: The ``format`` entry of every checkpoint :func:`~pyro_flowguide.fit` writes.
CHECKPOINT_FORMAT = "pyro_flowguide.fit/2"

#: The entries every checkpoint holds; the checksum covers all of them.
CHECKPOINT_KEYS = (
    "format", "step", "steps", "smoothed_loss", "smoothed_scale", "num_skipped", "losses",
    "params", "optim", "rng", "callbacks", "signature",
)

_START_AFRESH = "start afresh with resume=False (or delete the file)"


class CheckpointMismatchError(ValueError):
    """Raised when :func:`fit` refuses to resume from a checkpoint; its subclasses say why."""


class CheckpointModelMismatchError(CheckpointMismatchError):
    """The checkpoint was written for another model or guide (latent sites, guide configuration, parameters)."""


class CheckpointCorruptedError(CheckpointMismatchError):
    """The file cannot be read, or its contents do not match the checksum stored with them."""


class CheckpointIncompleteError(CheckpointMismatchError):
    """The checkpoint lacks entries a resume needs (written by another version, or edited)."""


class CheckpointNonFiniteError(CheckpointMismatchError):
    """The checkpoint's parameters hold NaN or infinite values."""


# --------------------------------------------------------------------------- identity and integrity


def _site_line(site: dict) -> str:
    fn = site["fn"]
    support = getattr(fn, "support", None)
    return f"{site['name']}: shape {tuple(site['value'].shape)}, support {support}"


def _strip_addresses(text: str) -> str:
    return re.sub(r" at 0x[0-9a-fA-F]+", "", text)


def fit_signature(guide: Any, guide_trace, model_trace) -> dict:
    """What identifies a fit: the model's latent sites and the guide's type and configuration.

    Arguments:
        guide: The guide (set up: its parameters exist).
        guide_trace, model_trace: One trace of each (:func:`~pyro_flowguide.tracing.trace_model_and_guide`).

    Returns:
        ``{"model": [...], "guide": [...]}``, lists of strings: each latent
        sample site of the model with its shape and support; the guide's
        type, its non-centred sites and flow configuration where it has them,
        and the sites it samples.
    """
    model_sites = [
        _site_line(site)
        for site in model_trace.nodes.values()
        if site["type"] == "sample" and not site["is_observed"] and not site["infer"].get("is_auxiliary")
    ]
    cls = type(guide)
    guide_lines = [f"type: {cls.__module__}.{cls.__qualname__}"]
    if getattr(guide, "noncentered_sites", None) is not None:
        guide_lines.append(f"noncentered_sites: {sorted(guide.noncentered_sites)}")
    for attr in ("estimator", "latent_dim"):
        if isinstance(getattr(guide, attr, None), (str, int)):
            guide_lines.append(f"{attr}: {getattr(guide, attr)}")
    flow = getattr(guide, "flow", None)
    if isinstance(flow, torch.nn.Module):
        guide_lines.append(f"flow: {_strip_addresses(repr(flow))}")
    guide_lines += [
        f"samples {site['name']}"
        for site in guide_trace.nodes.values()
        if site["type"] == "sample" and not site["is_observed"]
    ]
    return {"model": model_sites, "guide": guide_lines}


def _feed(h, obj: Any) -> None:
    """Feeds a canonical encoding of nested dicts/lists/tensors/numbers/strings to the hash ``h``."""
    if isinstance(obj, dict):
        h.update(b"{%d" % len(obj))
        for key in sorted(obj, key=repr):
            _feed(h, key)
            _feed(h, obj[key])
        h.update(b"}")
    elif isinstance(obj, (list, tuple)):
        h.update(b"[%d" % len(obj))
        for item in obj:
            _feed(h, item)
        h.update(b"]")
    elif isinstance(obj, Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    else:
        h.update(f"{type(obj).__name__}:{obj!r};".encode())


def checksum(payload: dict) -> str:
    """The sha256 (hex) of every entry of ``payload`` but ``checksum`` itself."""
    h = hashlib.sha256()
    _feed(h, {k: v for k, v in payload.items() if k != "checksum"})
    return h.hexdigest()


def _temporaries(path: str) -> list[str]:
    folder, name = os.path.split(os.path.abspath(path))
    return glob.glob(os.path.join(glob.escape(folder), f".{glob.escape(name)}.ckpt-*.tmp"))


def remove_stale_temporaries(path: str | os.PathLike) -> list[str]:
    """Deletes the temporary files an interrupted save of ``path`` left behind; returns their names."""
    removed = []
    for tmp in _temporaries(os.fspath(path)):
        try:
            os.unlink(tmp)
            removed.append(tmp)
        except FileNotFoundError:
            pass
    return removed


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
    folder, name = os.path.split(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    # Whatever an earlier, killed save left (a save of this file is never concurrent with another).
    remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.ckpt-", suffix=".tmp", dir=folder)
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
    """What a checkpoint holds: progress, parameters, optimiser and RNG states, the callbacks' states.

    Also the fit's signature (:func:`fit_signature`) and a ``checksum`` of all of it.
    """
    payload = {
        "format": CHECKPOINT_FORMAT,
        "step": state.step,
        "steps": state.steps,
        "smoothed_loss": state.smoothed_loss,
        "smoothed_scale": state.smoothed_scale,
        "num_skipped": state.num_skipped,
        "losses": torch.tensor(state.losses, dtype=torch.float64),
        "params": {n: p.detach().clone() for n, p in store_params().items()},
        "optim": state.optim.get_state(),
        "rng": rng_state(),
        "callbacks": {k: cb.state_dict() for k, cb in zip(_callback_keys(callbacks), callbacks)},
        "signature": state.signature,
    }
    payload["checksum"] = checksum(payload)
    return payload


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Reads and verifies a :func:`fit` checkpoint (``torch.load(..., weights_only=True)``).

    Also deletes temporary files an interrupted save of ``path`` left behind.

    Returns:
        A dict with ``step``, ``losses``, ``params`` (unconstrained values by
        param-store name), ``optim``, ``rng``, ``callbacks``, ``signature``
        and ``checksum``.

    Raises:
        CheckpointCorruptedError: the file cannot be read or fails its checksum.
        CheckpointIncompleteError: entries are missing (another version, or edited).
    """
    path = os.fspath(path)
    remove_stale_temporaries(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is refused the same way
        raise CheckpointCorruptedError(
            f"checkpoint {path!r} cannot be read ({type(err).__name__}: "
            f"{str(err).strip().splitlines()[0][:200] if str(err).strip() else ''}); the file is "
            f"damaged or not a checkpoint. Resume from an intact copy, or {_START_AFRESH}."
        ) from err
    if not isinstance(payload, dict) or not str(payload.get("format", "")).startswith("pyro_flowguide.fit/"):
        raise CheckpointCorruptedError(
            f"{path!r} is not a pyro_flowguide fit checkpoint (expected format {CHECKPOINT_FORMAT!r}); "
            f"the file is damaged or of another kind. Resume from an intact copy, or {_START_AFRESH}."
        )
    if payload["format"] != CHECKPOINT_FORMAT:
        raise CheckpointIncompleteError(
            f"checkpoint {path!r} has format {payload['format']!r}, written by another version of "
            f"pyro_flowguide (this one reads {CHECKPOINT_FORMAT!r}); {_START_AFRESH}."
        )
    missing = [k for k in (*CHECKPOINT_KEYS, "checksum") if k not in payload]
    if missing:
        raise CheckpointIncompleteError(
            f"checkpoint {path!r} lacks the entries {missing}: it was edited or written by another "
            f"version, and cannot continue the run; {_START_AFRESH}."
        )
    if checksum(payload) != payload["checksum"]:
        raise CheckpointCorruptedError(
            f"checkpoint {path!r} is corrupted: its contents do not match the sha256 checksum stored "
            f"with them (the file was damaged or edited). Resume from an intact copy, or {_START_AFRESH}."
        )
    return payload


def _check_signature(saved: dict, current: dict, path: str) -> None:
    parts = []
    for part, what in (("model", "latent sites of the model"), ("guide", "guide's options")):
        old, new = list(saved.get(part, [])), list(current.get(part, []))
        if old == new:
            continue
        gone = [line[:200] for line in old if line not in new]
        added = [line[:200] for line in new if line not in old]
        detail = f"checkpoint has {gone}, now {added}" if gone or added else "same entries, other order"
        parts.append(f"the {what} differ ({detail})")
    if parts:
        raise CheckpointModelMismatchError(
            f"checkpoint {path!r} was written for another model or guide: "
            + "; ".join(parts)
            + ". Resume with the same model, guide (and its options) and data, or "
            f"{_START_AFRESH} (and pyro.clear_param_store() if the store holds another guide's parameters)."
        )


def _check_finite(payload: dict, path: str) -> None:
    bad = sorted(n for n, v in payload["params"].items() if v.is_floating_point() and not bool(v.isfinite().all()))
    if bad:
        raise CheckpointNonFiniteError(
            f"checkpoint {path!r} holds non-finite (NaN/inf) values in the parameters {bad}: the run "
            "it saved had diverged, and resuming would not train. Resume from an earlier checkpoint, "
            f"or {_START_AFRESH}, with a lower learning rate or a better initialisation."
        )


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
        raise CheckpointModelMismatchError(
            f"checkpoint {path!r} was written for another model or guide; parameters "
            + "; ".join(parts)
            + ". Resume with the same model, guide and data, or start afresh with resume=False "
            "(and pyro.clear_param_store() if the store holds another guide's parameters)."
        )


def check_resumable(state: FitState, payload: dict, path: str) -> None:
    """Refuses a loaded checkpoint of another model or guide, or with non-finite parameters.

    Raises:
        CheckpointModelMismatchError: other parameters, latent sites or guide configuration.
        CheckpointNonFiniteError: its parameters hold NaN/inf.
    """
    # The signature first: it names the sites and guide options that differ.
    if state.signature is not None:
        _check_signature(payload["signature"], state.signature, path)
    _check_params_match(payload["params"], path)
    _check_finite(payload, path)


def restore(state: FitState, payload: dict, callbacks: Sequence[Callback], path: str) -> None:
    """Puts a loaded checkpoint back: parameters, optimiser state, progress, callbacks' states, RNG states.

    Raises:
        CheckpointModelMismatchError: the checkpoint is of another model or guide.
        CheckpointNonFiniteError: its parameters hold NaN/inf.
    """
    check_resumable(state, payload, path)
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
    state.smoothed_scale = float(payload["smoothed_scale"])
    state.num_skipped = int(payload["num_skipped"])
    saved_callbacks = payload.get("callbacks", {})
    for key, cb in zip(_callback_keys(callbacks), callbacks):
        if key in saved_callbacks:
            cb.load_state_dict(saved_callbacks[key])
    set_rng_state(payload["rng"])


# --------------------------------------------------------------------------- result
