"""Class-balanced statistics: TRIBE's balanced BatchNorm, gradient-free and per stream.

Su, Xu, Jia, "Towards Real-World Test-Time Adaptation: Tri-Net Self-Training with Balanced
Normalization" (AAAI 2024, arXiv 2309.14949), the balanced BN layer only (no tri-net, no
self-training: nothing is trained). Reimplemented from the paper's description; its code is not
used. A label-correlated stream pulls ordinary test-time statistics towards the class it is
currently showing (TBN fails, AdaBN drifts). Balanced BN keeps one mean and variance per class
and channel, updated only with the images predicted to be of that class, and normalises with the
uniform mixture of the classes' Gaussians:

    mean = 1/K sum_k mu_k,   var = 1/K sum_k (var_k + (mu_k - mean)^2)

so a run of one class moves one of the K statistics, not the normalisation.

Pseudo-labels come from the current forward: a batch is normalised with the class statistics
from before it, and once the logits exist each image is folded into the class it was predicted
as ("normalise, then update", as UnMix-TNS). The previous forward's predictions belong to other
images, and a second forward per call to label the batch first would double the cost; with
normalise-then-update the labels are those of the very statistics that normalised the batch.

Per class, the statistics follow the project's AdaBN (ALGORITHMS.md 1.5, 3.2) rather than the
paper's fixed-momentum EMA (named deviations):
- exact pooling: (pixel count, mean, M2) per class and channel, Chan-merged in float64, so the
  spread between the images of a class counts, and N = 1 works;
- ``window`` (images per class): the count is capped, an EMA beyond it (forgets old domains);
- ``prior_images`` (per class): Schneider et al.'s source prior, mixed linearly with weight
  n / (n + n0 L) on the class's target estimate; a class not predicted yet is the source.
The paper's class-agnostic blend (gamma, for many classes) is not implemented.

Pooled prior (an extension, with ``pooled_prior_images``): a young stream has few images per
class, so the source prior above normalises its first hundreds of images with statistics close to
the source (the first batch with the source itself). With it, a class's prior is the stream's
pooled statistic instead: AdaBN over all the stream's remembered images and the current batch
(update, then normalise), mixed with the source with its own prior n0' images,

    pooled = mix(c N / (N + n0' L), chan(sum_k class_k, batch), source),
    class_k = mix(n_k / (n_k + n0 L), class_k, pooled),

so a fresh stream starts as AdaBN with an n0'-image prior, and a class's own statistic takes
over as its images arrive. c = exp(H(n / N)) / K is how evenly the remembered images cover the
classes (1 before any image): on a label-correlated stream the pooled statistic is that of the
few classes shown so far, and a class not seen yet would stand at them (AdaBN's drift), so
there it stays near the source as before.

Gated window (an extension, with ``window_min``): a class memory long enough to resist a label-
correlated stream forgets a domain too slowly. The window then follows a divergence gate, as the
``gated`` adapter's momentum does: per layer, D is the Jeffreys divergence between an EMA of the
stream's last ~``recent_images`` images and what the class statistics expect of those images,
the mixture of the classes they were predicted as (the same EMA over their one-hot labels), and

    window = window_min + (window - window_min) * d0 / (D + d0)

caps every class's count. Weighting the classes as the recent images do makes D blind to label
shift: a run of one class is expected to look like that class, so a label-correlated stream keeps
the long memory, while a domain switch (every class's statistic off) shortens it at once.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from torch import Tensor

from adapters.base import (
    NONNEGATIVE,
    Adapter,
    HParams,
    Moments,
    SourceStats,
    State,
    chan_merge,
    linear_mix,
)
from adapters.gated import divergence, ema_fold, ema_gaussian


class BalancedConfig(BaseModel):
    """The number of classes (the state's shape) and each class's memory."""

    model_config = ConfigDict(extra="forbid")

    classes: int | None = Field(
        None,
        ge=1,
        le=100_000,
        validate_default=True,
        description="classes K of the model's logits (None: the model's)",
    )
    prior_images: float = Field(
        8.0, ge=0, le=1e9, description="source prior strength per class n0, in images"
    )
    window: float = Field(
        200.0, ge=1, le=1e9, description="images each class remembers (an EMA beyond)"
    )

    window_min: float | None = Field(
        None, ge=1, le=1e9, description="gated: the window on a domain switch (None: fixed)"
    )
    d0: float = Field(0.1, gt=0, le=1e6, description="gated: divergence at which it is half-way")
    recent_images: float = Field(64.0, ge=1, le=1e6, description="gated: the recent EMA's memory")
    pooled_prior_images: float | None = Field(
        None,
        ge=0,
        le=1e9,
        description="a class's prior is the stream's pooled statistic, with this source prior "
        "in images (None: the source)",
    )

    @field_validator("classes")
    @classmethod
    def _the_models(cls, classes: int | None, info: ValidationInfo) -> int | None:
        """K is the model's number of classes (the engine gives it as validation context)."""
        model = (info.context or {}).get("num_classes")
        if model is None or classes == model:
            return classes
        if classes is None:
            return model
        raise ValueError(f"the model has {model} classes, not {classes}")


def init_state(source: SourceStats, config: BalancedConfig, generator: torch.Generator) -> State:
    """No image of any class yet: zero counts, means and M2 per class (float64)."""
    if config.classes is None:
        raise ValueError("balanced statistics need the model's number of classes")
    zeros = torch.zeros(
        (config.classes, source.mean.numel()), dtype=torch.float64, device=source.mean.device
    )
    one = zeros.new_ones(())
    recent = zeros[0].clone()
    return {
        "n": zeros.new_zeros(config.classes),
        "mean": zeros,
        "m2": zeros.clone(),
        "recent.w": one,
        "recent.s1": recent,
        "recent.s2": recent.clone(),
        "recent.labels": zeros.new_zeros(config.classes),
    }


def update(state: State, moments: Moments, source: SourceStats, hp: HParams) -> State:
    """Chan's merge of each stream's images into the class each was predicted as."""
    if moments.labels is None:
        raise ValueError("balanced statistics need the forward's predicted classes")
    classes = state["n"].shape[-1]
    labels = moments.labels.clamp(max=classes - 1)
    onehot = torch.nn.functional.one_hot(labels, classes).double()
    pixels = moments.pixels
    sample_mean = moments.sample_mean.double()
    # per (stream, class): images, mean, and spread around that mean (law of total variance)
    images = moments.members @ onehot  # [S, K]
    count = images.clamp(min=1)[..., None]
    batch_mean = torch.einsum("sn,nk,nc->skc", moments.members, onehot, sample_mean) / count
    own_mean = batch_mean[moments.segment, labels]  # [N, C]
    spread = moments.sample_var.double() + (sample_mean - own_mean).square()
    batch_var = torch.einsum("sn,nk,nc->skc", moments.members, onehot, spread) / count

    n, mean, m2 = state["n"], state["mean"], state["m2"]
    nb = images * pixels
    total = n + nb
    weight = (nb / total.clamp(min=1))[..., None]
    delta = batch_mean - mean
    mean = mean + delta * weight
    m2 = m2 + batch_var * nb[..., None] + delta.square() * (n[..., None] * weight)
    # gated window: the recent images against the mixture of the classes they were predicted as
    recent_keep = (1 - 1 / hp["recent_images"]) ** moments.images
    w, s1, s2 = ema_fold(
        state["recent.w"], state["recent.s1"], state["recent.s2"], recent_keep, moments, source
    )
    keep = recent_keep[:, None]
    share = images / images.sum(-1, keepdim=True).clamp(min=1)
    recent_labels = keep * state["recent.labels"] + (1 - keep) * share
    # what the class statistics expect of the same images: (w, S1, S2) with each image replaced
    # by its class's Gaussian (the labels' EMA weighs the classes; it sums to 1 - w, as S1's does)
    class_means, class_vars = class_gaussians(state, moments, source, hp)
    shifted = class_means - source.mean.double()
    expected_s1 = torch.einsum("sk,skc->sc", recent_labels, shifted)
    expected_s2 = torch.einsum("sk,skc->sc", recent_labels, class_vars + shifted.square())
    d = divergence(
        *ema_gaussian(w, s1, s2, source),
        *ema_gaussian(w, expected_s1, expected_s2, source),
        source.eps,
    )
    low = torch.where(torch.isinf(hp["window_min"]), hp["window"], hp["window_min"])
    window = low + (hp["window"] - low).clamp(min=0) * hp["d0"] / (d + hp["d0"])
    shrink = (window[:, None] * pixels / total.clamp(min=1)).clamp(max=1.0)
    return {
        "n": total * shrink,
        "mean": mean,
        "m2": m2 * shrink[..., None],
        "recent.w": w,
        "recent.s1": s1,
        "recent.s2": s2,
        "recent.labels": recent_labels,
    }


def class_gaussians(
    state: State, moments: Moments, source: SourceStats, hp: HParams
) -> tuple[Tensor, Tensor]:
    """Each class's mean and variance with its prior (the source or the pooled statistic),
    [S, K, C]."""
    n = state["n"]
    seen = n > 0
    weight = torch.where(seen, n / (n + hp["prior_images"][:, None] * moments.pixels), 0.0)
    var = state["m2"] / torch.where(seen, n, 1.0)[..., None]
    a = weight[..., None]
    prior_mean, prior_var = pooled_prior(state, moments, source, hp)
    return (1 - a) * prior_mean + a * state["mean"], (1 - a) * prior_var + a * var


def pooled_prior(
    state: State, moments: Moments, source: SourceStats, hp: HParams
) -> tuple[Tensor, Tensor]:
    """Each stream's class prior, [S, 1, C]: the source, or with ``pooled_prior_images`` the
    stream's pooled statistic (its classes and the current batch, Chan-merged) mixed with the
    source with weight c N / (N + n0' L), c the classes' coverage; None (``inf``) gives weight
    0, the source."""
    n, mean = state["n"], state["mean"]
    total = n.sum(-1)
    pooled_mean = (n[..., None] * mean).sum(1) / total.clamp(min=1)[:, None]
    pooled_m2 = state["m2"].sum(1) + (n[..., None] * (mean - pooled_mean[:, None]).square()).sum(1)
    count, pooled_mean, pooled_m2 = chan_merge(total, pooled_mean, pooled_m2, moments)
    # how evenly the remembered images cover the classes: exp(entropy) / K, 1 for no images
    # (-p log p written out: torch.special.entr does not export to ONNX)
    share = n / total.clamp(min=1)[:, None]
    entropy = -(share * share.clamp(min=1e-300).log()).sum(-1)
    coverage = entropy.exp() / n.shape[-1]
    coverage = torch.where(total > 0, coverage, 1.0)
    weight = coverage * count / (count + hp["pooled_prior_images"] * moments.pixels).clamp(min=1)
    prior_mean, prior_var = linear_mix(
        weight, pooled_mean, pooled_m2 / count.clamp(min=1)[:, None], source
    )
    return prior_mean[:, None], prior_var[:, None]


def norm_stats(
    state: State, moments: Moments, source: SourceStats, hp: HParams
) -> tuple[Tensor, Tensor]:
    """The uniform mixture of the K class Gaussians (the balanced statistic), [S, C]."""
    means, variances = class_gaussians(state, moments, source, hp)
    mean = means.mean(1)
    return mean, variances.mean(1) + (means - mean[:, None]).square().mean(1)


ADAPTER = Adapter(
    "balanced",
    BalancedConfig,
    init_state,
    norm_stats,
    update,
    pseudo_labels=True,
    structural=("classes",),
    bounds={
        "n": NONNEGATIVE,
        "m2": NONNEGATIVE,
        "recent.w": (0.0, 1.0),
        "recent.s2": NONNEGATIVE,
        "recent.labels": (0.0, 1.0),
    },
)
