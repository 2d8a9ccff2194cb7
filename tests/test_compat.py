"""The torchvision compatibility shim: needed here, a no-op elsewhere."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import utune_fx

COMPAT = Path(utune_fx.__file__).parent / "_compat.py"


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_timm_and_torchvision_import_after_utune_fx():
    done = _python("import utune_fx, timm, torchvision; print(timm.__version__)")
    assert done.returncode == 0, done.stderr


def test_shim_is_needed_exactly_when_torchvision_cannot_import_alone():
    alone = _python("import torchvision")
    shim = _python(
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('compat', {str(COMPAT)!r})\n"
        "compat = importlib.util.module_from_spec(spec); spec.loader.exec_module(compat)\n"
        "print(compat.ensure_torchvision_importable())\n"
        "import torchvision\n"
    )
    assert shim.returncode == 0, shim.stderr
    if alone.returncode == 0:  # a matching torchvision build: nothing to do
        assert shim.stdout.strip() == "False"
    else:
        assert "operator torchvision::nms does not exist" in alone.stderr
        assert shim.stdout.strip() == "True"


def test_shim_does_nothing_when_the_compiled_ops_load():
    spec = importlib.util.spec_from_file_location("compat_copy", COMPAT)
    compat = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compat)
    compat._compiled_ops_loadable = lambda: True
    saved = sys.modules.pop("torchvision", None)
    try:
        assert compat.ensure_torchvision_importable() is False
        assert compat._library is None
    finally:
        if saved is not None:
            sys.modules["torchvision"] = saved


def test_shim_does_nothing_once_torchvision_is_imported():
    import torchvision  # noqa: F401

    assert utune_fx._compat.ensure_torchvision_importable() is False
