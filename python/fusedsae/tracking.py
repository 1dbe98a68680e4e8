"""Experiment tracking: :class:`~fusedsae.Trainer` callbacks that send every logged metrics dict to Weights & Biases
or TensorBoard, under the names of ``metrics.jsonl`` (``loss``, ``mse_loss``, ``fvu``, ``l0``, ``dead_fraction``,
``lr``, ``tokens``…, at x = ``step``), with the run's configuration.

A callback is any ``callback(metrics: dict) -> None``; the trainer calls it on rank 0 each time it logs, and calls
its ``close()``, when it has one, once when ``train()`` returns or raises. Both trackers work without a network:
TensorBoard writes event files; W&B runs offline (``wandb sync`` uploads later) unless an API key is configured or
``WANDB_MODE`` says otherwise. Each library is an optional extra: ``pip install 'fusedsae[wandb]'`` or
``'fusedsae[tensorboard]'``.
"""

from __future__ import annotations

import json
import netrc
import os
from pathlib import Path
from typing import Any

TRACKERS = ("jsonl", "wandb", "tensorboard")


def _scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """The numeric entries of a metrics dict except ``step`` (the x axis), as floats; booleans and text are left
    out (neither tracker plots them)."""
    return {
        key: float(value)
        for key, value in metrics.items()
        if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)
    }


class TensorBoardLogger:
    """Writes each metric as a TensorBoard scalar (tag = the metrics.jsonl key, x = ``step``) to event files in
    ``log_dir``; the run config is stored once as JSON text under the tag ``config``.

    ``resume_step``: a resumed run restarts from its checkpoint at that step, so the events a crashed run wrote for
    later steps are hidden (TensorBoard's ``purge_step``) and the curves show one history, as metrics.jsonl does.
    """

    def __init__(
        self,
        log_dir: str | os.PathLike[str],
        config: dict[str, Any] | None = None,
        resume_step: int | None = None,
    ) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise ImportError(
                "tensorboard logging needs the tensorboard package: pip install 'fusedsae[tensorboard]'"
            ) from exc
        self.log_dir = Path(log_dir)
        purge = None if resume_step is None else resume_step + 1
        self.writer = SummaryWriter(str(self.log_dir), purge_step=purge)
        if config and resume_step is None:
            # four leading spaces make TensorBoard's markdown show the JSON as a code block
            text = "\n".join("    " + line for line in json.dumps(config, indent=1, default=str).splitlines())
            self.writer.add_text("config", text, 0)

    def __call__(self, metrics: dict[str, Any]) -> None:
        step = int(metrics["step"])
        for key, value in _scalars(metrics).items():
            self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.writer.close()


def wandb_mode() -> str:
    """``WANDB_MODE`` when set; else ``"online"`` when an API key is configured (``WANDB_API_KEY`` or the netrc entry
    ``wandb login`` writes), otherwise ``"offline"``, so that a machine without an account never stops at a login
    prompt."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].rstrip("/")
        if netrc.netrc().authenticators(host):
            return "online"
    except (OSError, netrc.NetrcParseError):
        pass
    return "offline"


class WandbLogger:
    """Logs each metrics dict to a Weights & Biases run (``run.log(metrics, step=step)``, same keys as
    metrics.jsonl), with ``config`` as the run config.

    Args:
        project, name: of the W&B run.
        dir: where W&B keeps its files (``<dir>/wandb/…``).
        config: the run configuration (the CLI passes its ``run_config.json``).
        mode: ``"online"``, ``"offline"`` or ``"disabled"``; default :func:`wandb_mode`.
        run_id: the W&B run id; the CLI passes the fusedsae run's id, so a resumed run (same id) continues its W&B
            run (``resume="allow"``) instead of starting a second one. Steps logged after the checkpoint by the
            crashed attempt are logged again; W&B keeps the first value of a step.
        **init_kwargs: passed on to ``wandb.init`` (``entity``, ``tags``…).
    """

    def __init__(
        self,
        project: str = "fusedsae",
        name: str | None = None,
        dir: str | os.PathLike[str] | None = None,
        config: dict[str, Any] | None = None,
        mode: str | None = None,
        run_id: str | None = None,
        **init_kwargs: Any,
    ) -> None:
        try:
            import wandb
        except ImportError as exc:
            raise ImportError("wandb logging needs the wandb package: pip install 'fusedsae[wandb]'") from exc
        if dir is not None:
            Path(dir).mkdir(parents=True, exist_ok=True)
        self.mode = mode or wandb_mode()
        if run_id is not None:
            init_kwargs = {"id": run_id, "resume": "allow", **init_kwargs}
        self.run = wandb.init(
            project=project,
            name=name,
            dir=None if dir is None else str(dir),
            config=config,
            mode=self.mode,
            **init_kwargs,
        )

    @property
    def dir(self) -> Path:
        """The run's own folder (``…/wandb/offline-run-…`` offline; ``wandb sync`` it to upload)."""
        return Path(self.run.dir).parent

    def __call__(self, metrics: dict[str, Any]) -> None:
        self.run.log(_scalars(metrics), step=int(metrics["step"]))

    def close(self) -> None:
        self.run.finish()
