"""Safe loading across the library: torch.load only with weights_only=True, no pickle, no remote code."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted(ROOT.glob("safemed_lib/**/*.py")) + sorted(ROOT.glob("scripts/*.py"))  # subpackages too


def _calls(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            yield name, node


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_source_loads_safely(path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] + [getattr(node, "module", "") or ""]
            assert not any(n.split(".")[0] in ("pickle", "dill", "joblib") for n in names), \
                f"{path.name}:{node.lineno}: unpickling untrusted files is not allowed"
    for name, call in _calls(tree):
        kw = {k.arg: k.value for k in call.keywords}
        if name == "load" and isinstance(call.func, ast.Attribute) and getattr(call.func.value, "id", "") == "torch":
            assert "weights_only" in kw and getattr(kw["weights_only"], "value", None) is True, \
                f"{path.name}:{call.lineno}: torch.load without weights_only=True"
        if "trust_remote_code" in kw:
            assert getattr(kw["trust_remote_code"], "value", None) is False, \
                f"{path.name}:{call.lineno}: trust_remote_code must stay False"


def test_pickled_checkpoint_is_refused(tmp_path):
    import torch

    from safemed_lib import models

    (tmp_path / "config.json").write_text('{"model_type": "qwen2_vl"}')
    torch.save({"w": torch.zeros(1)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(Exception, match="safetensors|pickle|\\.bin"):
        models.load_vlm(tmp_path)
