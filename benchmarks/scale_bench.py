"""Scale benchmark: a model trained outside Expunge on CIFAR-shaped data, imported and served.

A CIFAR-shaped task (50,000 training and 10,000 test images of 3x32x32, ten classes with
learnable structure, generated from a fixed seed; nothing downloads) and a 532k-parameter
CNN (``benchmarks.scale_models.cifar_cnn``) trained with a plain PyTorch loop, with a
checkpoint at the start of every fourth epoch (the states GAS reads, with their learning
rate); ten epochs, so retraining takes minutes, as it does where unlearning pays. The
benchmark writes the model repository (``expunge.toml``, safetensors, ``.npz``), starts ``expunge serve`` as its own
process (its trusted factory names the architecture), and through the public client only:
imports the repository (``ImportModel``), waits for the gradient index, predicts 2,000
inputs, scans 200 held-out inputs twice (the first pays the version's calibration),
asks for the neighbours of 64, forgets the largest owner and then 1% of the samples with
the default ``auto`` forget, and reads the server's and its compute process's peak memory (``VmHWM``).

Ground truth for each forget: the same plain PyTorch loop retrained on what is left, with
seeds 101 and 202 (not the original's 0), trained and timed before the server starts
(nothing else running); the first is the reference, the KL between the two the noise,
and its time the retrain a forget's speedup is measured against. The second forget runs
while the server re-embeds its index after the first, as a served model would. Gap
closed, KL over the noise and the MIA gap are defined as in ``forget_bench``.

A second case, a standard ResNet-18 (11.2M parameters, ``benchmarks.scale_models``)
trained for four epochs on 5,000 of the images (checkpoints at epochs 0 and 2), goes
through the same import, index, predict, scan, neighbours and forgets, timed; its
retrains are not run, so it reports no quality against ground truth.

Run ``python -m benchmarks.scale_bench`` (``--quick``: 5,000 CNN samples and 1,000
ResNet ones, to check the script); results in ``benchmarks/results/scale.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from benchmarks.processes import free_port, wait_serving
from benchmarks.scale_models import cifar_cnn, resnet18
from expunge.client import Client
from expunge.defenses.architectures import ArchitectureSpec
from expunge.defenses.evaluate import membership_auc, output_kl, per_sample_losses
from expunge.server.state.datasets import synthetic_owners

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "scale.json"
INPUT_SHAPE = (3, 32, 32)
REFERENCE_SEEDS = (101, 202)
MEASURABLE_GAP = 3.0


@dataclass(frozen=True)
class Recipe:
    """The plain training loop (and the [training] table that describes it to Expunge)."""

    epochs: int = 10
    checkpoint_every: int = 4  # a checkpoint at the start of epochs 0, 4, 8: what GAS reads
    batch_size: int = 128
    learning_rate: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 5e-4


@dataclass(frozen=True)
class Case:
    """One model the benchmark trains outside Expunge, imports and measures."""

    name: str  # the model's name on the server and the trusted factory's
    factory: Any  # (spec, seed) -> nn.Module, as the server's trusted factory builds it
    train_samples: int
    test_samples: int
    recipe: Recipe
    references: bool  # retrain twice for ground truth (the forget's quality and speedup)
    scan_inputs: int


def cases(quick: bool) -> list[Case]:
    quick_recipe = Recipe(epochs=2, checkpoint_every=1)
    if quick:
        return [
            Case("cifar_cnn", cifar_cnn, 5_000, 1_000, quick_recipe, True, 50),
            Case("resnet18", resnet18, 1_000, 500, Recipe(epochs=1, checkpoint_every=1), False, 20),
        ]
    return [
        Case("cifar_cnn", cifar_cnn, 50_000, 10_000, Recipe(), True, 200),
        # ResNet-18 on 5,000: the issue asks that everything completes, with times; its
        # retrains (minutes each on two cores) are not run for ground truth.
        Case("resnet18", resnet18, 5_000, 1_000, Recipe(epochs=4, checkpoint_every=2), False, 50),
    ]


def cifar_shaped(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Images of ten classes: a smooth per-class template (shared by every seed), scaled,
    shifted by up to 4 pixels and drowned in pixel noise (79% test accuracy after three
    epochs on 10,000 of them), so a CNN learns it, but not perfectly."""
    templates = np.random.default_rng(12345).standard_normal((10, 3, 8, 8))
    templates = np.kron(templates, np.ones((1, 1, 4, 4)))  # 3x32x32, smooth blocks
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n)
    images = np.empty((n, 3, 32, 32), dtype=np.float32)
    for start in range(0, n, 5000):
        rows = slice(start, min(start + 5000, n))
        count = rows.stop - rows.start
        base = templates[labels[rows]] * rng.uniform(0.3, 1.0, (count, 1, 1, 1))
        shifts = rng.integers(-4, 5, (count, 2))
        for i in range(count):
            base[i] = np.roll(base[i], tuple(shifts[i]), axis=(1, 2))
        images[rows] = base + rng.standard_normal((count, 3, 32, 32)) * 4.0
    return images, labels.astype(np.int64)


