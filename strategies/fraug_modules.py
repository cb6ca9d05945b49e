"""The model-agnostic core of FRAug: a shared embedding generator, a local RTNet and their losses.

FRAug (Chen et al., ICCV 2023, "FRAug: Tackling Federated Learning with Non-IID Features via
Representation Augmentation", arXiv 2205.14900) augments each client's training in *embedding*
space. This module follows the authors' reference implementation (github.com/HaokunChen245/FRAug,
``users/user_FRAug.py``, ``networks.py``) and assumes only that the client's model splits into a
feature extractor ``f`` and a classifier ``h`` acting on embeddings of size ``D`` (here given as a
callable ``classify``: embeddings ``(n, D)`` -> logits ``(n, C)``):

* a **shared embedding generator** ``G(z, y)`` (:class:`EmbeddingGenerator`): noise ``z`` and a
  one-hot class ``y`` -> an embedding of size ``D``. Its weights travel with the model and are
  averaged by the server like the model's;
* a **local representation transformation network** ``R_k`` (:class:`RTNet`), which never leaves
  the client: ``R_k(G(z, y), e, y) = e + r(G(z, y), y)``, a residual computed from the generated
  embedding and *added to a real embedding* ``e`` of class ``y`` of client ``k`` (the paired
  sample of the batch, or the client's running class-mean embedding). The client-agnostic
  embedding thus becomes a client-specific perturbation of the client's own embeddings.

The synthetic embeddings come in two sets, averaged (the reference code's ``use_homo_label_aug=2``,
its setting on all three benchmarks): (a) one per real sample, with its label, on that sample's
embedding; (b) as many with classes drawn uniformly from the classes the client has seen, on the
client's class-mean embeddings (an EMA of the batches' class means, momentum 0.3).

Per local step, in this order (:class:`FRAugSteps` runs steps 2 and 3 and supplies step 1's term):

1. **model step**: ``task loss on the real batch + lambda_aug * L_cls(h(R_k(G(z, y), e, y)), y)``,
   with ``G``, ``R_k`` and ``e`` without gradient (:func:`augmentation_loss`): only the classifier
   ``h`` learns from the synthetic embeddings, the feature extractor from the real batch only;
2. **generator step**: ``L_cls(h(G(z, y)), y) - lambda_G * MMD(G(z, y), f(x))`` over classes drawn
   uniformly from all classes, with ``h`` frozen (:func:`generator_loss`): ``G`` learns
   class-discriminative embeddings while being pushed *away* from this client's real embeddings,
   so that what the server averages is client-agnostic;
3. **RTNet step**: ``lambda_R * MMD(R_k(.), e) - H(h(R_k(.)))`` with ``h`` and ``G`` frozen
   (:func:`rtnet_loss`): the transformed embeddings stay close to the client's real ones (MMD over
   the batch) while the classifier's prediction on them is made as uncertain as possible
   (maximal entropy ``H``): hard, client-styled samples near the decision boundary.

``L_cls`` is selectable (:func:`classification_loss`): softmax cross-entropy for classifiers, or
per-class sigmoid BCE against one-hot targets for detection heads that score classes
independently (YOLO's); ``H`` follows it (:func:`prediction_entropy`). Steps 2 and 3 take
gradients with :func:`torch.autograd.grad` with respect to ``G``'s or ``R_k``'s parameters only,
so nothing lands on the classifier's or the feature extractor's ``.grad`` and the model's
optimiser is never involved; the classifier itself is only *called* (if it holds BatchNorm layers
in train mode their running statistics would move, so pass a classifier without them, or in eval
mode).

Kept from the earlier reading and differing from the reference code (choices, not the method):
Adam (lr 1e-3) for ``G`` and ``R`` instead of SGD (lr 0.025-0.05, momentum 0.5); ``G`` is a
three-layer MLP with Gaussian noise and a linear output (reference: two layers with BatchNorm
and ReLU, uniform noise); ``r``'s last layer starts at zero (reference: random, with BatchNorm);
class-mean synthetic labels are drawn from the classes seen so far rather than from all classes
(the reference's class means start at zero); the augmentation weight is ``lambda_aug`` on top of
the task loss (reference: ``(1 - a) * task + a * aug`` with ``a = min(0.5, exp(g (t - T)))``,
0.5 throughout on Digits, i.e. ``lambda_aug = 1`` at half the learning rate).

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
    "prediction_entropy",
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
    """A client's representation transformation network ``R(g, y, base) = base + r(g, y)``.

    ``g`` is a generated embedding and ``base`` a real embedding of class ``y`` (the paper's
    residual form: the residual computed from ``g`` perturbs the client's own embedding); without
    ``base``, ``base = g``. The last layer of ``r`` starts at zero, so ``R`` starts as the
    identity on ``base``.

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

    def forward(self, emb: torch.Tensor, labels: torch.Tensor, base: torch.Tensor | None = None) -> torch.Tensor:
        """``base + r(emb, labels)`` (``base = emb`` when None).

        Parameters
        ----------
        emb : torch.Tensor
            Generated embeddings, shape ``(n, embed_dim)``.
        labels : torch.LongTensor
            Their classes, shape ``(n,)``.
        base : torch.Tensor, optional
            Real embeddings of the same classes, shape ``(n, embed_dim)``, that the residual is
            added to.

        Returns
        -------
        torch.Tensor
            Shape ``(n, embed_dim)``.
        """
        residual = self.net(torch.cat([emb, _one_hot(labels, self.num_classes, emb.dtype)], dim=1))
        return (emb if base is None else base.to(emb.dtype)) + residual


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


def prediction_entropy(logits: torch.Tensor, multilabel: bool) -> torch.Tensor:
    """Mean entropy of the classifier's predictions, the quantity the RTNet maximises.

    Parameters
    ----------
    logits : torch.Tensor
        Shape ``(n, C)``.
    multilabel : bool
        False: entropy of the softmax distribution. True: the Bernoulli entropies of the
        per-class sigmoids, summed over classes (as :func:`classification_loss` sums its BCE).

    Returns
    -------
    torch.Tensor
        A scalar, averaged over samples; zero (attached to ``logits``' graph) when ``n == 0``.
    """
    if logits.shape[0] == 0:
        return _zero_like_graph(logits)
    if multilabel:
        p, logp, log1mp = torch.sigmoid(logits), F.logsigmoid(logits), F.logsigmoid(-logits)
        return -(p * logp + (1 - p) * log1mp).sum(1).mean()
    return -(F.softmax(logits, dim=1) * F.log_softmax(logits, dim=1)).sum(1).mean()


def augmentation_loss(classify: Classify, generator: EmbeddingGenerator, rtnet: RTNet | None, labels: torch.Tensor,
                      multilabel: bool, noise: torch.Generator | None = None,
                      base: torch.Tensor | None = None) -> torch.Tensor:
    """Step 1's extra term: the classifier's loss on ``R(G(z, y), base, y)``, gradient to the classifier only.

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
    base : torch.Tensor, optional
        Real embeddings ``(n, D)`` of classes ``labels`` that the RTNet's residual is added to
        (detached here); None: the residual goes on ``G``'s output.

    Returns
    -------
    torch.Tensor
        A scalar (unweighted: the caller multiplies by ``lambda_aug``).
    """
    with torch.no_grad():  # G, R and the real embeddings are fixed here: only the classifier learns
        emb = generator(labels, noise)
        if rtnet is not None:
            emb = rtnet(emb, labels, None if base is None else base.detach())
    return classification_loss(classify(emb), labels, multilabel)


def generator_loss(classify: Classify, generator: EmbeddingGenerator, labels: torch.Tensor, multilabel: bool,
                   noise: torch.Generator | None = None, real_embeddings: torch.Tensor | None = None,
                   mmd_weight: float = 1.0) -> torch.Tensor:
    """Step 2: ``L_cls(h(G(z, y)), y) - mmd_weight * MMD(G(z, y), real)``, minimised over ``G``.

    The MMD is *subtracted* (the reference code: "maximize the distance between real and fake"):
    the shared generator must produce embeddings the classifier recognises without imitating any
    one client's embeddings. The MMD is between the two whole samples (the classes of ``labels``
    need not be those of the real batch).

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
    real_embeddings : torch.Tensor, optional
        The client's real embeddings ``(m, D)`` (detached here); None: no MMD term.
    mmd_weight : float, optional
        ``lambda_G`` (default 1, the reference's value on Digits).

    Returns
    -------
    torch.Tensor
        A scalar.
    """
    fake = generator(labels, noise)
    loss = classification_loss(classify(fake), labels, multilabel)
    if real_embeddings is not None and mmd_weight:
        loss = loss - mmd_weight * mmd(fake, real_embeddings.detach().to(fake.dtype))
    return loss


def _rtnet_terms(classify: Classify, generator: EmbeddingGenerator, rtnet: RTNet, base: torch.Tensor,
                 labels: torch.Tensor, multilabel: bool, noise: torch.Generator | None):
    # (MMD(R(G(z, y), base, y), base), entropy of h on it), one synthetic embedding per base row.
    base = base.detach()  # the feature extractor is not trained by R's objective
    labels = labels.to(base.device).long()
    if labels.numel() == 0:
        zero = _zero_like_graph(base)
        return zero, zero
    with torch.no_grad():  # G is fixed in R's step; R learns the residual it adds to real embeddings
        fake = generator(labels, noise)
    out = rtnet(fake, labels, base)
    return mmd(out, base.to(out.dtype)), prediction_entropy(classify(out), multilabel)


def rtnet_loss(classify: Classify, generator: EmbeddingGenerator, rtnet: RTNet, real_embeddings: torch.Tensor,
               real_labels: torch.Tensor, multilabel: bool, mmd_weight: float = 1.0,
               noise: torch.Generator | None = None) -> torch.Tensor:
    """Step 3: ``mmd_weight * MMD(R, real) - H(h(R))`` with ``R = R(G(z, y), real, y)``, minimised over ``R``.

    One synthetic embedding per real one, with its label, its residual added to it; the MMD is
    over the batch and ``H`` is :func:`prediction_entropy` (maximised: hard samples).

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
        ``lambda_R``, weight of the MMD term (default 1, the reference's value on PACS).
    noise : torch.Generator, optional
        Source of the generator's noise.

    Returns
    -------
    torch.Tensor
        A scalar; zero when the batch is empty.
    """
    match, entropy = _rtnet_terms(classify, generator, rtnet, real_embeddings, real_labels, multilabel, noise)
    return mmd_weight * match - entropy


def _param_device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


class FRAugSteps:
    """One client's FRAug machinery: its generator copy, its RTNet, their optimisers, its class means.

    Typical use in a local training loop::

        steps = FRAugSteps(generator, rtnet, lr=1e-3, lambda_aug=1.0)
        for x, y in batches:
            emb = features(x)
            loss = task_loss(head(emb), y) + steps.extra_loss(head, y, emb)     # step 1
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
        ``lambda_R``, weight of the MMD term in step 3 (default 1).
    seed : int, optional
        Seed of the noise and label-sampling generator (on the generator's device).
    num_samples : int, optional
        Class-mean synthetic embeddings per step 1 and step 3, and generator samples per step 2;
        the real batch's size when None.
    generator_mmd_weight : float, optional
        ``lambda_G``, weight of the (subtracted) MMD term in step 2 (default 1).
    class_mean_momentum : float, optional
        EMA momentum of the class-mean embeddings (default 0.3, the reference's).
    """

    def __init__(self, generator: EmbeddingGenerator, rtnet: RTNet, *, lr: float = 1e-3, lambda_aug: float = 1.0,
                 multilabel: bool = False, mmd_weight: float = 1.0, seed: int = 0, num_samples: int | None = None,
                 generator_mmd_weight: float = 1.0, class_mean_momentum: float = 0.3):
        if generator.embed_dim != rtnet.embed_dim or generator.num_classes != rtnet.num_classes:
            raise ValueError("generator and rtnet disagree on embed_dim or num_classes")
        if not 0.0 < class_mean_momentum <= 1.0:
            raise ValueError("class_mean_momentum must be in (0, 1]")
        self.generator, self.rtnet = generator, rtnet
        self.lambda_aug, self.multilabel = lambda_aug, multilabel
        self.mmd_weight, self.num_samples = mmd_weight, num_samples
        self.generator_mmd_weight, self.class_mean_momentum = generator_mmd_weight, class_mean_momentum
        self.generator_optimizer = torch.optim.Adam(generator.parameters(), lr=lr)
        self.rtnet_optimizer = torch.optim.Adam(rtnet.parameters(), lr=lr)
        # One private stream for noise and sampled labels: reproducible, and independent of
        # torch's global generator, which the model's data pipeline consumes.
        self.noise = torch.Generator(device=_param_device(generator))
        self.noise.manual_seed(seed)
        dtype = next(generator.parameters()).dtype
        self.class_means = torch.zeros(generator.num_classes, generator.embed_dim, dtype=dtype, device=self.device)
        self.class_seen = torch.zeros(generator.num_classes, dtype=torch.bool, device=self.device)

    @property
    def device(self) -> torch.device:
        """Device of the generator (and of the noise stream)."""
        return _param_device(self.generator)

    def _draw(self, classes: torch.Tensor, n: int) -> torch.Tensor:
        if classes.numel() == 0 or n == 0:
            return torch.zeros(0, dtype=torch.long, device=self.device)
        return classes[torch.randint(classes.numel(), (n,), generator=self.noise, device=self.device)]

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
        n = (self.num_samples or labels.numel()) if n is None else n
        return self._draw(labels.to(self.device).long().unique(), n)

    def _sample_seen(self, n: int) -> torch.Tensor:
        return self._draw(self.class_seen.nonzero().flatten(), n)

    @torch.no_grad()
    def update_class_means(self, real_embeddings: torch.Tensor, real_labels: torch.Tensor) -> None:
        """EMA update of the client's class-mean embeddings with this batch's class means.

        Parameters
        ----------
        real_embeddings : torch.Tensor
            Shape ``(n, D)``.
        real_labels : torch.LongTensor
            Shape ``(n,)``.
        """
        labels = real_labels.to(self.device).long()
        if labels.numel() == 0:
            return
        emb = real_embeddings.detach().to(self.device, self.class_means.dtype)
        one_hot = _one_hot(labels, self.generator.num_classes, emb.dtype)
        counts = one_hot.sum(0)
        present = counts > 0
        batch_means = (one_hot.T @ emb)[present] / counts[present, None]
        # A class seen for the first time takes its batch mean; afterwards the EMA.
        momentum = torch.where(self.class_seen[present], self.class_mean_momentum, 1.0)[:, None]
        self.class_means[present] = (1 - momentum) * self.class_means[present] + momentum * batch_means
        self.class_seen |= present

    def extra_loss(self, classify: Classify, labels: torch.Tensor,
                   real_embeddings: torch.Tensor | None = None) -> torch.Tensor:
        """Step 1's term ``lambda_aug * L_cls(h(R(G(z, y), e, y)), y)``, to add to the task loss.

        Parameters
        ----------
        classify : callable
            The model's classifier (gradients flow into it).
        labels : torch.LongTensor
            The real batch's labels.
        real_embeddings : torch.Tensor, optional
            The batch's real embeddings (detached here). Given: the mean of the term on the
            batch's own embeddings (one synthetic embedding per real one, same label) and on the
            class-mean embeddings (classes drawn from those seen so far), as in the paper's
            code. None: the residual goes on ``G``'s output, with classes drawn from ``labels``.

        Returns
        -------
        torch.Tensor
            A scalar; a plain zero (no graph) when the batch has no labels or ``lambda_aug == 0``.
        """
        if labels.numel() == 0 or self.lambda_aug == 0:
            return torch.zeros((), device=labels.device)
        if real_embeddings is None:
            y = self.sample_labels(labels)
            return self.lambda_aug * augmentation_loss(classify, self.generator, self.rtnet, y, self.multilabel,
                                                       self.noise)
        y = labels.to(self.device).long()
        term = augmentation_loss(classify, self.generator, self.rtnet, y, self.multilabel, self.noise,
                                 base=real_embeddings.to(self.device))
        y_mean = self._sample_seen(self.num_samples or labels.numel())
        if y_mean.numel():
            term = 0.5 * (term + augmentation_loss(classify, self.generator, self.rtnet, y_mean, self.multilabel,
                                                   self.noise, base=self.class_means[y_mean]))
        return self.lambda_aug * term

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
        """Class means update, then steps 2 and 3: one Adam step of the generator, then one of the RTNet.

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
            ``generator_loss``, ``rtnet_loss``, ``rtnet_mmd`` and ``rtnet_cls`` (the negated
            entropy the RTNet minimises); empty when the batch holds no labelled embedding (both
            steps are skipped).
        """
        if real_labels.numel() == 0 or real_embeddings.shape[0] == 0:
            return {}
        self.generator.train()
        self.rtnet.train()
        real = real_embeddings.detach().to(self.device)
        labels = real_labels.to(self.device).long()
        self.update_class_means(real, labels)
        n = self.num_samples or labels.numel()
        all_classes = torch.arange(self.generator.num_classes, device=self.device)
        g_loss = generator_loss(classify, self.generator, self._draw(all_classes, n), self.multilabel, self.noise,
                                real_embeddings=real, mmd_weight=self.generator_mmd_weight)
        self._step(g_loss, self.generator, self.generator_optimizer)
        match, entropy = _rtnet_terms(classify, self.generator, self.rtnet, real, labels, self.multilabel, self.noise)
        y_mean = self._sample_seen(n)
        means = self.class_means[y_mean]
        match_m, entropy_m = _rtnet_terms(classify, self.generator, self.rtnet, means, y_mean, self.multilabel,
                                          self.noise)
        match, entropy = 0.5 * (match + match_m), 0.5 * (entropy + entropy_m)
        r_loss = self.mmd_weight * match - entropy
        self._step(r_loss, self.rtnet, self.rtnet_optimizer)
        return {"generator_loss": float(g_loss.detach()), "rtnet_loss": float(r_loss.detach()),
                "rtnet_mmd": float(match.detach()), "rtnet_cls": float(-entropy.detach())}

    def state_dict(self) -> dict:
        """The client-local state: RTNet weights, both optimisers, the noise stream, the class means.

        The generator's weights are not included: they are shared, and whoever averages them
        (the strategy) stores them.

        Returns
        -------
        dict
            Keys ``rtnet``, ``rtnet_optimizer``, ``generator_optimizer``, ``noise``,
            ``class_means``, ``class_seen``.
        """
        return {"rtnet": self.rtnet.state_dict(), "rtnet_optimizer": self.rtnet_optimizer.state_dict(),
                "generator_optimizer": self.generator_optimizer.state_dict(), "noise": self.noise.get_state(),
                "class_means": self.class_means.detach().cpu().clone(), "class_seen": self.class_seen.cpu().clone()}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned (the noise stream and class means only if present).

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
        if "class_means" in state:
            self.class_means = state["class_means"].to(self.device, self.class_means.dtype).clone()
            self.class_seen = state["class_seen"].to(self.device, torch.bool).clone()
