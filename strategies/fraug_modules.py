"""The model-agnostic core of FRAug: a shared embedding generator, a local RTNet and their losses.

FRAug (Chen et al., ICCV 2023, "FRAug: Tackling Federated Learning with Non-IID Features via
Representation Augmentation") augments each client's training in *embedding* space. This module
implements the following reading of it, which assumes only that the client's model splits into a
feature extractor ``f`` and a classifier ``h`` acting on embeddings of size ``D`` (here given as a
callable ``classify``: embeddings ``(n, D)`` -> logits ``(n, C)``):

* a **shared embedding generator** ``G(z, y)`` (:class:`EmbeddingGenerator`): Gaussian noise ``z``
  and a one-hot class ``y`` -> an embedding of size ``D``. Its weights travel with the model and
  are averaged by the server like the model's;
* a **local representation transformation network** ``R_k`` (:class:`RTNet`): an embedding and a
  class -> an embedding, residual (``e + r(e, y)``, the identity at initialisation). It adapts the
  client-agnostic embeddings of ``G`` to client ``k``'s own feature distribution and never leaves
  the client.

Per local step, in this order (:class:`FRAugSteps` runs steps 2 and 3 and supplies step 1's term):

1. **model step**: ``task loss on the real batch + lambda_aug * L_cls(h(R_k(G(z, y))), y)``, with
   ``G`` and ``R_k`` evaluated without gradient and ``y`` drawn from the classes present in the
   real batch (:func:`augmentation_loss`): the classifier sees extra, client-styled embeddings;
2. **generator step**: ``G`` is trained so that the frozen ``h`` classifies ``G(z, y)`` as ``y``
   (:func:`generator_loss`): the shared generator learns class-discriminative embeddings;
3. **RTNet step**: ``R_k`` is trained so that ``R_k(G(z, y))`` matches the batch's real embeddings
   class by class (a multi-bandwidth Gaussian-kernel MMD per class present, averaged over those
   classes) while the frozen ``h`` still classifies it as ``y`` (:func:`rtnet_loss`).

``L_cls`` is selectable (:func:`classification_loss`): softmax cross-entropy for classifiers, or
per-class sigmoid BCE against one-hot targets for detection heads that score classes
independently (YOLO's). Steps 2 and 3 take gradients with :func:`torch.autograd.grad` with
respect to ``G``'s or ``R_k``'s parameters only, so nothing lands on the classifier's or the
feature extractor's ``.grad`` and the model's optimiser is never involved; the classifier itself
is only *called* (if it holds BatchNorm layers in train mode their running statistics would move,
so pass a classifier without them, or in eval mode).

This module is pure torch (it must not import Flower): the strategy that ships ``G`` to and from
the server lives elsewhere.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "EmbeddingGenerator",
    "RTNet",
    "mmd",
    "classification_loss",
    "augmentation_loss",
    "generator_loss",
    "rtnet_loss",
    "FRAugSteps",
]

Classify = Callable[[torch.Tensor], torch.Tensor]


def _one_hot(labels: torch.Tensor, num_classes: int, dtype: torch.dtype) -> torch.Tensor:
    return F.one_hot(labels.long(), num_classes).to(dtype)


def _zero_like_graph(tensor: torch.Tensor) -> torch.Tensor:
    # A zero that is still attached to ``tensor``'s graph: adding it to a loss and calling
    # backward works (and gives zero gradients) even when the batch was empty, where a mean over
    # nothing would be NaN.
    return tensor.sum() * 0.0


class EmbeddingGenerator(nn.Module):
    """The shared generator ``G(z, y)``: noise and a one-hot class -> an embedding.

    Parameters
    ----------
    num_classes : int
        Number of classes ``C`` (the width of the one-hot condition).
    embed_dim : int
        Size ``D`` of the embeddings the classifier consumes.
    noise_dim : int, optional
        Size of the Gaussian noise ``z`` (default 32).
    hidden : int, optional
        Width of the two hidden layers (default 128).
    """

    def __init__(self, num_classes: int, embed_dim: int, noise_dim: int = 32, hidden: int = 128):
        super().__init__()
        if num_classes < 1 or embed_dim < 1 or noise_dim < 1 or hidden < 1:
            raise ValueError("num_classes, embed_dim, noise_dim and hidden must be positive")
        self.num_classes, self.embed_dim, self.noise_dim = num_classes, embed_dim, noise_dim
        self.net = nn.Sequential(
            nn.Linear(noise_dim + num_classes, hidden), nn.ReLU(),
            nn.Linear(hidden, hidden), nn.ReLU(),
            nn.Linear(hidden, embed_dim),
        )

    def forward(self, labels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Embeddings for ``labels``, one per label, from fresh noise.

        Parameters
        ----------
        labels : torch.LongTensor
            Class indices, shape ``(n,)``; ``n`` may be 0.
        generator : torch.Generator, optional
            Source of the noise (on ``labels.device``); torch's global one when None.

        Returns
        -------
        torch.Tensor
            Shape ``(n, embed_dim)``.
        """
        dtype = self.net[0].weight.dtype
        z = torch.randn(labels.shape[0], self.noise_dim, generator=generator, device=labels.device, dtype=dtype)
        return self.net(torch.cat([z, _one_hot(labels, self.num_classes, dtype)], dim=1))


