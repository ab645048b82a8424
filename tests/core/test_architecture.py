"""The numerical core must load without the orchestration and tracking stack."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN_IN_CORE = {"prefect", "mlflow", "tensorrt", "typer", "rich", "flows", "tasks", "registry", "export"}


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
        "import diffquant.models.loading, diffquant.quantize\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_import_direction():
    for path in (ROOT / "src" / "diffquant").rglob("*.py"):
        assert not _imports(path) & FORBIDDEN_IN_CORE, path
    for package in ("registry", "export"):
        for path in (ROOT / package).rglob("*.py"):
            assert not _imports(path) & {"prefect", "flows", "tasks", "typer"}, path
    for path in (ROOT / "tasks").rglob("*.py"):
        assert "flows" not in _imports(path), path
    for path in [*(ROOT / "export").rglob("*.py"), *(ROOT / "tasks").rglob("*.py"), *(ROOT / "flows").rglob("*.py")]:
        assert "mlflow" not in _imports(path), f"only registry/ may import mlflow: {path}"


def test_no_flow_file_shadows_a_package():
    packages = {"diffquant", "flows", "tasks", "export", "registry"}
    for folder in ("flows", "bench"):
        assert not {p.stem for p in (ROOT / folder).glob("*.py")} & packages, folder