def train_plain(
    x: torch.Tensor, y: torch.Tensor, recipe: Recipe, seed: int, factory: Any = cifar_cnn
) -> tuple[nn.Module, list[dict[str, torch.Tensor]], float]:
    """The user's own loop: SGD with momentum, constant rate; a state at the start of every
    ``checkpoint_every``-th epoch. Returns the model, the checkpoints and the seconds."""
    started = time.perf_counter()
    model = factory(ArchitectureSpec(factory.__name__, INPUT_SHAPE, 10), seed)
    optimiser = torch.optim.SGD(
        model.parameters(),
        lr=recipe.learning_rate,
        momentum=recipe.momentum,
        weight_decay=recipe.weight_decay,
    )
    generator = torch.Generator().manual_seed(seed)
    states = []
    for epoch in range(recipe.epochs):
        if epoch % recipe.checkpoint_every == 0:
            states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), recipe.batch_size):
            rows = order[start : start + recipe.batch_size]
            optimiser.zero_grad()
            nn.functional.cross_entropy(model(x[rows]), y[rows]).backward()
            optimiser.step()
    model.eval()
    return model, states, time.perf_counter() - started


def write_repository(
    root: Path,
    model: nn.Module,
    states: list[dict[str, torch.Tensor]],
    train: dict[str, np.ndarray],
    test: dict[str, np.ndarray],
    recipe: Recipe,
    architecture: str = "cifar_cnn",
) -> None:
    root.mkdir(parents=True)
    save_file(model.state_dict(), root / "weights.safetensors")
    np.savez(root / "train.npz", **train)
    np.savez(root / "test.npz", **test)
    lines = [
        'format = "expunge-model-repository-v1"',
        "[model]",
        f'architecture = "{architecture}"',
        "input_shape = [3, 32, 32]",
        "num_classes = 10",
        'weights = "weights.safetensors"',
        "[objective]",
        f"weight_decay = {recipe.weight_decay}",
        "[data]",
        'train = "train.npz"',
        'test = "test.npz"',
        "[training]",
        f"epochs = {recipe.epochs}",
        f"batch_size = {recipe.batch_size}",
        f"learning_rate = {recipe.learning_rate}",
        f"momentum = {recipe.momentum}",
        'schedule = "constant"',
        "polish_iterations = 0",
        "seed = 0",
    ]
    (root / "ckpt").mkdir()
    for i, state in enumerate(states):
        save_file(state, root / "ckpt" / f"{i}.safetensors")
        lines += [
            "[[checkpoints]]",
            f'weights = "ckpt/{i}.safetensors"',
            f"learning_rate = {recipe.learning_rate}",
        ]
    (root / "expunge.toml").write_text("\n".join(lines) + "\n")


