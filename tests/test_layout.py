"""Package boundaries: defenses is pure, the client installs without torch, protos do not drift."""

from __future__ import annotations

import ast
import filecmp
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN_IN_DEFENSES = (
    "grpc",
    "sqlite3",
    "expunge.server",
    "expunge.client",
    "expunge.v1",
    "google.protobuf",
)


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _modules(folder: str, package: str) -> list[str]:
    """Every module under ``folder`` (subpackages included), as ``package``-rooted names."""
    names = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        parts = path.relative_to(ROOT / folder).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names.append(".".join((package, *parts)))
    return names


def test_defenses_never_imports_transport_or_storage() -> None:
    offenders = {
        f"{path.relative_to(ROOT)}: {name}"
        for path in (ROOT / "defenses").rglob("*.py")
        for name in _imports(path)
        if any(name == bad or name.startswith(bad + ".") for bad in FORBIDDEN_IN_DEFENSES)
    }
    assert not offenders, offenders


def test_only_the_store_touches_sqlite() -> None:
    """Every SQL statement of the server lives in server/state/store/."""
    store = ROOT / "server" / "state" / "store"
    offenders = sorted(
        str(path.relative_to(ROOT))
        for path in (ROOT / "server").rglob("*.py")
        if not path.is_relative_to(store)
        and ("sqlite3" in _imports(path) or ".execute(" in path.read_text())
    )
    assert not offenders, offenders


def test_importing_every_defenses_module_loads_no_grpc() -> None:
    modules = _modules("defenses", "expunge.defenses")
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in modules)
        + (
            "bad = [m for m in sys.modules if m == 'grpc' or m.startswith('grpc.') or m == 'sqlite3']\n"
            "assert not bad, bad\n"
        )
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_client_does_not_import_torch() -> None:
    code = (
        "import sys, expunge.client, expunge.client.aio, expunge.client.cli\n"
        "assert 'torch' not in sys.modules, 'client imported torch'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_server_process_never_imports_ray() -> None:
    """The local executor needs no Ray; the Ray one imports it in its driver process only."""
    code = (
        "import sys, expunge.server.main\n"
        "from expunge.server.executors import make_executor\n"
        "from expunge.server.settings import Settings\n"
        "make_executor(Settings())\n"
        "assert 'ray' not in sys.modules, 'the local executor imported ray'\n"
        "import importlib.util\n"
        "if importlib.util.find_spec('ray') is not None:\n"
        "    make_executor(Settings(executor='ray'))\n"
        "    assert 'ray' not in sys.modules, 'the ray executor imported ray in the server'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_generated_protobuf_code_matches_the_proto(tmp_path: Path) -> None:
    from expunge.server.protogen import generate

    written = generate(tmp_path)
    assert written, "protoc wrote nothing"
    committed = ROOT / "proto" / "expunge" / "v1"
    for fresh in written:
        assert filecmp.cmp(fresh, committed / fresh.name, shallow=False), (
            f"{fresh.name} is stale: run `make proto` and commit the result"
        )


def test_the_defenses_facade_resolves_every_public_name() -> None:
    import expunge.defenses as defenses

    assert defenses.__all__
    for name in defenses.__all__:
        assert getattr(defenses, name) is not None, name


def test_the_client_exports_every_public_name_of_its_errors_and_types() -> None:
    """Every exception, result dataclass, option Literal and tuple of option values, and
    both clients, import from ``expunge.client``."""
    import typing

    import expunge.client as client
    from expunge.client import errors, types

    public = {"Client", "AsyncClient"}
    for module in (errors, types):
        for name, value in vars(module).items():
            defined_here = getattr(value, "__module__", None) == module.__name__
            if name.startswith("_") or not (
                (isinstance(value, type) and defined_here)
                or typing.get_origin(value) is typing.Literal
                or (name.isupper() and isinstance(value, tuple))
            ):
                continue
            public.add(name)
    assert {"FieldViolation", "DeadlineExceededError", "AbortedError"} <= public
    assert {"Selection", "Estimator", "NeighborMode", "OPERATION_STATES"} <= public
    assert public <= set(client.__all__), public - set(client.__all__)
    assert all(getattr(client, name) is not None for name in client.__all__)
