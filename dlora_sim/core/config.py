"""From a Hydra/OmegaConf config to the parts of a run (profile, cluster, workload, policies): the only
place config keys are interpreted, for the simulator and the runtime alike; and `compose()`, the one
way every app, test and benchmark builds a config outside a Hydra app."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from dlora_sim.core.contracts import LocalScheduler, Migrator, Router
from dlora_sim.core.errors import UserError
from dlora_sim.core.paths import CONF_DIR, PROFILES_DIR
from dlora_sim.core.profile import Profile, ProfileError, load_profile
from dlora_sim.core.replica_config import ClusterConfig, ReplicaConfig
from dlora_sim.core.workload import Workload


class ConfigError(ValueError, UserError):
    """A config key is missing, unknown or has an impossible value; the message names the key."""


def compose(overrides: Sequence[str] = (), app: str = "config", *, hydra_config: bool = False) -> DictConfig:
    """The config an app (`config` for dlora-sim, `serve` for dlora-serve) would run with these overrides,
    composed from conf/ outside a Hydra app (tests, benchmarks, calibration). Progress bars are off
    unless an override turns them on. `hydra_config` keeps the `hydra` node (sweeps, launchers)."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()   # a composition left initialised (by a test, a benchmark) would refuse this one
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(app, overrides=["progress=false", *overrides], return_hydra_config=hydra_config)


def dataclass_from(cls: type, raw: Any, where: str):
    """Build a config dataclass from a mapping; unknown keys and invalid values raise ConfigError naming
    the key (`where.key`)."""
    data = OmegaConf.to_container(raw, resolve=True) if isinstance(raw, DictConfig) else dict(raw or {})
    valid = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - valid)
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(f'{where}.{k}' for k in unknown)}; valid: {sorted(valid)}")
    _check_types(cls, data, where)
    try:
        return cls(**data)
    except (TypeError, ValueError) as e:
        raise ConfigError(str(e) if f"{where}." in str(e) else f"{where}: {e}") from None


def build_cluster(cfg: DictConfig) -> ClusterConfig:
    c = cfg.cluster
    replica = dataclass_from(ReplicaConfig, c.get("replica", {}), "cluster.replica")
    rest = {k: v for k, v in OmegaConf.to_container(c, resolve=True).items() if k != "replica"}
    try:
        return dataclasses.replace(dataclass_from(ClusterConfig, rest, "cluster"), replica=replica)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def build_profile(cfg: DictConfig) -> Profile:
    p = cfg.profile
    path = p.get("path") or PROFILES_DIR / f"{p.hardware}-{cfg.model.name}.yaml"
    prof = load_profile(Path(path))
    if prof.model.name != cfg.model.name:
        raise ProfileError(f"{path}: profile is for model {prof.model.name!r} but model.name is {cfg.model.name!r}")
    return prof.with_lora_path(p.get("lora") or prof.lora_path)


_KINDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _check_types(cls: Any, values: Any, where: str) -> None:
    """A value of the wrong type for a typed parameter of `cls` (`workload.rate=abc`) is a ConfigError
    naming the key, before the class sees it."""
    import inspect
    import typing

    try:
        hints = typing.get_type_hints(cls if dataclasses.is_dataclass(cls) else cls.__init__)
        if not dataclasses.is_dataclass(cls):
            hints = {k: v for k, v in hints.items() if k in inspect.signature(cls.__init__).parameters}
    except Exception:   # no hints to check against
        return
    for key, value in values.items():
        want = hints.get(str(key))
        if want not in _KINDS or value is None or str(key).startswith("_"):
            continue
        ok = isinstance(value, bool) if want is bool else (
            isinstance(value, (int, float)) and not isinstance(value, bool) and (want is float or isinstance(value, int))
            if want in (int, float) else isinstance(value, str))
        if not ok:
            raise ConfigError(f"{where}.{key} must be {_KINDS[want]}, got {value!r}")