class _Server:
    """``expunge serve`` for one case in its own process, with the case's trusted factory."""

    def __init__(self, workdir: Path, case: Case, settings: str = "") -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        self.config = workdir / "server.toml"
        self.config.write_text(
            f'[server]\ntrusted_factories = {{ {case.name} = "benchmarks.scale_models:{case.name}" }}\n'
            f'state_dir = "{workdir / "state"}"\n'
            "max_import_bytes = 8589934592\n"
            # Both cores (the default, 1, keeps a server beside other work): set, not tuned.
            "torch_threads = 2\n" + settings
        )
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> str:
        """Start it and wait until it serves; return its address."""
        port = free_port()
        target = f"127.0.0.1:{port}"
        with (self.workdir / "server.log").open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "expunge.client.cli", "serve", "--config",
                 str(self.config), "--port", str(port)],
                env={**os.environ, "PYTHONPATH": str(ROOT)},
                stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
            )  # fmt: skip
        if not wait_serving(target, self.process):
            raise RuntimeError(f"the server did not start; see {self.workdir / 'server.log'}")
        return target

    def peak_mib(self) -> float:
        return _peak_mib(self.process.pid) if self.process else math.nan

    def compute_peak_mib(self) -> float:
        """The compute process's peak (the server's only child that computes)."""
        if self.process is None:
            return math.nan
        return max([_peak_mib(c) for c in _children(self.process.pid)] or [math.nan])

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()


def memory_line(
    case: Case,
    workdir: Path,
    model: nn.Module,
    states: list[dict[str, torch.Tensor]],
    arrays: dict[str, dict[str, np.ndarray]],
    path: str,
) -> dict[str, Any]:
    """The compute process's peak against the data's size: the same model imported with
    all of its training rows and with the first quarter, each into a fresh server without
    an index, forgetting its largest owner by ``path`` (the full case's own forget's);
    the line through the two peaks splits the peak into a part per byte of data (the
    slope) and the model's working set (the intercept)."""
    points = []
    for share in (1.0, 0.25):
        rows = slice(0, round(len(arrays["train"]["labels"]) * share))
        train = {k: v[rows] for k, v in arrays["train"].items()}
        root = workdir / f"memory-{share}"
        write_repository(
            root / "repository", model, states, train, arrays["test"], case.recipe, case.name
        )
        data_mib = sum(a.nbytes for a in (*train.values(), *arrays["test"].values())) / 2**20
        server = _Server(root, case, "build_index = false\n")
        try:
            with Client(server.start(), timeout=3600) as client:
                client.import_model(root / "repository", "memory")
                owners, counts = np.unique(train["owner_ids"], return_counts=True)
                op = client.forget(
                    "memory", owner_ids=[str(owners[np.argmax(counts)])], selection=path,
                    wait=True, wait_timeout=3600,
                )  # fmt: skip
                assert op.receipt is not None, op
            points.append(
                {
                    "data_mib": data_mib,
                    "compute_peak_mib": server.compute_peak_mib(),
                    "profile": op.receipt.policy.profile,
                    "forget_s": op.receipt.seconds,
                }
            )
        finally:
            server.stop()
        print(f"memory at {share:.0%} of the rows: {points[-1]}", flush=True)
    (full, part) = points
    slope = (full["compute_peak_mib"] - part["compute_peak_mib"]) / (
        full["data_mib"] - part["data_mib"]
    )
    return {
        "points": points,
        "path": path,
        "peak_mib_per_data_mib": slope,
        "working_set_mib": full["compute_peak_mib"] - slope * full["data_mib"],
    }


