"""FRAug for detection: representation augmentation at the head's classification branch (ours).

FRAug (Chen et al., ICCV 2023) is a classification method: a shared embedding generator
``G(z, y)`` and a local representation transformation network (RTNet) make synthetic,
client-specific embeddings the classifier also learns from. This detection adaptation is ours:

* the *embedding* of an anchor is the input of its level's final 1x1 class convolution in the
  Ultralytics head (``Detect.cv3[i][-1]``); the *classifier* is that convolution, as a linear
  layer; with three levels, the classifier of a synthetic embedding is the mean of the three
  levels' logits (one shared ensemble, since a synthetic embedding has no level);
* the real embeddings and their classes are the assigner's positive anchors
  (:mod:`detection.loss_hooks`): reliable pseudo boxes on clients, ground truth on the server;
* losses use the head's per-class sigmoid BCE against one-hot targets;
* per step, as in the paper's code (see :mod:`strategies.fraug_modules`): the model trains on
  its detection loss plus ``lambda-aug`` x the classifier's loss on RTNet(G(z, y), e, y), the
  RTNet's residual added to the positive anchors' own embeddings ``e`` and to the node's running
  class-mean embeddings; then one generator step (the frozen classifier must recognise G(z, y)
  as y, minus the MMD to the real embeddings: G is pushed away from this node's embeddings);
  then one RTNet step (MMD to the real embeddings minus the entropy of the frozen classifier's
  scores on the transformed ones).

What travels: the generator's weights, beside the model (averaged by FedAvg, example-weighted);
the RTNet, both Adam states, the noise stream and the class-mean embeddings stay on the node's
disk and never travel. The server runs the
same steps on its labelled images in every server epoch (its own RTNet, kept in the checkpoint).

Per FedSTO phase: in phase 1 the head is frozen, so the augmentation term trains nothing of the
model; the generator and the RTNet still learn from the (changing) backbone's embeddings. In
phase 2 and in ``ssfl`` the classifier learns from the synthetic embeddings as well.
"""

from __future__ import annotations

import torch

from detection.loss_hooks import LossContext, LossHook
from detection.seeds import derive_seed
from strategies.base import StrategyOption
from strategies.fedavg import FedAvgStrategy
from strategies.fraug_modules import EmbeddingGenerator, FRAugSteps, RTNet

GENERATOR = "generator."  # prefix of the generator's tensors among the extra arrays
SERVER_STREAM = 0xF4A6


def head_dims(model: torch.nn.Module) -> tuple[int, int]:
    """(classes, embedding size) of an Ultralytics detection head."""
    last = model.model[-1].cv3[0][-1]
    return int(last.out_channels), int(last.in_channels)


def classifier_of(model: torch.nn.Module):
    """The classify callable: embeddings ``(n, D)`` -> mean over levels of each level's class logits."""
    convs = [branch[-1] for branch in model.model[-1].cv3]

    def classify(embeddings: torch.Tensor) -> torch.Tensor:
        logits = [torch.nn.functional.linear(embeddings, c.weight.flatten(1), c.bias) for c in convs]
        return torch.stack(logits).mean(0)

    return classify