def instantiated(node: DictConfig, where: str) -> Any:
    """Build a config node's `_target_`; a bad value is one ConfigError naming the key, not Hydra's
    multi-line instantiation error."""
    from hydra._internal.utils import _locate
    from hydra.errors import InstantiationException

    try:
        cls = _locate(str(node._target_))
    except Exception:   # an unknown target is reported by instantiate itself
        cls = None
    if cls is not None:
        _check_types(cls, node, where)
    try:
        return instantiate(node, _convert_="all")
    except InstantiationException as e:
        cause = e.__cause__ or e.__context__
        msg = str(cause) if cause is not None else str(e).splitlines()[0]
        raise ConfigError(msg if f"{where}." in msg or msg.startswith(where) else f"{where}: {msg}") from None


def build_workload(cfg: DictConfig) -> Workload:
    source = instantiated(cfg.workload, "workload")
    seed = cfg.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"seed must be an integer, got {seed!r}")
    try:
        workload = source.build(seed)
    except ValueError as e:
        if isinstance(e, UserError):
            raise
        raise ConfigError(str(e) if str(e).startswith("workload") else f"workload: {e}") from None
    if not workload.requests:
        raise ConfigError("workload: no requests to serve (an empty trace, or a window or filter that keeps none)")
    return workload


def _policy(node: DictConfig, where: str):
    if node is None or "_target_" not in node:
        raise ConfigError(f"{where}: needs a _target_ naming a policy class (see conf/{where}/)")
    return instantiated(node, where)


@dataclass(frozen=True)
class Parts:
    """Everything a run is built from, shared by the simulator (`dlora-sim`) and the runtime (`dlora-serve`)."""

    profile: Profile
    cluster: ClusterConfig
    workload: Workload
    scheduler_factory: Callable[[], LocalScheduler]   # one fresh local policy per replica
    router: Router
    migrator: Migrator | None


def build_parts(cfg: DictConfig, workload: Workload | None = None) -> Parts:
    profile = build_profile(cfg)
    cluster = build_cluster(cfg)
    workload = workload if workload is not None else build_workload(cfg)
    scheduler_cfg = cfg.scheduler
    _policy(scheduler_cfg, "scheduler")  # fail fast, before the cluster is built
    router = _policy(cfg.router, "router")
    mig = cfg.get("migration")
    migrator = _policy(mig, "migration") if mig is not None and "_target_" in mig else None
    slo = cfg.get("slo_s_per_token", 0.5)
    if isinstance(slo, bool) or not isinstance(slo, (int, float)) or not slo > 0:
        raise ConfigError(f"slo_s_per_token must be a number > 0, got {slo!r}")
    return Parts(profile, cluster, workload, lambda: instantiate(scheduler_cfg, _convert_="all"), router, migrator)


LARGE_RUN = 100_000   # requests: from here on, `auto` streams requests.csv and skips iterations.csv


def auto_flag(cfg: DictConfig, key: str, num_requests: int, large: bool) -> bool:
    """A true/false/auto key; `auto` is `large` for runs of LARGE_RUN requests or more."""
    value = cfg.get(key, "auto")
    if value == "auto":
        return large if num_requests >= LARGE_RUN else not large
    if isinstance(value, bool):
        return value
    raise ConfigError(f"{key} must be true, false or auto, got {value!r}")


def show_progress(cfg: DictConfig) -> bool:
    """`progress: auto` shows a job's own bar only when it runs alone: in a multirun, parallel jobs'
    bars would overwrite each other, and the sweep's one "jobs done / total" line stands for them."""
    value = cfg.get("progress", "auto")
    if value == "auto":
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode
        return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.RUN
    if isinstance(value, bool):
        return value
    raise ConfigError(f"progress must be true, false or auto, got {value!r}")


def keep_iterations(cfg: DictConfig, num_requests: int) -> bool:
    return auto_flag(cfg, "keep_iterations", num_requests, large=False)
