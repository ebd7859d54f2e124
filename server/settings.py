"""Server settings: a TOML file, then ``EXPUNGE_*`` environment variables on top."""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from expunge.server.forget.policy import PolicySettings

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
ACCURACY_COLLAPSE_POLICIES = ("retrain", "hold", "serve")
DEVICE_SETTINGS = ("auto", "cpu", "cuda")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
LOG_FORMATS = ("text", "json")
EXECUTORS = ("local", "ray")
RAY_MIN_OBJECT_STORE_BYTES = 75 << 20


@dataclass(frozen=True)
class Settings:
    state_dir: Path = field(default=Path(".expunge"), metadata={"help": "database and blobs"})
    host: str = field(default="127.0.0.1", metadata={"help": "bind address (loopback by default)"})
    port: int = field(default=50051, metadata={"help": "0 picks a free port"})
    max_message_bytes: int = field(default=16 * 1024 * 1024, metadata={"help": "per message"})
    max_import_bytes: int = field(
        default=4 * 1024**3,
        metadata={"help": "all files of one ImportModel upload together (RESOURCE_EXHAUSTED)"},
    )
    max_batch: int = field(
        default=4096, metadata={"help": "inputs per Predict/Scan/Neighbors call"}
    )
    max_concurrent_rpcs: int = field(default=64, metadata={"help": "beyond: RESOURCE_EXHAUSTED"})
    workers: int = field(default=8, metadata={"help": "gRPC thread pool size"})
    torch_threads: int = field(default=1, metadata={"help": "fixed for deterministic results"})
    device: str = field(
        default="auto",
        metadata={
            "help": "where training, forgets, scans and the index compute: auto (cuda when "
            "torch finds it, else cpu), cpu, or cuda (refused at start without CUDA); "
            "stored weights are always written from the CPU"
        },
    )
    forget_in_subprocess: bool = field(
        default=True,
        metadata={"help": "compute forgets in a child process (keeps RPC latency low)"},
    )
    gil_switch_interval_s: float = field(
        default=0.001,
        metadata={
            "help": "how long a busy thread (a forget or scan computation) may hold the GIL "
            "before an RPC thread gets it; Python's default is 0.005"
        },
    )
    reflection: bool = field(default=False, metadata={"help": "serve gRPC reflection"})
    data_root: Path | None = field(default=None, metadata={"help": "files may be read only here"})
    trusted_factories: dict[str, str] = field(
        default_factory=dict, metadata={"help": "architecture name -> 'module:function'"}
    )
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = field(default=None, metadata={"help": "set: mutual TLS"})
    # sha256(token) hex -> role; empty: authentication off (loopback only).
    token_sha256_roles: dict[str, str] = field(default_factory=dict)
    rate_limit_per_s: float = field(default=50.0, metadata={"help": "membership-revealing calls"})
    forget_parameter_budget: int = field(
        default=0,
        metadata={
            "help": "entries a sparse selection may update; 0: every entry of a model of at "
            "most 1,024, else 25% of the model, at most 4,096"
        },
    )
    # In parameter-distance units: one targeted forget on the digits MLP spends 2.4-3.4
    # (r ~ 3e-3 over lambda 1e-3), so a budget of 10 covers a few before a retrain is due.
    forget_budget: float = field(
        default=10.0,
        metadata={
            "help": "removal budget: the sum of the removals' bounds r / lambda (the "
            "quantity the certified noise is calibrated to) before an exact retrain is due"
        },
    )
    forget_auto_retrain_below_s: float = field(
        default=30.0,
        metadata={"help": "auto: retrain exactly whenever its estimated time is below this"},
    )
    forget_auto_hessian_memory_bytes: int = field(
        default=1 << 30,
        metadata={"help": "auto: Newton on every parameter only if its Hessian fits this"},
    )
    forget_profile: str = field(
        default="auto",
        metadata={
            "help": "the approximate update's counts: standard, large_data (subsampled J' "
            "and Gauss-Newton Hessian, one step), or auto (large_data when the standard "
            "profile's update is estimated above forget_auto_target_s)"
        },
    )
    forget_auto_target_s: float = field(
        default=60.0,
        metadata={"help": "auto profile: the standard profile's estimated update time allowed"},
    )
    forget_auto_approximate_time_share: float = field(
        default=0.1,
        metadata={
            "help": "auto: Newton on every parameter only if estimated at most this share "
            "of the retrain's time"
        },
    )
    scan_confirmation: str = field(
        default="auto",
        metadata={"help": "retrain, newton, or auto (retrain when training is cheap)"},
    )
    scan_large_model_confirmation: str = field(
        default="trailing_layers",
        metadata={
            "help": "models too large for a dense Hessian confirm with the shared Hessian of "
            "their last layers (trailing_layers) or Newton-CG on every parameter (newton_cg)"
        },
    )
    scan_training_evidence: str = field(
        default="spectral",
        metadata={
            "help": "spectral (the top proponents' median class-outlier z) or direction "
            "(their robust z along the group's Fisher direction; see BENCHMARKS.md)"
        },
    )
    scan_outlier_space: str = field(
        default="both",
        metadata={
            "help": "where Scan measures a training sample's class-outlier z: "
            "representation, input or both (the larger; see BENCHMARKS.md)"
        },
    )
    scan_shared_proponents: bool = field(
        default=False,
        metadata={
            "help": "Scan's attack set also takes the samples the flagged inputs of one "
            "class lean on together (combined influence z; see BENCHMARKS.md)"
        },
    )
    scan_cluster_completion: bool = field(
        default=True,
        metadata={
            "help": "Scan's attack set also takes the samples that sit with its members in "
            "their class, in the representation and the input features (see BENCHMARKS.md)"
        },
    )
    scan_mitigation_rule: str = field(
        default="majority",
        metadata={
            "help": "when Scan's mitigation forgets an attack set: majority (it changes "
            "half of the flagged inputs) or matched (it changes more than twice the share "
            "of clean analogues a set named by the same rule changes; see BENCHMARKS.md)"
        },
    )
    scan_combination: str = field(
        default="fisher",
        metadata={
            "help": "how Scan merges the influence and training-side p-values: fisher or "
            "min (the smallest, Tippett; see BENCHMARKS.md)"
        },
    )
    forget_hessian_samples: int = field(
        default=2000, metadata={"help": "retained samples (seeded) the Newton Hessian is built on"}
    )
    forget_objective_samples: int = field(
        default=0,
        metadata={"help": "> 0: J' and residuals on this many retained samples (large data)"},
    )
    forget_ranking_hessian_samples: int = field(
        default=0,
        metadata={
            "help": "retained samples for the Hessian-vector products of the Newton-CG "
            "ranking (lcodec_cg, cg); 0: forget_hessian_samples"
        },
    )
    forget_ranking_cg_iterations: int = field(
        default=0,
        metadata={"help": "conjugate-gradient iterations of that ranking; 0: the default (20)"},
    )
    forget_newton_iterations: int = field(
        default=0,
        metadata={
            "help": "damped Newton iterations on the selection when a request leaves them "
            "at 0; 0: the default (8)"
        },
    )
    forget_ranking_newton_iterations: int = field(
        default=0,
        metadata={"help": "Newton iterations of the Newton-CG ranking; 0: the default (3)"},
    )
    forget_step_coverage: float = field(
        default=-1.0,
        metadata={
            "help": "lcodec_cg/cg selections grow past their budget until they hold this "
            "share of the ranking step's squared mass (at most 4,096 entries); 0: exactly "
            "the budget; < 0: the default"
        },
    )
    max_input_magnitude: float = field(
        default=1e6,
        metadata={
            "help": "largest |value| accepted in an input; larger finite values overflow "
            "float32 gradients (Neighbors, Scan) and are refused as INVALID_ARGUMENT"
        },
    )
    on_accuracy_collapse: str = field(
        default="retrain",
        metadata={
            "help": "a forget whose update drops test accuracy by more than "
            "accuracy_collapse_points: 'retrain' (serve an exact retrain instead), 'hold' "
            "(keep the update as a version but go on serving the previous one), or 'serve'"
        },
    )
    accuracy_collapse_points: float = field(
        default=5.0, metadata={"help": "test-accuracy drop, in points, that counts as a collapse"}
    )
    index_memory_bytes: int = field(default=8 << 30, metadata={"help": "largest index built"})
    build_index: bool = field(default=True, metadata={"help": "build the gradient index at start"})
    index_layers: str = field(
        default="auto",
        metadata={
            "help": "gradients the index embeds: auto (all if their projections fit "
            "index_projection_cache_bytes, else the trailing layers that fit), all, or "
            "comma-separated module names"
        },
    )
    index_projection_cache_bytes: int = field(
        default=2 << 30,
        metadata={"help": "projection matrices the index keeps drawn, all checkpoints together"},
    )
    index_ivf_threshold: int = field(
        default=200_000,
        metadata={"help": "training sets larger than this get an IVF index (flat: exact)"},
    )
    index_shard_rows: int = field(
        default=512,
        metadata={
            "help": "training rows embedded as one unit of the index build: the points where "
            "a background build pauses for a forget or stops, and one Ray task each"
        },
    )
    executor: str = field(
        default="local",
        metadata={
            "help": "where the index build embeds the training set: local (in this process) "
            "or ray (actors on a Ray cluster; pip install 'expunge[ray]')"
        },
    )
    ray_address: str = field(
        default="local",
        metadata={
            "help": "executor = ray: 'local' starts a single-node Ray for the server, bound "
            "to loopback, with ray_workers CPUs; otherwise the cluster to join, as ray.init "
            "takes it ('auto', 'host:port', 'ray://host:port'), whose nodes must see the "
            "state directory at the same path"
        },
    )
    ray_workers: int = field(
        default=0,
        metadata={"help": "embedding actors (one CPU each); 0: the cluster's CPU count"},
    )
    ray_task_retries: int = field(
        default=3,
        metadata={"help": "restarts of a lost embedding actor and retries of its tasks"},
    )
    ray_object_store_bytes: int = field(
        default=512 << 20,
        metadata={"help": "object store of the local Ray (shared memory; at least 75 MiB)"},
    )
    ray_connect_timeout_s: float = field(
        default=10.0,
        metadata={"help": "how long joining a Ray cluster may take before it is unreachable"},
    )
    recovery_timeout_s: float = field(default=600.0, metadata={"help": "redo journal first"})
    grace_period_s: float = field(default=10.0, metadata={"help": "SIGTERM drain time"})
    metrics_port: int = field(
        default=-1,
        metadata={
            "help": "Prometheus /metrics over plain HTTP, without TLS or authentication, on "
            "this port; -1: off, 0: a free port"
        },
    )
    metrics_host: str = field(
        default="127.0.0.1",
        metadata={
            "help": "the metrics endpoint's bind address, used as given: anyone who can reach "
            "it reads the metrics (model names, call counts), so it is loopback by default"
        },
    )
    log_level: str = field(default="INFO", metadata={"help": "DEBUG, INFO, WARNING or ERROR"})
    log_format: str = field(
        default="text", metadata={"help": "text, or json: one JSON object per line"}
    )
    access_log: bool = field(
        default=True,
        metadata={
            "help": "one record per RPC on expunge.access (10-20% of the throughput of "
            "the cheapest calls; BENCHMARKS.md, Reliability)"
        },
    )

    def __post_init__(self) -> None:
        if self.log_level.upper() not in LOG_LEVELS:
            raise ValueError(f"log_level must be one of {LOG_LEVELS}, not {self.log_level!r}")
        if self.log_format not in LOG_FORMATS:
            raise ValueError(f"log_format must be one of {LOG_FORMATS}, not {self.log_format!r}")
        if not -1 <= self.metrics_port <= 65535:
            raise ValueError("metrics_port must be -1 (off), 0 (a free port) or a port number")
        if self.device not in DEVICE_SETTINGS:
            raise ValueError(f"device must be one of {DEVICE_SETTINGS}, not {self.device!r}")
        if self.on_accuracy_collapse not in ACCURACY_COLLAPSE_POLICIES:
            raise ValueError(
                f"on_accuracy_collapse must be one of {ACCURACY_COLLAPSE_POLICIES}, "
                f"not {self.on_accuracy_collapse!r}"
            )
        if self.scan_training_evidence not in ("spectral", "direction"):
            raise ValueError(
                "scan_training_evidence must be 'spectral' or 'direction', "
                f"not {self.scan_training_evidence!r}"
            )
        if self.scan_outlier_space not in ("representation", "input", "both"):
            raise ValueError(
                "scan_outlier_space must be 'representation', 'input' or 'both', "
                f"not {self.scan_outlier_space!r}"
            )
        if self.forget_step_coverage > 1:
            raise ValueError("forget_step_coverage must be at most 1 (< 0: the default)")
        if self.scan_mitigation_rule not in ("majority", "matched"):
            raise ValueError(
                "scan_mitigation_rule must be 'majority' or 'matched', "
                f"not {self.scan_mitigation_rule!r}"
            )
        if self.scan_combination not in ("fisher", "min"):
            raise ValueError(
                f"scan_combination must be 'fisher' or 'min', not {self.scan_combination!r}"
            )
        if not self.max_input_magnitude > 0:
            raise ValueError("max_input_magnitude must be > 0")
        # A bad count would otherwise surface only when the first forget runs.
        if self.forget_profile not in ("auto", "standard", "large_data"):
            raise ValueError(
                "forget_profile must be 'auto', 'standard' or 'large_data', "
                f"not {self.forget_profile!r}"
            )
        if self.index_projection_cache_bytes < 0 or self.index_ivf_threshold < 1:
            raise ValueError(
                "index_projection_cache_bytes must be >= 0 and index_ivf_threshold >= 1"
            )
        if not self.index_layers.strip():
            raise ValueError("index_layers must be 'auto', 'all' or module names")
        self._check_executor()
        if not self.forget_auto_target_s > 0:
            raise ValueError("forget_auto_target_s must be > 0")
        if self.forget_hessian_samples < 1:
            raise ValueError("forget_hessian_samples must be >= 1")
        for name in (
            "forget_objective_samples",
            "forget_ranking_hessian_samples",
            "forget_ranking_cg_iterations",
            "forget_newton_iterations",
            "forget_ranking_newton_iterations",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (0: the default)")

    def _check_executor(self) -> None:
        if self.executor not in EXECUTORS:
            raise ValueError(f"executor must be one of {EXECUTORS}, not {self.executor!r}")
        if self.index_shard_rows < 1:
            raise ValueError("index_shard_rows must be >= 1")
        if not self.ray_address.strip():
            raise ValueError("ray_address must be 'local', 'auto' or a cluster's address")
        if self.ray_workers < 0 or self.ray_task_retries < 0:
            raise ValueError("ray_workers and ray_task_retries must be >= 0")
        if self.ray_object_store_bytes < RAY_MIN_OBJECT_STORE_BYTES:
            raise ValueError("ray_object_store_bytes must be at least 75 MiB (Ray's minimum)")
        if not self.ray_connect_timeout_s > 0:
            raise ValueError("ray_connect_timeout_s must be > 0")

    def forget_policy(self) -> PolicySettings:
        """The ``auto`` forget policy's thresholds."""
        return PolicySettings(
            retrain_below_s=self.forget_auto_retrain_below_s,
            hessian_memory_bytes=self.forget_auto_hessian_memory_bytes,
            approximate_time_share=self.forget_auto_approximate_time_share,
        )

    @property
    def uses_tls(self) -> bool:
        return self.tls_cert is not None and self.tls_key is not None


_PATHS = {"state_dir", "data_root", "tls_cert", "tls_key", "tls_client_ca"}


def _coerce(name: str, value: Any, current: Any) -> Any:
    """``value`` as the type of the setting's default; ValueError naming the setting."""
    try:
        return _coerced(name, value, current)
    except ValueError as exc:
        kind = type(current).__name__ if current is not None else "value"
        raise ValueError(
            f"setting {name} (env EXPUNGE_{name.upper()}): expected {kind}, got {value!r}"
        ) from exc


def _coerced(name: str, value: Any, current: Any) -> Any:
    if name in _PATHS:
        return Path(value) if value not in (None, "") else None
    if isinstance(current, bool):
        return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")
    if isinstance(current, int):
        return int(value)
    if isinstance(current, float):
        return float(value)
    if isinstance(current, dict):
        if isinstance(value, dict):
            return {str(k): str(v) for k, v in value.items()}
        # env form: "a=b,c=d"
        return dict(item.split("=", 1) for item in str(value).split(",") if item)
    return value


def load_settings(
    path: Path | None = None, env: dict[str, str] | None = None, **overrides: Any
) -> Settings:
    """Defaults < TOML file (``[server]`` table or top level) < ``EXPUNGE_*`` env < overrides."""
    settings = Settings()
    values: dict[str, Any] = {}
    if path is not None:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
        values.update(data.get("server", data))
    environ = os.environ if env is None else env
    for f in fields(Settings):
        key = f"EXPUNGE_{f.name.upper()}"
        if key in environ:
            values[f.name] = environ[key]
    values.update({k: v for k, v in overrides.items() if v is not None})
    unknown = sorted(set(values) - {f.name for f in fields(Settings)})
    if unknown:
        raise ValueError(f"unknown settings: {unknown}")
    coerced = {k: _coerce(k, v, getattr(settings, k)) for k, v in values.items()}
    return replace(settings, **coerced)
