"""``reft-lab train``: one job or a multirun sweep under Hydra.

``run`` checks that the output directory can be written and validates a single run (or a search's
base config) before Hydra starts, resumes an optuna study from its storage, and hands each job to
``job``: it skips a finished job of the same settings (refuses one of other settings), records the
job's ``.hydra/``, runs the recipe and records failures. In a multirun the other jobs go on and the
sweep exits non-zero at the end.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
from pathlib import Path

import torch
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf

from reft_lab import distributed
from reft_lab.atomic import atomic_write_text, check_writable, nearest_writable
from reft_lab.config import compose, conf_dir
from reft_lab.errors import ConfigError, ReftLabError
from reft_lab.metrics import lookup
from reft_lab.recipe import failed_metrics, run_job
from reft_lab.settings import RunSettings, check_threads
from reft_lab.training import Diverged, Interrupted


class TrialFailed(ReftLabError):
    """A search trial failed (recorded in its metrics.json); the sweeper marks the trial FAIL."""


FAILURE_LOG_ENV = "REFT_LAB_FAILURE_LOG"


def _completed(out: Path) -> dict | None:
    path = out / "metrics.json"
    try:
        metrics = json.loads(path.read_text(encoding="utf-8")) if path.exists() else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return metrics if metrics and metrics.get("status") == "ok" else None


def threads_per_job(hc, requested: int | None) -> int:
    """torch threads for one job, so parallel jobs never oversubscribe the cores: ``threads`` if
    set; joblib: cores ÷ n_jobs (2 cores, n_jobs=2 → 1 each); submitit (local or SLURM, which start
    every job at once): the launcher's cpus_per_task, else 1; the basic launcher: every core."""
    if requested:
        return requested
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    target = str(hc.launcher.get("_target_", "")).lower()
    if "submitit" in target:
        return int(hc.launcher.get("cpus_per_task") or 1)
    if "joblib" in target:
        n_jobs = hc.launcher.get("n_jobs") or -1
        return max(1, cores // (cores if n_jobs < 0 else n_jobs))
    return max(1, cores // distributed.local_processes())  # torchrun: processes share the cores


def _record_failure(line: str) -> None:
    """Failures of jobs in other processes (joblib, submitit) reach the sweep through this file."""
    log_path = os.environ.get(FAILURE_LOG_ENV)
    if log_path:
        with open(log_path, "a", encoding="utf-8") as f:
            f.write(line.replace("\n", " ") + "\n")


_validated: dict[str, RunSettings] = {}  # a single run's settings, checked before Hydra started


def _job_key(cfg: DictConfig) -> str | None:
    try:
        return OmegaConf.to_yaml(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=True)
    except Exception:  # noqa: BLE001  (an interpolation only Hydra's run can resolve: validate again there)
        return None


def _differences(done: dict, settings: RunSettings) -> list[str]:
    """How a finished job's recorded settings differ from ``settings`` (empty: the same run)."""
    try:
        before = RunSettings.from_cfg(OmegaConf.create(done.get("config") or {})).result_config()
    except (ConfigError, ValueError) as err:
        return [f"its recorded config does not validate here ({str(err).splitlines()[0]})"]
    after = settings.result_config()

    def flat(tree, prefix=""):
        if isinstance(tree, dict):
            return {k: v for key, sub in tree.items() for k, v in flat(sub, f"{prefix}{key}.").items()}
        return {prefix[:-1]: tree}

    old, new = flat(before), flat(after)
    keys = sorted(set(old) | set(new), key=lambda k: k.split(".", 1)[-1])
    return [f"{k.split('.', 1)[1]}: {old.get(k)!r} then, {new.get(k)!r} now" for k in keys if old.get(k) != new.get(k)]


def _record_config(cfg: DictConfig, out: Path) -> None:
    """``.hydra/`` of a job that runs (Hydra's own saving is off: it would rewrite a finished job's
    record before the job could decide to skip)."""
    from hydra.core.hydra_config import HydraConfig

    hydra_cfg = HydraConfig.instance().cfg
    for name, node in (("config.yaml", cfg), ("hydra.yaml", hydra_cfg), ("overrides.yaml", hydra_cfg.hydra.overrides.task)):
        atomic_write_text(out / ".hydra" / name, OmegaConf.to_yaml(node))


def job(cfg: DictConfig) -> float:
    """One Hydra job; returns ``optimized_metric`` for sweepers (NaN for a failed job)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hc = HydraConfig.get()
    out = Path(hc.runtime.output_dir)
    multirun = hc.mode == RunMode.MULTIRUN
    optuna_search = multirun and "optuna" in str(hc.sweeper.get("_target_", "")).lower()
    main_process = int(os.environ.get("RANK", "0")) == 0

    def give_up(err: BaseException, record: bool = True) -> float:
        """Record a failure (unless the directory holds a finished job), then end the way this mode needs."""
        if not main_process:
            raise err
        failed = failed_metrics(cfg, out, err) if record and out.is_dir() else {"error": str(err).splitlines()[0]}
        _record_failure(f"{out}: {failed['error']}")
        print(f"reft-lab train: job failed: {out}: {failed['error']}", file=sys.stderr)
        if isinstance(err, Interrupted):
            raise SystemExit(128 + err.signum) from None
        if optuna_search:
            raise TrialFailed(failed["error"]) from None  # the optuna sweeper records a FAIL trial
        if multirun:
            return float("nan")
        if isinstance(err, Diverged):
            raise SystemExit(1) from None
        if isinstance(err, ReftLabError):
            raise SystemExit(2) from None
        raise err

    try:
        check_threads(cfg.get("threads"))
        torch.set_num_threads(threads_per_job(hc, cfg.get("threads")))
        key = _job_key(cfg)
        settings = _validated.pop(key, None) if key is not None else None
        prevalidated = settings is not None
        settings = settings or RunSettings.from_cfg(cfg)
    except Exception as err:  # noqa: BLE001
        return give_up(err)
    done = _completed(out) if cfg.get("skip_completed", True) else None
    if done is not None:
        differs = _differences(done, settings)
        if differs:  # the finished job's results and record stay as they are
            return give_up(ConfigError(f"this directory holds a finished job with other settings ({'; '.join(differs[:3])}"
                                       f"{'; …' if len(differs) > 3 else ''}): its results are kept; use another "
                                       "hydra.run.dir / hydra.sweep.dir, or skip_completed=false to replace them"),
                           record=False)
        print(f"reft-lab train: {out} already has an ok metrics.json from these settings: skipped "
              "(skip_completed=false re-runs it)")
        value = lookup(done, cfg.optimized_metric)
        return float("nan" if value is None else value)
    try:
        check_writable(out, "job directory")
        if not prevalidated:
            settings.preflight()
        if main_process:
            _record_config(cfg, out)
        config = OmegaConf.to_container(cfg, resolve=True)
        config["model"]["dtype"] = settings.model.dtype  # model.dtype=auto as decided here: the record says what ran
        metrics = run_job(settings, config, out, Path(hc.sweep.dir).name if multirun else "single")
    except Exception as err:  # noqa: BLE001  (every failure is recorded; bugs re-raise in give_up)
        return give_up(err)
    if metrics is None:  # a non-main torchrun process: rank 0 reports
        return float("nan")
    value = float(lookup(metrics, cfg.optimized_metric))
    if not math.isfinite(value) and optuna_search:
        raise TrialFailed(f"{cfg.optimized_metric} is {value}")  # a failure for the search, not a result
    return value


def resume_search(cfg: DictConfig, args: list[str]) -> list[str] | None:
    """For an optuna search with sqlite storage: create the storage's folder, and run only the
    trials the study still lacks (``hydra.sweeper.n_trials`` is the study's total). None when the
    study is already complete."""
    sweeper = cfg.hydra.sweeper
    storage = str(sweeper.get("storage") or "")
    if not storage.startswith("sqlite:///"):
        return args
    Path(storage.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.load_study(study_name=sweeper.study_name, storage=storage)
    except KeyError:
        return args  # a new study
    done_states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL, optuna.trial.TrialState.PRUNED)
    finished = sum(t.state in done_states for t in study.trials)
    remaining = int(sweeper.n_trials) - finished
    if remaining <= 0:
        print(f"reft-lab train: study {sweeper.study_name!r} already has {finished} finished trials (n_trials={sweeper.n_trials})")
        return None
    print(f"reft-lab train: resuming study {sweeper.study_name!r}: {finished} trials finished, {remaining} to go")
    # a re-seeded sampler would repeat its first suggestions: offset the seed by the trials done
    seed = int(OmegaConf.select(cfg, "hydra.sweeper.sampler.seed", default=0) or 0) + finished
    return [*args, f"hydra.sweeper.n_trials={remaining}", f"hydra.sweeper.sampler.seed={seed}"]


FLAGS_WITH_VALUES = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn", "--config-dir",
                     "-cd", "--experimental-rerun"}
INSPECT_FLAGS = {"--cfg", "-c", "--help", "-h", "--hydra-help", "--info", "-i", "--resolve", "--shell-completion", "-sc"}


def _overrides(args: list[str]) -> list[str]:
    """The ``key=value`` overrides of a Hydra command line: flags, and the values they take, dropped."""
    out, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg in FLAGS_WITH_VALUES:
            skip = True
        elif not arg.startswith("-"):
            out.append(arg)
    return out


def _first_job(overrides: list[str]) -> list[str]:
    """A sweep's overrides for its first job, parsed by Hydra's own grammar: ``key=a,b`` → ``key=a``,
    ``key=range(1,4)`` → ``key=1``; a sweep that needs the config to expand (``glob``) is dropped."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    first = []
    for override in OverridesParser.create().parse_overrides(overrides):
        if not override.is_sweep_override():
            first.append(override.input_line)
            continue
        try:
            first.append(f"{override.get_key_element()}={next(override.sweep_string_iterator())}")
        except Exception:  # noqa: BLE001  (glob(...) expands against the config loader, not here)
            pass
    return first


def _dir_to_check(cfg: DictConfig, multirun: bool) -> tuple[str, str] | None:
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    try:
        return key, str(OmegaConf.select(cfg, key, throw_on_resolution_failure=True))
    except Exception:  # noqa: BLE001  (an interpolation only Hydra's run resolves: Hydra checks it then)
        return None


def run(args: list[str]) -> int:
    """Run ``reft-lab train`` with Hydra; 0 when every job succeeded, else non-zero. Before Hydra
    starts: the output directory must be writable, a single run must validate and preflight (one
    line per mistake), and an optuna study resumes from its storage."""
    from reft_lab.conf_store import register

    register()
    if set(args) & INSPECT_FLAGS:  # the user asks Hydra to show something: nothing runs, nothing to check
        shown = sorted(set(args) & {"--cfg", "-c", "--info", "-i", "--shell-completion", "-sc"})
        if shown and {"-m", "--multirun"} & set(args):
            raise ReftLabError(f"{shown[0]} shows one job's config: drop -m (sweep values such as a,b then show as they are)")
        return _hydra(args)
    explicit_sweep = bool({"-m", "--multirun"} & set(args))
    search = False
    overrides = _overrides(args)
    try:
        if explicit_sweep:  # sweep values (a,b / range(...)) do not compose: check the first job's config
            overrides = _first_job(overrides)
        cfg = compose(overrides, with_hydra=True)
    except (ConfigError, HydraException):
        if not explicit_sweep:
            raise
        cfg = None  # Hydra reports what it cannot parse
    if cfg is not None:
        multirun = explicit_sweep or "MULTIRUN" in str(OmegaConf.select(cfg, "hydra.mode", default=""))
        where = _dir_to_check(cfg, multirun)
        if where is not None:
            nearest_writable(where[1], where[0])
        if not explicit_sweep:  # a single run, or a search preset: its base config must be sound
            settings = RunSettings.from_cfg(cfg)
            settings.preflight()
            key = _job_key(cfg)
            if key is not None and not multirun:
                _validated[key] = settings
        search = multirun and "optuna" in str(OmegaConf.select(cfg, "hydra.sweeper._target_", default="")).lower()
        if search:
            args = resume_search(cfg, args)
            if args is None:
                return 0
    return _hydra(args, search)


def _hydra(args: list[str], search: bool = False) -> int:
    """Hand the command line to Hydra; collect the failures its jobs recorded."""
    import hydra

    failure_log = tempfile.NamedTemporaryFile(prefix="reft_lab_failures_", suffix=".log", delete=False)
    failure_log.close()
    os.environ[FAILURE_LOG_ENV] = failure_log.name
    main = hydra.main(config_path=str(conf_dir()), config_name="train", version_base="1.3")(job)
    argv, sys.argv = sys.argv, ["reft-lab train", *args]
    code = 0
    if search:  # let the search's own errors reach us instead of Hydra's traceback printer
        os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        main()
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    except ValueError as err:
        if not (search and "Record does not exist" in str(err)):
            raise
        print("reft-lab train: error: every trial of this search failed, so it has no best trial; the study keeps "
              "them as FAIL (their errors follow)", file=sys.stderr)
        code = 1
    finally:
        if search:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        sys.argv = argv
        _validated.clear()
        failures = [line for line in Path(failure_log.name).read_text(encoding="utf-8").splitlines() if line]
        os.environ.pop(FAILURE_LOG_ENV, None)
        os.unlink(failure_log.name)
    if failures and code != 2:  # exit 2: one job's bad input, already printed as one line
        print(f"reft-lab train: {len(failures)} job(s) failed:\n  " + "\n  ".join(failures), file=sys.stderr)
    return code or (1 if failures else 0)
