"""Make Ultralytics safe to import offline, before anything imports it.

Ultralytics keeps global settings in a user config dir with ``sync`` and tracker integrations on,
and its dataset checks fetch ``Arial.ttf`` from the web even with plots off. We point it at a
project-owned config dir, switch those off, and provide the font from matplotlib, so no weight,
font or package is ever downloaded. Imported by ``detection/__init__.py``, so ``import detection``
is enough.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def fedsto_home() -> Path:
    """Project-owned cache folder (``$FEDSTO_HOME``, default ``~/.cache/fedsto``)."""
    return Path(os.environ.get("FEDSTO_HOME", Path.home() / ".cache" / "fedsto")).expanduser()


def _provide_font(user_config_dir: Path) -> None:
    target = user_config_dir / "Arial.ttf"
    if target.exists():
        return
    import matplotlib

    source = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    user_config_dir.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(f".{os.getpid()}.tmp")
    shutil.copyfile(source, tmp)
    os.replace(tmp, target)  # atomic: parallel Ray workers may race here


def configure_ultralytics() -> None:
    """Point Ultralytics at a project-owned, offline, quiet configuration (idempotent)."""
    config_dir = Path(os.environ.setdefault("YOLO_CONFIG_DIR", str(fedsto_home() / "ultralytics")))
    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("YOLO_VERBOSE", "False")
    os.environ.setdefault("YOLO_AUTOINSTALL", "False")
    _provide_font(config_dir / "Ultralytics")

    from ultralytics.utils import SETTINGS

    wanted = dict(sync=False, clearml=False, comet=False, dvc=False, mlflow=False, raytune=False,
                  tensorboard=False, wandb=False, vscode_msg=False, openvino_msg=False)
    if any(SETTINGS.get(k) != v for k, v in wanted.items()):
        SETTINGS.update(wanted)


configure_ultralytics()
