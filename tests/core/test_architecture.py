"""The numerical core must load without the orchestration and tracking stack."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN_IN_CORE = {"prefect", "mlflow", "tensorrt", "typer", "rich"}
ORCHESTRATION = ("diffquant.flows", "diffquant.tasks", "diffquant.registry", "diffquant.export")


def test_core_imports_without_prefect_mlflow_tensorrt():
    modules = sorted(
        "diffquant." + ".".join(p.relative_to(ROOT / "src" / "diffquant").with_suffix("").parts)
        for p in (ROOT / "src" / "diffquant").rglob("*.py")
        if p.name != "__init__.py"
    )
    code = (
        "import sys, importlib\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in {'prefect', 'mlflow', 'tensorrt'}:\n"
        "            raise ImportError('blocked ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "import diffquant.models.loading, diffquant.ptq\n"
        "import diffquant\n"
        "api = [getattr(diffquant, n) for n in diffquant.__all__]\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def _imports(path: Path, full: bool = False) -> set[str]:
    """Top-level names (or, with ``full``, whole dotted module names) a file imports, TYPE_CHECKING blocks included."""
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name if full else alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module if full else node.module.split(".")[0])
    return names


def _imports_any(path: Path, prefixes: tuple[str, ...]) -> set[str]:
    return {name for name in _imports(path, full=True) if name.startswith(prefixes)}


def test_import_direction():
    facade = ROOT / "src" / "diffquant" / "__init__.py"
    for path in (ROOT / "src" / "diffquant").rglob("*.py"):
        assert not _imports(path) & FORBIDDEN_IN_CORE, path
        allowed = ("diffquant.export",) if path == facade else ()  # the public API re-exports export_onnx lazily
        assert not {m for m in _imports_any(path, ORCHESTRATION) if not m.startswith(allowed)}, path
    for package in ("registry", "export"):
        for path in (ROOT / package).rglob("*.py"):
            assert not _imports(path) & {"prefect", "typer"}, path
            assert not _imports_any(path, ("diffquant.flows", "diffquant.tasks")), path
    for path in (ROOT / "export").rglob("*.py"):
        assert not _imports_any(path, ("diffquant.registry",)), path
    for path in (ROOT / "tasks").rglob("*.py"):
        assert not _imports_any(path, ("diffquant.flows",)), path
    for path in [*(ROOT / "export").rglob("*.py"), *(ROOT / "tasks").rglob("*.py"), *(ROOT / "flows").rglob("*.py")]:
        assert "mlflow" not in _imports(path), f"only registry/ may import mlflow: {path}"
    for path in ROOT.rglob("*.py"):
        if ".venv" in path.parts:
            continue
        old = _imports(path) & {"flows", "tasks", "registry", "export"}
        assert not old, f"{path} imports {old} as top-level packages; use diffquant.{sorted(old)[0]}"


def test_no_flow_file_shadows_a_package():
    packages = {"diffquant", "flows", "tasks", "export", "registry"}
    for folder in ("flows", "bench"):
        assert not {p.stem for p in (ROOT / folder).glob("*.py")} & packages, folder


def test_public_api_lists_every_lazy_name():
    """Every public name resolves, and no submodule shadows a function of the same name once imported."""
    import importlib

    import diffquant

    for path in (ROOT / "src" / "diffquant").rglob("*.py"):
        parts = path.relative_to(ROOT / "src").with_suffix("").parts
        importlib.import_module(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    for name in ("quantize", "auto_quantize", "finetune", "export_onnx", "check_parity", "load_model"):
        assert callable(getattr(diffquant, name)), name

    assert set(diffquant.__all__) - {"__version__"} == set(diffquant._EXPORTS)
    for name in diffquant.__all__:
        assert getattr(diffquant, name) is not None
