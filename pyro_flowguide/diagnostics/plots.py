r"""Plots for fitted guides: the loss curve, and guide draws against reference draws.

Matplotlib is imported when a function is called, not when the package is, so
it stays an optional dependency (``pip install pyro-flowguide[plots]``).

Example:
    >>> import numpy as np, matplotlib
    >>> matplotlib.use("Agg")
    >>> ax = plot_losses(np.linspace(10, 1, 200))
    >>> rng = np.random.default_rng(0)
    >>> fig = plot_pair({"z": rng.normal(size=(500, 2))}, reference={"z": rng.normal(size=(500, 2))})
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

__all__ = ["plot_losses", "plot_pair"]


def _pyplot():
    try:
        import matplotlib.pyplot as plt
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "plotting needs matplotlib: pip install 'pyro-flowguide[plots]' (or pip install matplotlib)"
        ) from err
    return plt


def _smooth(values: np.ndarray, weight: float) -> np.ndarray:
    """Exponential moving average of ``values`` that steps over non-finite entries."""
    out = np.empty_like(values)
    s = np.nan
    for i, v in enumerate(values):
        if np.isfinite(v):
            s = v if np.isnan(s) else s + weight * (v - s)
        out[i] = s
    return out


def plot_losses(losses: Sequence[float], ax=None, smoothing: float = 0.02, log_scale: bool | None = None):
    """Plots a loss curve: raw losses (faint) and their exponential moving average.

    Arguments:
        losses: One loss per step (e.g. ``FitResult.losses``); non-finite
            (skipped) steps are left out.
        ax: Matplotlib axes to draw on (default: a new figure).
        smoothing: Weight of the newest loss in the moving average.
        log_scale: Symmetric-log y axis; default when the losses span more
            than two orders of magnitude.

    Returns:
        The matplotlib axes.

    Example:
        >>> import numpy as np, matplotlib
        >>> matplotlib.use("Agg")
        >>> plot_losses(np.linspace(10, 1, 200)).get_xlabel()
        'step'
    """
    plt = _pyplot()
    values = np.asarray(losses, dtype=float)
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 3.5))
    steps = np.arange(1, len(values) + 1)
    finite = np.isfinite(values)
    ax.plot(steps[finite], values[finite], lw=0.6, alpha=0.3, color="C0", label="loss")
    ax.plot(steps, _smooth(values, smoothing), lw=1.5, color="C0", label="smoothed")
    if log_scale is None and finite.any():
        span = np.abs(values[finite])
        log_scale = span.max() > 100 * max(np.median(span), 1e-12)
    if log_scale:
        ax.set_yscale("symlog")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend(loc="upper right", frameon=False)
    return ax


def _columns(samples: Mapping[str, Any], sites: Sequence[str] | None) -> tuple[list[str], np.ndarray]:
    """Flattens ``{site: (num_samples, *shape)}`` into labelled columns."""
    names, cols = [], []
    for site in sites if sites is not None else list(samples):
        if site not in samples:
            raise KeyError(f"site {site!r} is not among the draws; available: {sorted(samples)}")
        value = samples[site]
        value = value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)
        flat = value.reshape(value.shape[0], -1)
        for j in range(flat.shape[1]):
            names.append(site if flat.shape[1] == 1 else f"{site}[{j}]")
            cols.append(flat[:, j])
    return names, np.stack(cols, axis=1)


def plot_pair(
    samples: Mapping[str, Any],
    reference: Mapping[str, Any] | None = None,
    sites: Sequence[str] | None = None,
    max_points: int = 2000,
    labels: tuple[str, str] = ("guide", "reference"),
    figsize: tuple[float, float] | None = None,
):
    """Pair plot of guide draws, optionally over reference draws (exact draws or NUTS).

    Histograms on the diagonal, scatter plots below it; the reference is drawn
    in grey behind the guide.

    Arguments:
        samples: ``{site: array of shape (num_samples, *site_shape)}``, e.g.
            ``guide.sample_posterior(...)`` or ``PSISResult.samples``.
        reference: Draws of the same sites to compare against.
        sites: Which sites to show (default all of ``samples``); vector sites
            are split into their coordinates.
        max_points: At most this many points per scatter.
        labels: Legend labels for the two sets of draws.

    Returns:
        The matplotlib figure.

    Example:
        >>> import numpy as np, matplotlib
        >>> matplotlib.use("Agg")
        >>> draws = {"z": np.random.default_rng(0).normal(size=(500, 2))}
        >>> len(plot_pair(draws).axes)  # a 2 x 2 grid for the two coordinates of z
        4
    """
    plt = _pyplot()
    names, x = _columns(samples, sites)
    ref = _columns(reference, sites)[1] if reference is not None else None
    d = len(names)
    size = figsize or (2.2 * d + 0.5, 2.2 * d + 0.5)
    fig, axes = plt.subplots(d, d, figsize=size, squeeze=False)
    rng = np.random.default_rng(0)

    def thin(a: np.ndarray) -> np.ndarray:
        return a if len(a) <= max_points else a[rng.choice(len(a), max_points, replace=False)]

    xs = thin(x)
    rs = thin(ref) if ref is not None else None
    for i in range(d):
        for j in range(d):
            ax = axes[i, j]
            if j > i:
                ax.axis("off")
                continue
            if i == j:
                bins = np.histogram_bin_edges(
                    np.concatenate([x[:, i], ref[:, i]]) if ref is not None else x[:, i], bins=40
                )
                if ref is not None:
                    ax.hist(ref[:, i], bins=bins, density=True, color="0.6", alpha=0.6, label=labels[1])
                ax.hist(x[:, i], bins=bins, density=True, histtype="step", color="C0", label=labels[0])
                ax.set_yticks([])
            else:
                if rs is not None:
                    ax.scatter(rs[:, j], rs[:, i], s=2, color="0.6", alpha=0.4, rasterized=True)
                ax.scatter(xs[:, j], xs[:, i], s=2, color="C0", alpha=0.4, rasterized=True)
            if i == d - 1:
                ax.set_xlabel(names[j])
            if j == 0 and i > 0:
                ax.set_ylabel(names[i])
    if ref is not None:
        axes[0, 0].legend(loc="upper right", frameon=False, fontsize="small")
    fig.tight_layout()
    return fig