class FRAugLoss(LossHook):
    """Step 1 in the loss, steps 2 and 3 after each optimiser step (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, generator_state: dict, local: dict, lr: float, lambda_aug: float,
                 seed: int) -> None:
        super().__init__(needs_features=True, needs_assignment=True)
        self.model, self.generator_state, self.local = model, generator_state, local
        self.lr, self.lambda_aug, self.seed = lr, lambda_aug, seed
        self.steps: FRAugSteps | None = None
        self._real: tuple[torch.Tensor, torch.Tensor] | None = None

    def _build(self, device: torch.device) -> FRAugSteps:
        nc, dim = head_dims(self.model)
        generator, rtnet = EmbeddingGenerator(nc, dim).to(device), RTNet(nc, dim).to(device)
        generator.load_state_dict(self.generator_state)
        steps = FRAugSteps(generator, rtnet, lr=self.lr, lambda_aug=self.lambda_aug, multilabel=True, seed=self.seed)
        if self.local:
            steps.load_state_dict(self.local)
        return steps

    def loss(self, context: LossContext):
        assignment = context.assignment
        embeddings = context.class_embeddings()
        if self.steps is None:
            self.steps = self._build(embeddings.device)
        fg = assignment.fg_mask
        self._real = (embeddings[fg].detach(), assignment.labels[fg])
        if self._real[1].numel() == 0:
            return None, {}
        term = self.steps.extra_loss(classifier_of(context.model), self._real[1], self._real[0])
        return term, {"fraug_aug": float(term.detach())}

    def after_step(self, context: LossContext):
        if self.steps is None or self._real is None:
            return {}
        return {f"fraug_{k}": v for k, v in self.steps.after_step(classifier_of(context.model), *self._real).items()}

    def generator_arrays(self) -> dict[str, torch.Tensor]:
        state = self.steps.generator.state_dict() if self.steps is not None else self.generator_state
        return {GENERATOR + k: v.detach().to("cpu", copy=True) for k, v in state.items()}

    def local_state(self) -> dict:
        return self.steps.state_dict() if self.steps is not None else dict(self.local)


class FRAugStrategy(FedAvgStrategy):
    """FedAvg of the model and of FRAug's shared generator; each node keeps its RTNet.

    Parameters
    ----------
    lambda_aug : float (default: 0.1)
        Weight of the classifier's loss on synthetic embeddings in the model's loss.
    lr : float (default: 0.001)
        Adam learning rate of the generator and the RTNet.
    """

    name = "fraug"
    description = "FedAvg plus FRAug representation augmentation at the class branch (Chen et al., ICCV 2023; detection adaptation ours)"
    options = (StrategyOption("lambda-aug", float, 0.1, "weight of the synthetic-embedding class loss"),
               StrategyOption("lr", float, 1e-3, "Adam learning rate of generator and RTNet"))

    def __init__(self, lambda_aug: float = 0.1, lr: float = 1e-3) -> None:
        super().__init__()
        self.lambda_aug, self.lr = lambda_aug, lr
        self.generator_state: dict[str, torch.Tensor] = {}
        self.server_local: dict = {}
        self._server_hook: FRAugLoss | None = None
        self._client_hook: FRAugLoss | None = None

    # -- server --------------------------------------------------------------------------------

    def setup(self, model: torch.nn.Module) -> None:
        if not self.generator_state:
            nc, dim = head_dims(model)
            with torch.random.fork_rng():
                torch.manual_seed(derive_seed(0, SERVER_STREAM))
                self.generator_state = EmbeddingGenerator(nc, dim).state_dict()

    def server_arrays(self):
        self._take_server_hook()
        return self._prefixed()

    def _prefixed(self):
        return {GENERATOR + k: v.detach().to("cpu", copy=True) for k, v in self.generator_state.items()}

    def load_server_arrays(self, aggregate):
        self.generator_state = {k[len(GENERATOR):]: torch.as_tensor(v).to(torch.float32) for k, v in aggregate.items()
                                if k.startswith(GENERATOR)}

    def server_loss(self, model):
        self._take_server_hook()
        self._server_hook = FRAugLoss(model, self.generator_state, self.server_local, self.lr, self.lambda_aug,
                                      derive_seed(0, SERVER_STREAM))
        return self._server_hook

    def _take_server_hook(self) -> None:
        """Fold the last server epoch's generator and RTNet back into this strategy's state."""
        if self._server_hook is not None and self._server_hook.steps is not None:
            self.generator_state = {k[len(GENERATOR):]: v for k, v in self._server_hook.generator_arrays().items()}
            self.server_local = self._server_hook.local_state()
        self._server_hook = None

    def state_dict(self):
        self._take_server_hook()
        return {"generator": dict(self.generator_state), "server_local": self.server_local}

    def load_state_dict(self, state):
        if state:
            self.generator_state, self.server_local = dict(state["generator"]), state.get("server_local", {})

    # -- client --------------------------------------------------------------------------------

    def client_load(self, model, broadcast, extra, local):
        super().client_load(model, broadcast, extra, local)
        self.generator_state = {k[len(GENERATOR):]: torch.as_tensor(v) for k, v in extra.items() if k.startswith(GENERATOR)}
        self.client_local = dict(local.get("fraug", {}))

    def client_loss(self, model, instructions):
        self._client_hook = FRAugLoss(model, self.generator_state, self.client_local, self.lr, self.lambda_aug,
                                      derive_seed(instructions.seed, instructions.server_round, SERVER_STREAM))
        return self._client_hook

    def client_state(self, model):
        return {"fraug": self._client_hook.local_state()} if self._client_hook is not None else {}

    def client_arrays(self):
        return self._client_hook.generator_arrays() if self._client_hook is not None else self._prefixed()
