"""One direction of imports: ``medt_keras`` < ``weights_converter`` < ``training``.

Each package imports only the packages before it, and only their public
names; the library reads official checkpoints through a registered loader
(``medt_keras.loading.register_loader``), not by importing the converter.
"""

import ast

import pytest

from tests.library_only import LAYERS, ROOT, above, run_library_alone, run_with_blocked


def _imports(path):
    """``(line, module, names)`` of every absolute import in ``path``, inside functions too."""
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, []
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module, [alias.name for alias in node.names]


def _is_private(part):
    return part.startswith("_") and not (part.startswith("__") and part.endswith("__"))


def _violations(package):
    found = []
    for path in sorted((ROOT / package).rglob("*.py")):
        where = path.relative_to(ROOT)
        for line, module, names in _imports(path):
            top = module.split(".")[0]
            if top in above(package):
                found.append(f"{where}:{line}: imports {module}, a package above {package}")
            elif top in LAYERS and top != package:
                private = [p for p in module.split(".")[1:] + names if _is_private(p)]
                if private:
                    found.append(f"{where}:{line}: imports {', '.join(private)} of {module}, private to {top}")
    return found


@pytest.mark.parametrize("package", LAYERS)
def test_no_package_imports_one_above_it_or_private_names_of_another(package):
    assert _violations(package) == []


def test_the_check_sees_an_import_inside_a_function(tmp_path, monkeypatch):
    # The checker must catch what importing the modules would not run.
    import tests.test_layering as layering

    (tmp_path / "medt_keras").mkdir()
    (tmp_path / "medt_keras" / "late.py").write_text(
        "def f():\n    from training import train\n    from weights_converter.parity import _nchw\n")
    monkeypatch.setattr(layering, "ROOT", tmp_path)
    assert [v.split(": ", 1)[1] for v in layering._violations("medt_keras")] == [
        "imports training, a package above medt_keras",
        "imports weights_converter.parity, a package above medt_keras",
    ]


_IMPORT_EVERY_MODULE = """
    import importlib, pkgutil
    import {package}
    for module in pkgutil.walk_packages({package}.__path__, "{package}."):
        if not module.name.endswith("__main__"):
            importlib.import_module(module.name)
    print(sorted({{m.split(".")[0] for m in sys.modules}} & {layers!r}))
"""


def test_every_library_module_imports_with_the_packages_above_blocked():
    out = run_library_alone(
        _IMPORT_EVERY_MODULE.format(package="medt_keras", layers=set(LAYERS))
        + """
    import keras
    for name in ("OfficialAdam", "ForegroundF1", "ForegroundIoU", "MedT", "LoGo", "GatedAxialUNet", "AxialUNet"):
        assert keras.saving.get_registered_object("medt_keras>" + name) is not None, name
    """
    )
    assert out.stdout.strip().splitlines()[-1] == "['medt_keras']"


def test_every_converter_module_imports_with_training_blocked():
    out = run_with_blocked(_IMPORT_EVERY_MODULE.format(package="weights_converter", layers=set(LAYERS)),
                           above("weights_converter"))
    assert out.stdout.strip().splitlines()[-1] == "['medt_keras', 'weights_converter']"


def test_the_library_reads_an_official_checkpoint_through_the_registered_loader():
    # medt_keras.load("x.pth") without the library naming the converter: the
    # entry point that pip installs leads to it. With the converter blocked,
    # the same call is one LoadError naming the file.
    case = ROOT / "tests" / "fixtures" / "official" / "gated_img32_c3_k2_b2_s3_w0.03125_g2_l1-1-1-1.pth"
    out = run_with_blocked(
        f"""
        import medt_keras
        model = medt_keras.load({str(case)!r})
        print(type(model).__name__, "weights_converter.convert" in sys.modules)
        """,
        blocked=("training",),
    )
    assert out.stdout.strip().splitlines()[-1] == "GatedAxialUNet True"
    out = run_library_alone(
        f"""
        import medt_keras
        try:
            medt_keras.load({str(case)!r})
        except medt_keras.LoadError as error:
            print("LoadError:", error)
        """
    )
    message = out.stdout.strip().splitlines()[-1]
    assert message.startswith(f"LoadError: {case}: the reader of official files") and "blocked" in message
