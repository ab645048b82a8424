"""The README's "Use as a library" example runs as written."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_library_example_runs(tmp_path):
    section = README.read_text().split("## Use as a library", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    blocked = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in {'prefect', 'mlflow'}:\n"
        "            raise ImportError('blocked ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", blocked + code], cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "layers quantized" in result.stdout
    assert (tmp_path / "digits-unet-w8a8.onnx").is_file()
