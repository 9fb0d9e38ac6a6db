"""A deliberately simple reference of every adapter: one model copy per stream, plain loops.

Nothing here is shared with ``adapters/``: statistics come straight from torch reductions in
float64 over the pixels kept in memory, UnMix-TNS loops over images and components, and the
momentum method keeps every batch with its weight instead of running sums. It is slow and
memory-hungry on purpose, so that it is easy to check by reading.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import Tensor, nn


def _pixels(x: Tensor) -> Tensor:
    """[N, C, H, W] -> [C, N*H*W] in float64."""
    return x.double().transpose(0, 1).reshape(x.shape[1], -1)


class ReferenceNorm(nn.Module):
    """One BN layer of one stream, for one adapter."""

    def __init__(self, bn: nn.BatchNorm2d, adapter: str, config: dict, generator: torch.Generator):
        super().__init__()
        self.mu_s = bn.running_mean.double().clone()
        self.var_s = bn.running_var.double().clone()
        self.gamma = bn.weight.double().clone()
        self.beta = bn.bias.double().clone()
        self.eps = bn.eps
        self.m_bn = bn.momentum
        self.adapter = adapter
        self.config = config
        self.seen: list[Tensor] = []  # adabn: every pixel seen, per channel
        self.batches: list[tuple[float, Tensor]] = []  # momentum: (weight, pixels)
        self.w = 1.0
        self.step = 0.0
        if adapter == "unmix_tns":
            k = config.get("components", 16)
            a = 0.5 if k > 1 else 0.0
            noise = torch.randn((k, self.mu_s.numel()), generator=generator, dtype=torch.float32)
            spread = math.sqrt(a * k / (k - 1)) if k > 1 else 0.0
            self.means = (self.mu_s.float() + spread * self.var_s.float().sqrt() * noise).double()
            self.vars = ((1 - a) * self.var_s).expand(k, -1).clone()

    def _apply(self, x: Tensor, mean: Tensor, var: Tensor) -> Tensor:
        y = (x.double() - mean[:, None, None]) / torch.sqrt(var[:, None, None] + self.eps)
        return (y * self.gamma[:, None, None] + self.beta[:, None, None]).float()

    def forward(self, x: Tensor) -> Tensor:
        if self.adapter == "source":
            return torch.stack([self._apply(img, self.mu_s, self.var_s) for img in x])
        if self.adapter == "tbn":
            p = _pixels(x)
            return torch.stack([self._apply(img, p.mean(1), p.var(1, unbiased=False)) for img in x])
        if self.adapter == "alpha_bn":
            a = self.config.get("alpha", 0.1)
            p = _pixels(x)
            var_b = p.var(1, unbiased=bool(self.config.get("unbiased", False)))
            mean = (1 - a) * self.mu_s + a * p.mean(1)
            var = (1 - a) * self.var_s + a * var_b
            return torch.stack([self._apply(img, mean, var) for img in x])
        if self.adapter == "adabn":
            self.seen.append(_pixels(x))
            everything = torch.cat(self.seen, 1)
            n = everything.shape[1]
            n0 = self.config.get("prior_images", 0.0) * x.shape[2] * x.shape[3]
            a = n / (n + n0)
            mean = (1 - a) * self.mu_s + a * everything.mean(1)
            var = (1 - a) * self.var_s + a * everything.var(1, unbiased=False)
            return torch.stack([self._apply(img, mean, var) for img in x])
        if self.adapter == "momentum":
            return self._momentum(x)
        if self.adapter == "unmix_tns":
            return self._unmix(x)
        raise ValueError(self.adapter)

    def _momentum(self, x: Tensor) -> Tensor:
        eta0 = self.config.get("eta0", 0.1)
        beta = self.config.get("beta", 0.08)
        batch_ref = self.config.get("batch_ref", 6.0)
        keep = 1.0
        for _ in range(x.shape[0]):  # the schedule decays image by image
            keep *= (1 - eta0 * math.exp(-beta * self.step)) ** (1 / batch_ref)
            self.step += 1 / batch_ref
        eta = 1 - keep
        self.batches = [(weight * (1 - eta), p) for weight, p in self.batches]
        self.batches.append((eta, _pixels(x)))
        self.w *= 1 - eta
        total = sum(weight for weight, _ in self.batches)
        mu_t = sum(weight * p.mean(1) for weight, p in self.batches) / total
        var_t = sum(weight * (p - mu_t[:, None]).square().mean(1) for weight, p in self.batches)
        var_t = var_t / total
        mean = self.w * self.mu_s + (1 - self.w) * mu_t
        var = self.w * self.var_s + (1 - self.w) * var_t
        return torch.stack([self._apply(img, mean, var) for img in x])

    def _unmix(self, x: Tensor) -> Tensor:
        tau = self.config.get("tau", 0.07)
        b_max = self.config.get("batch_size_max", 64)
        k = self.means.shape[0]
        outputs, assignments, inst = [], [], []
        for img in x:
            p_img = img.double().reshape(img.shape[0], -1)
            mu_i, var_i = p_img.mean(1), p_img.var(1, unbiased=False)
            sims = torch.stack([torch.cosine_similarity(mu_i, self.means[j], 0) for j in range(k)])
            p = torch.softmax(sims / tau, 0)
            mixed_means = [(1 - p[j]) * self.means[j] + p[j] * mu_i for j in range(k)]
            mixed_vars = [(1 - p[j]) * self.vars[j] + p[j] * var_i for j in range(k)]
            mean = sum(mixed_means) / k
            var = sum(mixed_vars) / k + sum((m - mean).square() for m in mixed_means) / k
            outputs.append(self._apply(img, mean, var))
            assignments.append(p)
            inst.append((mu_i, var_i))
        lam = 1 - (1 - self.m_bn) ** (x.shape[0] / b_max)
        new_means, new_vars = self.means.clone(), self.vars.clone()
        for j in range(k):
            pull_m = sum(
                p[j] * (mu - self.means[j]) for p, (mu, _) in zip(assignments, inst, strict=True)
            )
            pull_v = sum(
                p[j] * (v - self.vars[j]) for p, (_, v) in zip(assignments, inst, strict=True)
            )
            new_means[j] += lam * pull_m / x.shape[0]
            new_vars[j] += lam * pull_v / x.shape[0]
        self.means, self.vars = new_means, new_vars
        return torch.stack(outputs)


def reference_model(model: nn.Module, adapter: str, config: dict, seed: int) -> nn.Module:
    """A copy of ``model`` whose BatchNorm2d layers are ReferenceNorm for one stream."""
    model = copy.deepcopy(model).eval()
    generator = torch.Generator().manual_seed(seed)
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if isinstance(child, nn.BatchNorm2d):
                setattr(parent, name, ReferenceNorm(child, adapter, config, generator))
    return model
