"""fusion is framework-agnostic: importing all of it pulls in neither transformers nor cl_driver."""

import ast
import subprocess
import sys
from pathlib import Path


def test_fusion_imports_neither_transformers_nor_cl_driver():
    probe = ("import sys, fusion, fusion.store, fusion.cli, fusion.io, fusion.kernels.cpu; "
             "print(sorted({m.split('.')[0] for m in sys.modules} & {'transformers', 'cl_driver'}))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def _fusion_imports(source: str) -> list[tuple[str, str]]:
    """(module, name) of every `from fusion... import name` and `import fusion...` in a source."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "fusion":
            found += [(node.module, alias.name) for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [(alias.name, "") for alias in node.names if alias.name.split(".")[0] == "fusion"]
    return found


def test_cl_driver_uses_only_the_public_api():
    import fusion

    sources = sorted((Path(__file__).resolve().parents[2] / "cl_driver").rglob("*.py"))
    imports = [(path.name, module, name) for path in sources for module, name in _fusion_imports(path.read_text())]
    assert imports, "cl_driver should use fusion"
    for path, module, name in imports:
        assert module == "fusion", f"{path}: imports {module}, a private module; use `from fusion import ...`"
        assert name in fusion.__all__, f"{path}: imports {name!r}, which fusion.__all__ does not export"