def _peak_mib(pid: int) -> float:
    """A process's peak resident memory (VmHWM), in MiB; NaN once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return math.nan


def _children(pid: int) -> list[int]:
    try:
        out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    except OSError:
        return []
    return [int(p) for p in out.stdout.split()]


def _load(weights: bytes, factory: Any) -> nn.Module:
    from safetensors.torch import load as load_bytes

    model = factory(ArchitectureSpec(factory.__name__, INPUT_SHAPE, 10))
    model.load_state_dict(load_bytes(weights))
    return model.eval()


def _scores(
    model: nn.Module,
    nothing: nn.Module,
    references: list[nn.Module],
    forget_x: torch.Tensor,
    forget_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
) -> dict[str, Any]:
    """Gap closed, KL over the noise and the MIA gap against the reference retrain."""
    reference = references[0]
    noise = output_kl(reference, references[1], forget_x)
    kl_nothing = output_kl(reference, nothing, forget_x)
    kl_model = output_kl(reference, model, forget_x)

    def mia(m: nn.Module) -> float:
        return membership_auc(
            per_sample_losses(m, forget_x, forget_y), per_sample_losses(m, test_x, test_y)
        )

    reference_mia = float(np.mean([mia(r) for r in references]))
    return {
        "kl_nothing": kl_nothing,
        "kl_forgotten": kl_model,
        "noise": noise,
        "nothing_over_noise": kl_nothing / noise,
        "kl_over_noise": kl_model / noise,
        "measurable": kl_nothing >= MEASURABLE_GAP * noise,
        "gap_closed": 1.0 - kl_model / kl_nothing,
        "never_worse": kl_model <= kl_nothing,
        "mia_gap": abs(mia(model) - reference_mia),
        "mia_gap_nothing": abs(mia(nothing) - reference_mia),
    }


def _forget_plans(
    owners: np.ndarray, ids: np.ndarray
) -> list[tuple[str, np.ndarray, dict[str, Any]]]:
    """(pattern, rows forgotten, Forget arguments), applied in order: the largest owner,
    then a random 1% of the samples left."""
    names, counts = np.unique(owners, return_counts=True)
    largest = str(names[np.argmax(counts)])
    owner_mask = owners == largest
    rows = np.random.default_rng(7).choice(
        np.flatnonzero(~owner_mask), len(owners) // 100, replace=False
    )
    random_mask = np.zeros(len(owners), dtype=bool)
    random_mask[rows] = True
    return [
        ("owner", owner_mask, {"owner_ids": [largest]}),
        ("random_1pct", random_mask, {"sample_ids": [int(i) for i in ids[random_mask]]}),
    ]


def run(case: Case, workdir: Path) -> dict[str, Any]:
    torch.set_num_threads(2)
    n_train, n_test, recipe = case.train_samples, case.test_samples, case.recipe
    name = case.name.replace("_", "-")  # model names take no underscores
    began = time.perf_counter()
    images, labels = cifar_shaped(n_train + n_test, seed=0)
    ids = np.arange(n_train + n_test, dtype=np.int64)
    owners = synthetic_owners(n_train + n_test, seed=0)
    split = {
        "train": slice(0, n_train),
        "test": slice(n_train, n_train + n_test),
    }
    arrays = {
        name: {
            "features": images[rows],
            "labels": labels[rows],
            "sample_ids": ids[rows],
            "owner_ids": owners[rows],
        }
        for name, rows in split.items()
    }
    x = torch.from_numpy(arrays["train"]["features"])
    y = torch.from_numpy(arrays["train"]["labels"])
    test_x = torch.from_numpy(arrays["test"]["features"])
    test_y = torch.from_numpy(arrays["test"]["labels"])
    model, states, training_s = train_plain(x, y, recipe, 0, case.factory)
    with torch.no_grad():
        accuracy = float((model(test_x).argmax(1) == test_y).float().mean())
    print(f"trained outside Expunge: {training_s:.1f} s, test accuracy {accuracy:.3f}", flush=True)
    # The forget sets and their reference retrains, before the server starts: a retrain
    # timed beside the server's background re-embedding ran several times slower.
    plans = _forget_plans(owners[:n_train], ids[:n_train])
    references: dict[str, tuple[list[nn.Module], list[float]]] = {}
    gone = np.zeros(n_train, dtype=bool)
    for pattern, mask, _ in plans if case.references else ():
        gone |= mask
        keep = torch.from_numpy(~gone)
        trained = [
            train_plain(x[keep], y[keep], recipe, seed, case.factory) for seed in REFERENCE_SEEDS
        ]
        references[pattern] = ([m for m, _, _ in trained], [t for _, _, t in trained])
        print(f"references for {pattern}: {[round(t, 1) for _, _, t in trained]} s", flush=True)
    repository = workdir / "repository"
    write_repository(repository, model, states, arrays["train"], arrays["test"], recipe, case.name)
    data_bytes = sum(a.nbytes for part in arrays.values() for a in part.values())

    server = _Server(workdir / "main", case)
    result: dict[str, Any] = {
        "case": case.name,
        "training_samples": n_train,
        "test_samples": n_test,
        "parameters": sum(p.numel() for p in model.parameters()),
        "data_mib": data_bytes / 2**20,
        "trained_outside_s": training_s,
        "original_test_accuracy": accuracy,
        "recipe": recipe.__dict__,
    }
    try:
        target = server.start()
        with Client(target, timeout=3600) as client:
            started = time.perf_counter()
            info = client.import_model(repository, name)
            result["import_s"] = time.perf_counter() - started
            result["imported_test_accuracy"] = info.metrics.get("test_accuracy")
            print(f"imported: {result['import_s']:.1f} s", flush=True)
            started = time.perf_counter()
            while client.get_model(name).index.state != "READY":
                time.sleep(1.0)
                if time.perf_counter() - started > 3600:
                    raise RuntimeError("the index was not built within an hour")
            result["index_build_s"] = time.perf_counter() - started
            print(f"index: {result['index_build_s']:.1f} s", flush=True)
            started = time.perf_counter()
            client.predict(name, images[n_train : n_train + 2000])
            result["predict_2000_s"] = time.perf_counter() - started

            # Held-out inputs past the 100 the server calibrates on.
            count = case.scan_inputs
            scan_inputs = images[n_train + 100 : n_train + 100 + 2 * count]
            started = time.perf_counter()
            first = list(client.scan(name, scan_inputs[:count]))
            result["scan_first_s"] = time.perf_counter() - started
            result["scan_inputs"] = count
            started = time.perf_counter()
            list(client.scan(name, scan_inputs[count:]))
            result["scan_inputs_per_s"] = count / (time.perf_counter() - started)
            queries = images[n_train + 100 : n_train + 164]
            started = time.perf_counter()
            client.neighbors(name, queries, 10)
            result["neighbors_64_s"] = time.perf_counter() - started
            result["scan_flagged_clean"] = int(sum(r.flagged for r in first))
            print(f"scan: {result['scan_inputs_per_s']:.1f} inputs/s", flush=True)

            forgets = []
            nothing = model
            for pattern, mask, request in plans:
                started = time.perf_counter()
                op = client.forget(name, wait=True, wait_timeout=3600, **request)
                forget_s = time.perf_counter() - started
                assert op.receipt is not None, op
                forgotten = _load(client.export_model(name), case.factory)
                forget_x = x[torch.from_numpy(mask)]
                forget_y = y[torch.from_numpy(mask)]
                row = {
                    "pattern": pattern,
                    "forgotten": int(mask.sum()),
                    "path": op.receipt.policy.path,
                    "profile": op.receipt.policy.profile,
                    "reason": op.receipt.policy.reason,
                    "forget_s": forget_s,
                    "receipt_s": op.receipt.seconds,
                    "parameters_updated": op.receipt.parameters_updated,
                    "estimated_s": {
                        "retrain": op.receipt.policy.estimated_retrain_s,
                        "all": op.receipt.policy.estimated_newton_all_s,
                    }.get(op.receipt.policy.path, op.receipt.policy.estimated_targeted_s),
                    "test_accuracy_after": op.receipt.after.test_accuracy,
                }
                if pattern in references:
                    models, retrain_s = references[pattern]
                    row["retrain_s"] = retrain_s[0]
                    row["speedup"] = retrain_s[0] / forget_s
                    row.update(
                        _scores(forgotten, nothing, models, forget_x, forget_y, test_x, test_y)
                    )
                forgets.append(row)
                print(json.dumps(row), flush=True)
                nothing = forgotten
            result["forgets"] = forgets

        result["server_peak_mib"] = server.peak_mib()
        result["compute_peak_mib"] = server.compute_peak_mib()
    finally:
        server.stop()
    if case.references:
        result["memory_line"] = memory_line(
            case, workdir, model, states, arrays, result["forgets"][0]["path"]
        )
    result["seconds"] = time.perf_counter() - began
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="5,000 samples: check the script")
    parser.add_argument("--output", default=str(RESULTS))
    args = parser.parse_args()
    result: dict[str, Any] = {"cases": []}
    for case in cases(args.quick):
        workdir = Path(tempfile.mkdtemp(prefix="expunge-scale-"))
        try:
            result["cases"].append(run(case, workdir))
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    result.update(
        command="python -m benchmarks.scale_bench" + (" --quick" if args.quick else ""),
        date=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        device=f"cpu: {platform.machine()}, {os.cpu_count()} cores",
    )
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    print(json.dumps(result, indent=2, sort_keys=True))


if __name__ == "__main__":
    main()
