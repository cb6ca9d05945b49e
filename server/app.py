"""The Flower ServerApp: parse the run config and hand the grid to :class:`server.runner.FederatedRun`.

``flwr run . local --run-config presets/demo.toml`` lands here. The run's own verdict goes to
``<run dir>/result.json``; an exception from ``main`` also marks the Flower run ``failed``.
"""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from server.config import RunConfig
from server.ray_recovery import install_actor_replacement
from server.runner import FederatedRun

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the configured method (see ``server.plan``) to the end, or raise."""
    cfg = RunConfig.from_run_config(context.run_config)
    install_actor_replacement()  # simulation: this thread shares its process with Flower's Ray backend
    FederatedRun(grid, cfg).run()