class RTNet(nn.Module):
    """A client's representation transformation network ``R(e, y) = e + r(e, y)``.

    The last layer of ``r`` starts at zero, so ``R`` starts as the identity: at the first round
    the augmentation is exactly the shared generator's embeddings, and the client moves them
    towards its own style only as fast as its MMD term asks.

    Parameters
    ----------
    num_classes : int
        Number of classes ``C``.
    embed_dim : int
        Size ``D`` of the embeddings.
    hidden : int, optional
        Width of the hidden layer (default 128).
    """

    def __init__(self, num_classes: int, embed_dim: int, hidden: int = 128):
        super().__init__()
        if num_classes < 1 or embed_dim < 1 or hidden < 1:
            raise ValueError("num_classes, embed_dim and hidden must be positive")
        self.num_classes, self.embed_dim = num_classes, embed_dim
        self.net = nn.Sequential(nn.Linear(embed_dim + num_classes, hidden), nn.ReLU(), nn.Linear(hidden, embed_dim))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``emb + r(emb, labels)``.

        Parameters
        ----------
        emb : torch.Tensor
            Embeddings, shape ``(n, embed_dim)``.
        labels : torch.LongTensor
            Their classes, shape ``(n,)``.

        Returns
        -------
        torch.Tensor
            Shape ``(n, embed_dim)``.
        """
        return emb + self.net(torch.cat([emb, _one_hot(labels, self.num_classes, emb.dtype)], dim=1))


def mmd(x: torch.Tensor, y: torch.Tensor, bandwidths: Sequence[float] = (0.25, 0.5, 1.0, 2.0, 4.0),
        relative: bool = True) -> torch.Tensor:
    """Squared maximum mean discrepancy between two samples, multi-bandwidth Gaussian kernel.

    The biased (V-statistic) estimator ``mean K(x, x) + mean K(y, y) - 2 mean K(x, y)`` with
    ``K = sum_s exp(-||a - b||^2 / (2 s^2 h))``: it is never negative and stays defined for one
    sample per side, which a class seen once in a batch needs.

    Parameters
    ----------
    x, y : torch.Tensor
        Samples, shapes ``(n, D)`` and ``(m, D)``.
    bandwidths : sequence of float, optional
        Kernel widths ``s``.
    relative : bool, optional
        When True (default) the widths are relative: ``h`` is the mean pairwise squared distance
        of the pooled sample (detached, so it is a scale, not something to optimise), which makes
        the term independent of the embeddings' scale (a detector's features and a toy CNN's
        differ by orders of magnitude). When False, ``h = 1`` and the widths are absolute.

    Returns
    -------
    torch.Tensor
        A scalar; zero (attached to the inputs' graph) when either sample is empty.
    """
    if x.shape[0] == 0 or y.shape[0] == 0:
        return _zero_like_graph(x) + _zero_like_graph(y)
    pooled = torch.cat([x, y.to(x.dtype)], dim=0)
    d2 = torch.cdist(pooled, pooled).pow(2)
    scale = d2.detach().mean().clamp_min(1e-8) if relative else torch.ones((), dtype=d2.dtype, device=d2.device)
    kernel = sum(torch.exp(-d2 / (2.0 * s * s * scale)) for s in bandwidths)
    n = x.shape[0]
    return kernel[:n, :n].mean() + kernel[n:, n:].mean() - 2.0 * kernel[:n, n:].mean()


def classification_loss(logits: torch.Tensor, labels: torch.Tensor, multilabel: bool) -> torch.Tensor:
    """The classifier's loss on (possibly synthetic) embeddings.

    Parameters
    ----------
    logits : torch.Tensor
        Shape ``(n, C)``.
    labels : torch.LongTensor
        Shape ``(n,)``.
    multilabel : bool
        False: softmax cross-entropy, averaged over samples. True: sigmoid BCE against one-hot
        targets, *summed over classes* and averaged over samples, the way YOLO-style heads score
        classes (averaging over classes too would shrink the term by ``C``).

    Returns
    -------
    torch.Tensor
        A scalar; zero (attached to ``logits``' graph) when ``n == 0``.
    """
    if labels.numel() == 0:
        return _zero_like_graph(logits)
    labels = labels.to(logits.device).long()
    if multilabel:
        targets = _one_hot(labels, logits.shape[1], logits.dtype)
        return F.binary_cross_entropy_with_logits(logits, targets, reduction="sum") / labels.numel()
    return F.cross_entropy(logits, labels)


def augmentation_loss(classify: Classify, generator: EmbeddingGenerator, rtnet: RTNet | None, labels: torch.Tensor,
                      multilabel: bool, noise: torch.Generator | None = None) -> torch.Tensor:
    """Step 1's extra term: the classifier's loss on ``R(G(z, y))``, gradient to the classifier only.

    Parameters
    ----------
    classify : callable
        Embeddings ``(n, D)`` -> logits ``(n, C)`` (the model's classifier, with gradients).
    generator : EmbeddingGenerator
        The shared generator (evaluated without gradient).
    rtnet : RTNet or None
        The client's RTNet (without gradient); None means the identity.
    labels : torch.LongTensor
        The classes to synthesise, shape ``(n,)``.
    multilabel : bool
        See :func:`classification_loss`.
    noise : torch.Generator, optional
        Source of the generator's noise.

    Returns
    -------
    torch.Tensor
        A scalar (unweighted: the caller multiplies by ``lambda_aug``).
    """
    with torch.no_grad():  # G and R are fixed in the model step: only the classifier learns here
        emb = generator(labels, noise)
        if rtnet is not None:
            emb = rtnet(emb, labels)
    return classification_loss(classify(emb), labels, multilabel)


def generator_loss(classify: Classify, generator: EmbeddingGenerator, labels: torch.Tensor, multilabel: bool,
                   noise: torch.Generator | None = None) -> torch.Tensor:
    """Step 2: the classifier's loss on ``G(z, y)``, to be minimised over ``G``'s parameters.

    The gradient must flow *through* the classifier into ``G``, so the classifier cannot run
    under ``torch.no_grad``; differentiate the result with respect to ``G``'s parameters only
    (:func:`torch.autograd.grad`, as :meth:`FRAugSteps.after_step` does) so the classifier's
    ``.grad`` is never written.

    Parameters
    ----------
    classify : callable
        Embeddings -> logits.
    generator : EmbeddingGenerator
        The shared generator (with gradient).
    labels : torch.LongTensor
        Classes to synthesise, shape ``(n,)``.
    multilabel : bool
        See :func:`classification_loss`.
    noise : torch.Generator, optional
        Source of the generator's noise.

    Returns
    -------
    torch.Tensor
        A scalar.
    """
    return classification_loss(classify(generator(labels, noise)), labels, multilabel)


def _rtnet_terms(classify: Classify, generator: EmbeddingGenerator, rtnet: RTNet, real_embeddings: torch.Tensor,
                 real_labels: torch.Tensor, multilabel: bool, noise: torch.Generator | None):
    # (class-averaged MMD, classification loss), both on R(G(z, y)) with one synthetic embedding
    # per real one and the same labels, so every class present has a sample on both sides.
    real = real_embeddings.detach()  # the feature extractor is not trained by R's objective
    labels = real_labels.to(real.device).long()
    with torch.no_grad():  # G is fixed in R's step; R learns to restyle whatever G produces
        fake = generator(labels, noise)
    fake = rtnet(fake, labels)
    real = real.to(fake.dtype)
    classes = labels.unique()
    if classes.numel() == 0:
        zero = _zero_like_graph(fake)
        return zero, zero
    match = torch.stack([mmd(fake[labels == c], real[labels == c]) for c in classes]).mean()
    return match, classification_loss(classify(fake), labels, multilabel)


def rtnet_loss(classify: Classify, generator: EmbeddingGenerator, rtnet: RTNet, real_embeddings: torch.Tensor,
               real_labels: torch.Tensor, multilabel: bool, mmd_weight: float = 1.0,
               noise: torch.Generator | None = None) -> torch.Tensor:
    """Step 3: ``mmd_weight * class-conditional MMD(R(G(z, y)), real) + L_cls(h(R(G(z, y))), y)``.

    Parameters
    ----------
    classify : callable
        Embeddings -> logits (differentiate with respect to ``R``'s parameters only).
    generator : EmbeddingGenerator
        The shared generator (evaluated without gradient).
    rtnet : RTNet
        The client's RTNet (with gradient).
    real_embeddings : torch.Tensor
        The batch's real embeddings ``f(x)``, shape ``(n, D)`` (detached here).
    real_labels : torch.LongTensor
        Their classes, shape ``(n,)``.
    multilabel : bool
        See :func:`classification_loss`.
    mmd_weight : float, optional
        Weight of the MMD term (default 1).
    noise : torch.Generator, optional
        Source of the generator's noise.

    Returns
    -------
    torch.Tensor
        A scalar; zero when the batch is empty. The MMD is computed per class present in the
        batch and averaged over those classes, so a frequent class does not drown a rare one.
    """
    match, cls = _rtnet_terms(classify, generator, rtnet, real_embeddings, real_labels, multilabel, noise)
    return mmd_weight * match + cls


def _param_device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


class FRAugSteps:
    """One client's FRAug machinery: its generator copy, its RTNet and their optimisers.

    Typical use in a local training loop::

        steps = FRAugSteps(generator, rtnet, lr=1e-3, lambda_aug=1.0)
        for x, y in batches:
            emb = features(x)
            loss = task_loss(head(emb), y) + steps.extra_loss(head, y)          # step 1
            model_opt.zero_grad(); loss.backward(); model_opt.step()
            steps.after_step(head, emb, y)                                      # steps 2 and 3

    Load the server's averaged generator weights *in place* (``generator.load_state_dict``) so
    the optimiser keeps pointing at the same parameters.

    Parameters
    ----------
    generator : EmbeddingGenerator
        This client's copy of the shared generator.
    rtnet : RTNet
        This client's RTNet (kept local).
    lr : float, optional
        Adam learning rate of both (default 1e-3).
    lambda_aug : float, optional
        Weight of step 1's augmentation term (default 1).
    multilabel : bool, optional
        Sigmoid BCE (True) or softmax cross-entropy (False, default); see
        :func:`classification_loss`.
    mmd_weight : float, optional
        Weight of the MMD term in step 3 (default 1).
    seed : int, optional
        Seed of the noise and label-sampling generator (on the generator's device).
    num_samples : int, optional
        Synthetic embeddings per step 1 and step 2; the real batch's size when None.
    """

    def __init__(self, generator: EmbeddingGenerator, rtnet: RTNet, *, lr: float = 1e-3, lambda_aug: float = 1.0,
                 multilabel: bool = False, mmd_weight: float = 1.0, seed: int = 0, num_samples: int | None = None):
        if generator.embed_dim != rtnet.embed_dim or generator.num_classes != rtnet.num_classes:
            raise ValueError("generator and rtnet disagree on embed_dim or num_classes")
        self.generator, self.rtnet = generator, rtnet
        self.lambda_aug, self.multilabel = lambda_aug, multilabel
        self.mmd_weight, self.num_samples = mmd_weight, num_samples
        self.generator_optimizer = torch.optim.Adam(generator.parameters(), lr=lr)
        self.rtnet_optimizer = torch.optim.Adam(rtnet.parameters(), lr=lr)
        # One private stream for noise and sampled labels: reproducible, and independent of
        # torch's global generator, which the model's data pipeline consumes.
        self.noise = torch.Generator(device=_param_device(generator))
        self.noise.manual_seed(seed)

    @property
    def device(self) -> torch.device:
        """Device of the generator (and of the noise stream)."""
        return _param_device(self.generator)

    def sample_labels(self, labels: torch.Tensor, n: int | None = None) -> torch.Tensor:
        """``n`` labels drawn uniformly from the classes present in ``labels`` (default ``n = len(labels)``).

        Parameters
        ----------
        labels : torch.LongTensor
            The real batch's labels.
        n : int, optional
            How many to draw.

        Returns
        -------
        torch.LongTensor
            Shape ``(n,)``, on :attr:`device`; empty when ``labels`` is.
        """
        classes = labels.to(self.device).long().unique()
        n = (self.num_samples or labels.numel()) if n is None else n
        if classes.numel() == 0 or n == 0:
            return torch.zeros(0, dtype=torch.long, device=self.device)
        # Uniform over present classes rather than the batch's frequencies: the synthetic
        # embeddings then rebalance the classifier towards the rarer classes of the batch.
        return classes[torch.randint(classes.numel(), (n,), generator=self.noise, device=self.device)]

    def extra_loss(self, classify: Classify, labels: torch.Tensor) -> torch.Tensor:
        """Step 1's term ``lambda_aug * L_cls(h(R(G(z, y))), y)``, to add to the task loss.

        Parameters
        ----------
        classify : callable
            The model's classifier (gradients flow into it).
        labels : torch.LongTensor
            The real batch's labels (the synthetic ones are drawn from its classes).

        Returns
        -------
        torch.Tensor
            A scalar; a plain zero (no graph) when the batch has no labels or ``lambda_aug == 0``.
        """
        y = self.sample_labels(labels)
        if y.numel() == 0 or self.lambda_aug == 0:
            return torch.zeros((), device=labels.device)
        return self.lambda_aug * augmentation_loss(classify, self.generator, self.rtnet, y, self.multilabel, self.noise)

    @staticmethod
    def _step(loss: torch.Tensor, module: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        # Gradients with respect to this module's parameters only: the classifier is in the
        # graph (G and R learn *through* it) but autograd.grad writes no .grad anywhere, so the
        # model's gradients and optimiser are untouched by construction, whatever the classifier is.
        params = [p for p in module.parameters() if p.requires_grad]
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        optimizer.zero_grad(set_to_none=True)
        for p, g in zip(params, grads):
            p.grad = g
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)  # leave no stale gradients behind for checkpoints

    def after_step(self, classify: Classify, real_embeddings: torch.Tensor,
                   real_labels: torch.Tensor) -> dict[str, float]:
        """Steps 2 and 3: one Adam step of the generator, then one of the RTNet.

        Parameters
        ----------
        classify : callable
            The model's classifier, frozen here (called, never differentiated into).
        real_embeddings : torch.Tensor
            The batch's real embeddings, shape ``(n, D)`` (detached).
        real_labels : torch.LongTensor
            Their classes, shape ``(n,)``.

        Returns
        -------
        dict of str to float
            ``generator_loss``, ``rtnet_loss``, ``rtnet_mmd`` and ``rtnet_cls``; empty when the
            batch holds no labelled embedding (both steps are skipped).
        """
        if real_labels.numel() == 0 or real_embeddings.shape[0] == 0:
            return {}
        self.generator.train()
        self.rtnet.train()
        y = self.sample_labels(real_labels)
        g_loss = generator_loss(classify, self.generator, y, self.multilabel, self.noise)
        self._step(g_loss, self.generator, self.generator_optimizer)
        match, cls = _rtnet_terms(classify, self.generator, self.rtnet, real_embeddings, real_labels.to(self.device),
                                  self.multilabel, self.noise)
        r_loss = self.mmd_weight * match + cls
        self._step(r_loss, self.rtnet, self.rtnet_optimizer)
        return {"generator_loss": float(g_loss.detach()), "rtnet_loss": float(r_loss.detach()),
                "rtnet_mmd": float(match.detach()), "rtnet_cls": float(cls.detach())}

    def state_dict(self) -> dict:
        """The client-local state: RTNet weights, both optimisers and the noise stream.

        The generator's weights are not included: they are shared, and whoever averages them
        (the strategy) stores them.

        Returns
        -------
        dict
            Keys ``rtnet``, ``rtnet_optimizer``, ``generator_optimizer``, ``noise``.
        """
        return {"rtnet": self.rtnet.state_dict(), "rtnet_optimizer": self.rtnet_optimizer.state_dict(),
                "generator_optimizer": self.generator_optimizer.state_dict(), "noise": self.noise.get_state()}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned (the noise stream only if present).

        Parameters
        ----------
        state : dict
            As returned by :meth:`state_dict`.
        """
        self.rtnet.load_state_dict(state["rtnet"])
        self.rtnet_optimizer.load_state_dict(state["rtnet_optimizer"])
        self.generator_optimizer.load_state_dict(state["generator_optimizer"])
        if "noise" in state:
            self.noise.set_state(state["noise"])
