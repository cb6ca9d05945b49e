"""The phase plan of a run, as data: every warm-up epoch and round is one :class:`Step`.

Pure (no Flower, no torch): the ServerApp walks the steps; tests read them. A method is a list
of (phase, rounds) after the warm-up; a phase says who trains what, what travels and whether the
orthogonality regulariser is on. Step indices are global and 1-based (warm-up epochs first), so a
checkpoint is "the last step done" and resuming is "continue at the next index".
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

ALL_GROUPS = ("backbone", "neck", "head")


@dataclass(frozen=True)
class PhaseSpec:
    """What happens in each round of a phase.

    Parameters
    ----------
    name : str
        ``phase1``, ``phase2``, ``ssfl`` or ``server`` (a round without clients).
    clients : bool
        Whether sampled clients train (on pseudo labels) this round.
    client_groups : tuple of str
        Parameter groups clients train; the others are frozen (BatchNorm in eval mode).
    upload_groups : tuple of str
        Groups whose tensors clients upload and the server averages into its model.
    orthogonality : bool
        Whether server and clients add the orthogonality regulariser (neck and head).
    """

    name: str
    clients: bool
    client_groups: tuple[str, ...]
    upload_groups: tuple[str, ...]
    orthogonality: bool


PHASES = {
    # FedSTO phase 1: selective training. Clients train and send the backbone only.
    "phase1": PhaseSpec("phase1", True, ("backbone",), ("backbone",), False),
    # FedSTO phase 2: full-parameter training with orthogonal enhancement on both sides.
    "phase2": PhaseSpec("phase2", True, ALL_GROUPS, ALL_GROUPS, True),
    # SSFL baseline: everything trains and travels every round, no regulariser.
    "ssfl": PhaseSpec("ssfl", True, ALL_GROUPS, ALL_GROUPS, False),
    # Baselines without clients: a round is a supervised server epoch.
    "server": PhaseSpec("server", False, (), (), False),
}

METHOD_LABELS = {"partial": "server", "full": "all", "ssfl": "server", "fedsto-st": "server", "fedsto": "server"}


def method_phases(method: str, phase1_rounds: int, phase2_rounds: int) -> list[tuple[str, int]]:
    """The (phase, rounds) list of a method after its warm-up.

    ``partial`` and ``full`` get as many server epochs as FedSTO's rounds (compute-matched);
    ``ssfl`` as many rounds as FedSTO; ``fedsto-st`` stops after phase 1.
    """
    total = phase1_rounds + phase2_rounds
    table = {
        "partial": [("server", total)],
        "full": [("server", total)],
        "ssfl": [("ssfl", total)],
        "fedsto-st": [("phase1", phase1_rounds)],
        "fedsto": [("phase1", phase1_rounds), ("phase2", phase2_rounds)],
    }
    if method not in table:
        raise ValueError(f"unknown method {method!r}; expected one of {', '.join(table)}")
    return [(p, n) for p, n in table[method] if n > 0]


@dataclass(frozen=True)
class Step:
    """One unit of work: a warm-up epoch or a round.

    Attributes
    ----------
    index : int
        Global 1-based position in the plan (the checkpoint counter).
    kind : str
        ``warmup`` or ``round``.
    phase : PhaseSpec or None
        None for warm-up epochs.
    round : int
        Global 1-based round number (0 for warm-up epochs).
    phase_round : int
        1-based position within the warm-up or the phase.
    server_epochs : int
        Supervised server epochs in this step (1 per warm-up step).
    evaluate : bool
        Whether the server model is evaluated after this step.
    """

    index: int
    kind: str
    phase: PhaseSpec | None
    round: int
    phase_round: int
    server_epochs: int
    evaluate: bool

    @property
    def phase_name(self) -> str:
        return "warmup" if self.phase is None else self.phase.name

    @property
    def clients(self) -> bool:
        return self.phase is not None and self.phase.clients

    @property
    def orthogonality(self) -> bool:
        return self.phase is not None and self.phase.orthogonality

    @property
    def label(self) -> str:
        if self.kind == "warmup":
            return f"warm-up epoch {self.phase_round}"
        return f"round {self.round} ({self.phase_name} {self.phase_round})"

    def as_dict(self) -> dict:
        out = asdict(self)
        out["phase"] = self.phase_name
        return out


@dataclass(frozen=True)
class Plan:
    """The whole run: method, labels used by the server, and the ordered steps."""

    method: str
    labels: str
    steps: tuple[Step, ...]

    @property
    def warmup_epochs(self) -> int:
        return sum(1 for s in self.steps if s.kind == "warmup")

    def remaining(self, done: int) -> tuple[Step, ...]:
        """Steps after the last completed one (``done`` = its index; 0 = none done)."""
        return tuple(s for s in self.steps if s.index > done)

    def describe(self) -> list[tuple[str, int, str]]:
        """Rows ``(stage, length, what happens)`` for logs and docs."""
        rows: list[tuple[str, int, str]] = []
        if self.warmup_epochs:
            rows.append(("warmup", self.warmup_epochs, f"server epochs on {self.labels} labels"))
        for s in self.steps:
            if s.kind != "round" or s.phase_round != 1:
                continue
            n = sum(1 for t in self.steps if t.kind == "round" and t.phase_name == s.phase_name)
            p = s.phase
            what = (f"clients train {'+'.join(p.client_groups)}, upload {'+'.join(p.upload_groups)}; " if p.clients else "")
            what += f"{s.server_epochs} server epoch(s)" + ("; orthogonality on server and clients" if p.orthogonality else "")
            rows.append((s.phase_name, n, what))
        return rows


def build_plan(method: str, warmup_epochs: int, phase1_rounds: int, phase2_rounds: int,
               server_epochs: int = 1, eval_every: int = 1) -> Plan:
    """Expand a method into its steps.

    Parameters
    ----------
    method : str
        One of ``partial``, ``full``, ``ssfl``, ``fedsto-st``, ``fedsto``.
    warmup_epochs, phase1_rounds, phase2_rounds : int
        Lengths of the stages (see :func:`method_phases` for how each method uses them).
    server_epochs : int
        Supervised server epochs per round (the baselines' rounds are exactly these epochs).
    eval_every : int
        Evaluate every N rounds; the end of the warm-up and the last step are always evaluated.

    Returns
    -------
    Plan
    """
    if eval_every < 1:
        raise ValueError(f"eval_every must be >= 1, got {eval_every}")
    steps: list[Step] = []
    index = 0
    for epoch in range(1, warmup_epochs + 1):
        index += 1
        steps.append(Step(index, "warmup", None, 0, epoch, 1, epoch == warmup_epochs))
    rnd = 0
    for name, rounds in method_phases(method, phase1_rounds, phase2_rounds):
        spec = PHASES[name]
        # Baseline rounds must train something, or "compute-matched" would mean "idle".
        epochs = max(1, server_epochs) if not spec.clients else server_epochs
        for k in range(1, rounds + 1):
            index += 1
            rnd += 1
            steps.append(Step(index, "round", spec, rnd, k, epochs, rnd % eval_every == 0))
    if steps:
        last = steps[-1]
        steps[-1] = Step(last.index, last.kind, last.phase, last.round, last.phase_round, last.server_epochs, True)
    return Plan(method, METHOD_LABELS[method], tuple(steps))
