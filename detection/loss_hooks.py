"""Extra loss terms that see more than the weights: the batch, the model outputs, the head's features.

The training loop (:func:`detection.train.run_steps`) calls a :class:`LossHook` once per step
with a :class:`LossContext`, and again after the optimiser step (for hooks with optimisers of
their own, such as FRAug's generator). What a context offers:

* ``batch`` and ``preds``: Ultralytics' batch dict and the model's raw outputs;
* ``head_inputs``: the feature maps entering the detection head (P3, P4, P5);
* ``class_embeddings()``: per-anchor embeddings of the head's classification branch (the input of
  each level's final 1x1 class convolution), flattened in the loss's anchor order;
* ``assignment``: target class and positive mask per anchor from the loss's task-aligned assigner
  (reliable pseudo boxes on clients, ground truth on the server).

Nothing here knows about federation: strategies build hooks, the engine only calls them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Assignment:
    """The assigner's positives of the last loss call: ``labels`` and ``fg_mask`` are ``(batch, anchors)``."""

    labels: torch.Tensor
    fg_mask: torch.Tensor


class AssignmentRecorder(torch.nn.Module):
    """Wraps a loss's assigner and keeps its last ``(labels, fg_mask)``; the outputs pass through unchanged."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.last: Assignment | None = None

    def forward(self, *args, **kwargs):
        out = self.inner(*args, **kwargs)
        labels, _, _, fg_mask = out[0], out[1], out[2], out[3]
        self.last = Assignment(labels.detach().long(), fg_mask.detach().bool())
        return out


def record_assignments(loss_fn) -> AssignmentRecorder:
    """Make ``loss_fn`` (an Ultralytics ``v8DetectionLoss``) keep its assignments; returns the recorder."""
    if not isinstance(loss_fn.assigner, AssignmentRecorder):
        loss_fn.assigner = AssignmentRecorder(loss_fn.assigner)
    return loss_fn.assigner


class HeadTap:
    """Forward hooks that keep the detection head's inputs and its class-branch embeddings.

    Parameters
    ----------
    model : DetectionModel
        An Ultralytics detection model (its last layer is the ``Detect`` head with ``cv3``).
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.head = model.model[-1]
        self.head_inputs: list[torch.Tensor] = []
        self.embeddings: list[torch.Tensor] = []
        self._handles = [self.head.register_forward_pre_hook(self._keep_inputs)]
        for branch in self.head.cv3:
            self._handles.append(branch[-1].register_forward_pre_hook(self._keep_embedding))

    def _keep_inputs(self, module, args):
        self.head_inputs = list(args[0])
        self.embeddings = []

    def _keep_embedding(self, module, args):
        self.embeddings.append(args[0])

    def classifiers(self) -> list[torch.nn.Conv2d]:
        """Each level's final 1x1 class convolution (the per-anchor linear classifier)."""
        return [branch[-1] for branch in self.head.cv3]

    def class_embeddings(self) -> torch.Tensor:
        """``(batch, anchors, channels)``: the class branch's embeddings in the loss's anchor order."""
        return torch.cat([e.flatten(2).transpose(1, 2) for e in self.embeddings], dim=1)

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


@dataclass
class LossContext:
    """What a :class:`LossHook` sees at one step (see the module docstring)."""

    model: torch.nn.Module
    batch: dict
    preds: object
    step: int
    tap: HeadTap | None = None
    recorder: AssignmentRecorder | None = None

    @property
    def head_inputs(self) -> list[torch.Tensor]:
        return self.tap.head_inputs if self.tap is not None else []

    def class_embeddings(self) -> torch.Tensor:
        return self.tap.class_embeddings()

    @property
    def assignment(self) -> Assignment | None:
        return self.recorder.last if self.recorder is not None else None


@dataclass
class LossHook:
    """An extra loss term for :func:`detection.train.run_steps` (base: adds nothing).

    Attributes
    ----------
    needs_features : bool
        Install a :class:`HeadTap` (head inputs, class embeddings) for this hook.
    needs_assignment : bool
        Record the loss's assignments (positives and their classes).
    """

    needs_features: bool = False
    needs_assignment: bool = False

    def loss(self, context: LossContext) -> tuple[torch.Tensor | None, dict[str, float]]:
        """The term to add to this step's loss (None: nothing) and items to log."""
        return None, {}

    def after_step(self, context: LossContext) -> dict[str, float]:
        """Runs after the optimiser step (e.g. a generator's own update); returns items to log."""
        return {}


def combine_hooks(*hooks: LossHook | None) -> LossHook | None:
    """One hook that runs several (None when there is none)."""
    active = [h for h in hooks if h is not None]
    if len(active) <= 1:
        return active[0] if active else None
    return _Combined(needs_features=any(h.needs_features for h in active),
                     needs_assignment=any(h.needs_assignment for h in active), hooks=active)


@dataclass
class _Combined(LossHook):
    hooks: list[LossHook] = field(default_factory=list)

    def loss(self, context):
        total, items = None, {}
        for h in self.hooks:
            term, more = h.loss(context)
            items.update(more)
            if term is not None:
                total = term if total is None else total + term
        return total, items

    def after_step(self, context):
        items = {}
        for h in self.hooks:
            items.update(h.after_step(context))
        return items
