"""Step loggers: wandb (one run per job, offline by default), csv, none."""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path

from reft_lab.atomic import atomic_write
from reft_lab.errors import config_error


LOGGERS = ("wandb", "csv", "none")


@dataclass(kw_only=True)
class LoggerConfig:
    """``logger``: wandb (one run per job, grouped by sweep; offline by default, sync later with
    ``wandb sync``), csv (per-step metrics in <job dir>/train_log.csv) or none (metrics.json only)."""

    name: str = "wandb"
    mode: str = "offline"  # wandb only: offline | online | disabled
    project: str = "reft_lab"  # wandb only
    tags: list[str] = field(default_factory=list)  # wandb only

    def __post_init__(self):
        if self.name not in LOGGERS:
            raise config_error("logger", self.name, "wandb, csv or none")
        if self.mode not in ("offline", "online", "disabled"):
            raise config_error("logger.mode", self.mode, "offline, online or disabled")


class NullLogger:
    def log(self, step: int, values: dict) -> None:
        pass

    def summary(self, values: dict) -> None:
        pass

    def finish(self) -> None:
        pass


class CsvLogger(NullLogger):
    """Per-step rows in one CSV. A resumed job continues the file: the rows before its first step
    stay, the rows a killed run wrote after its last checkpoint are replaced by the re-run steps."""

    def __init__(self, path: Path):
        self.path, self.file, self.writer = path, None, None

    def _earlier_rows(self, step: int) -> list[dict]:
        try:
            with open(self.path, newline="", encoding="utf-8") as f:
                return [row for row in csv.DictReader(f) if row.get("step", "").isdigit() and int(row["step"]) < step]
        except (OSError, UnicodeDecodeError, csv.Error):
            return []

    def log(self, step: int, values: dict) -> None:
        row = {"step": step, **values}
        if self.writer is None:
            earlier, fields = self._earlier_rows(step), list(row)

            def start(tmp: str) -> None:  # atomically: a kill here leaves the old file whole
                with open(tmp, "w", newline="", encoding="utf-8") as f:
                    writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
                    writer.writeheader()
                    writer.writerows(earlier)

            atomic_write(self.path, start)
            self.file = open(self.path, "a", newline="", encoding="utf-8")
            self.writer = csv.DictWriter(self.file, fieldnames=fields, extrasaction="ignore")
        self.writer.writerow(row)
        self.file.flush()

    def finish(self) -> None:
        if self.file:
            self.file.close()


class WandbLogger(NullLogger):
    def __init__(self, cfg: LoggerConfig, run_dir: Path, name: str, group: str, tags: list[str], config: dict):
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        self.wandb = wandb
        self.run = wandb.init(project=cfg.project, mode=cfg.mode, dir=str(run_dir), name=name, group=group,
                              tags=list(cfg.tags) + tags, config=config, reinit="finish_previous")

    def log(self, step: int, values: dict) -> None:
        self.run.log(values, step=step)

    def summary(self, values: dict) -> None:
        for key, value in values.items():
            if isinstance(value, (int, float, str, bool, dict)) or value is None:
                self.run.summary[key] = value

    def finish(self) -> None:
        self.run.finish()


def make_logger(cfg: LoggerConfig, run_dir: Path, name: str, group: str, tags: list[str], config: dict):
    if cfg.name == "csv":
        return CsvLogger(run_dir / "train_log.csv")
    if cfg.name == "wandb" and cfg.mode != "disabled":
        return WandbLogger(cfg, run_dir, name, group, tags, config)
    return NullLogger()
