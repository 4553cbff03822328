"""Checks of the Slicer module's files that need no Slicer: syntax, lint, CMake lists, .ui, requirements, icons."""

from __future__ import annotations

import ast
import json
import os
import py_compile
import re
import shutil
import struct
import subprocess
import sys
import types
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MODULE = REPO / "MedSIGHTSlicer"
LIB = MODULE / "MedSIGHTSlicerLib"
SCRIPT = MODULE / "MedSIGHTSlicer.py"
SELF_TEST = MODULE / "Testing" / "Python" / "MedSIGHTSlicerSelfTest.py"
UI = MODULE / "Resources" / "UI" / "MedSIGHTSlicer.ui"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

MODULE_PY = sorted(MODULE.rglob("*.py"))


def cmake_list(text: str, variable: str) -> list[str]:
    """The items of ``set(VARIABLE item ...)`` in a CMakeLists.txt."""
    match = re.search(rf"set\(\s*{variable}\s+(.*?)\)", text, re.S)
    assert match, f"no set({variable} ...)"
    items = [line.split("#", 1)[0].strip() for line in match.group(1).splitlines()]
    return [item for item in items if item]


def ui_widgets() -> dict[str, str]:
    return {w.get("name"): w.get("class") for w in ET.parse(UI).getroot().iter("widget")}


@pytest.mark.parametrize("path", MODULE_PY, ids=lambda p: str(p.relative_to(MODULE)))
def test_compiles_for_slicer_python(path, tmp_path):
    """Slicer 5.8 runs Python 3.9: no newer syntax, and annotations stay unevaluated."""
    py_compile.compile(str(path), cfile=str(tmp_path / "out.pyc"), doraise=True)
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path), feature_version=(3, 9))
    has_functions = any(isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) for node in ast.walk(tree))
    if has_functions:
        futures = [
            alias.name
            for node in tree.body
            if isinstance(node, ast.ImportFrom) and node.module == "__future__"
            for alias in node.names
        ]
        assert "annotations" in futures, f"{path.name} needs 'from __future__ import annotations' (Python 3.9)"


@pytest.mark.parametrize("path", MODULE_PY, ids=lambda p: str(p.relative_to(MODULE)))
def test_no_python_310_only_calls(path):
    """Calls that parse on Python 3.9 but fail when run there (Slicer 5.8): zip(strict=), dataclass(slots=/kw_only=),
    itertools.pairwise."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not isinstance(node, ast.Call):
            continue
        name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
        keywords = {k.arg for k in node.keywords}
        assert not (name == "zip" and "strict" in keywords), f"{path.name}:{node.lineno}: zip(strict=)"
        assert not (name == "dataclass" and keywords & {"slots", "kw_only"}), f"{path.name}:{node.lineno}"
        assert name != "pairwise", f"{path.name}:{node.lineno}: itertools.pairwise"


#: vtkMRMLScene methods returning a collection the caller must delete (Slicer v5.8.0 Libs/MRML/Core/vtkMRMLScene.h:
#: "You are responsible for deleting the returned collection"); from Python it is never deleted, and every node in it
#: stays alive. Only geometry.nodes_by_class calls one, and releases it.
CALLER_DELETES = ("GetNodesByClass", "GetNodesByClassByName", "GetReferencedNodes")


@pytest.mark.parametrize("path", MODULE_PY, ids=lambda p: str(p.relative_to(MODULE)))
def test_scene_collections_are_listed_through_nodes_by_class(path):
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in CALLER_DELETES:
            assert path == LIB / "geometry.py", f"{path.name}:{node.lineno}: use geometry.nodes_by_class"


#: The slicer.util functions the module calls, with their parameters in Slicer 5.8 and 5.10 (Base/Python/slicer/util.py
#: at v5.8.0 and v5.10.0; later versions only add keyword parameters, e.g. pip_install(constraints=) in 5.12), and
#: whether they take **kwargs (passed on to QMessageBox).
SLICER_UTIL = {
    "arrayFromVolume": (("volumeNode",), False),
    "childWidgetVariables": (("widget",), False),
    "confirmOkCancelDisplay": (("text", "windowTitle", "parent"), True),
    "confirmYesNoDisplay": (("text", "windowTitle", "parent"), True),
    "errorDisplay": (("text", "windowTitle", "parent", "standardButtons"), True),
    "warningDisplay": (("text", "windowTitle", "parent", "standardButtons"), True),
    "loadUI": (("path",), False),
    "loadVolume": (("filename", "properties", "returnNode"), False),
    "longPath": (("path",), False),
    "mainWindow": ((), False),
    "pip_install": (("requirements",), False),
    "selectModule": (("module",), False),
    "startupEnvironment": ((), False),
    "tryWithErrorDisplay": (("message", "show", "waitCursor"), False),
}


@pytest.mark.parametrize("path", MODULE_PY, ids=lambda p: str(p.relative_to(MODULE)))
def test_slicer_util_calls_fit_slicer_5_8(path):
    """Every ``slicer.util.f(...)`` call names a function Slicer 5.8 has, with arguments its signature takes there."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        func = node.func if isinstance(node, ast.Call) else None
        if not (isinstance(func, ast.Attribute) and isinstance(func.value, ast.Attribute)
                and func.value.attr == "util" and isinstance(func.value.value, ast.Name)
                and func.value.value.id == "slicer"):
            continue
        where = f"{path.name}:{node.lineno}: slicer.util.{func.attr}"
        assert func.attr in SLICER_UTIL, f"{where}: not in the table (check it in Slicer 5.8's util.py, then add it)"
        params, takes_kwargs = SLICER_UTIL[func.attr]
        assert len(node.args) <= len(params), f"{where}: {len(node.args)} positional arguments"
        keywords = {k.arg for k in node.keywords}
        assert takes_kwargs or keywords <= set(params[len(node.args):]), f"{where}: {sorted(keywords)}"


def _slicer_util_names(path: Path) -> set[str]:
    """Every ``slicer.util.X`` the file names, called or passed on."""
    return {node.attr for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) and node.value.attr == "util"
            and isinstance(node.value.value, ast.Name) and node.value.value.id == "slicer"}


@pytest.mark.parametrize("path", MODULE_PY, ids=lambda p: str(p.relative_to(MODULE)))
def test_slicer_util_functions_passed_on_exist_in_slicer_5_8(path):
    """A ``slicer.util`` function handed to the Lib (not called here) must exist in Slicer 5.8 too."""
    unknown = _slicer_util_names(path) - set(SLICER_UTIL)
    assert not unknown, f"{path.name}: slicer.util.{sorted(unknown)} not in the table (check Slicer 5.8's util.py)"


def test_dicom_seg_export_opens_source_files_through_long_path():
    """The Export button hands ``slicer.util.longPath`` to the DICOM SEG export (see test_dicom_seg): without it a
    database file deeper than 260 characters on Windows is "no longer in the DICOM database"."""
    calls = [node for node in ast.walk(ast.parse(SCRIPT.read_text())) if isinstance(node, ast.Call)
             and getattr(node.func, "id", None) == "export_labelmap_file"]
    assert len(calls) == 1
    passed = calls[0].args[4:] + [k.value for k in calls[0].keywords if k.arg == "long_path"]
    assert [ast.unparse(a) for a in passed] == ["slicer.util.longPath"]


def test_export_dialog_proposes_a_file_in_the_last_export_folder_or_slicers_default_folder():
    """The save dialog's proposed name, bare, resolved in Slicer's working directory (Qt's QFileDialog does so: a
    bare name given to it is selected in the current directory): on Windows the install folder Slicer's shortcut
    starts in (Slicer v5.8.0 CMake/NSIS.template.in:666 SetOutPath "$INSTDIR" before the shortcuts, NSIS's working
    directory for them), which goes with that version. ``proposed_path`` (tested in test_export_slicer.py) puts
    it in the last export's folder kept in Slicer's settings, else ``slicer.app.defaultScenePath`` (Documents unless
    the user chose another, Base/QTCore/qSlicerCoreApplication.cxx:1406; ScreenCapture.py:208 saves there); a written
    export's folder is remembered, a failed one's is not.

    The dialog is ``export_dialog.ask_export_path`` (tested in test_export_dialog.py), given the format box's choice.
    """
    export = next(node for node in ast.walk(ast.parse(SCRIPT.read_text()))
                  if isinstance(node, ast.FunctionDef) and node.name == "onExport")
    dialog = next(node for node in ast.walk(export) if isinstance(node, ast.Call)
                  and ast.unparse(node.func) == "ask_export_path")
    assert [ast.unparse(a) for a in dialog.args[:4]] == [
        "qt.QSettings()", "slicer.app.defaultScenePath", "node.GetName()", "self.ui.exportFormatComboBox.currentIndex"]
    statements = [ast.unparse(node) for node in export.body]
    remembered = statements.index("remember_folder(qt.QSettings(), path)")
    tried = next(n for n, node in enumerate(export.body) if isinstance(node, ast.Try))
    assert remembered > tried and "return" in ast.unparse(export.body[tried].handlers[0])


def test_ruff_passes():
    ruff = shutil.which("ruff") or str(Path(sys.executable).with_name("ruff"))
    if not Path(ruff).exists():
        pytest.skip("ruff is not installed")
    done = subprocess.run(
        [ruff, "check", "MedSIGHTSlicer", "Testing/MedSIGHTSlicerLib"], cwd=REPO, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_module_cmakelists_lists_every_file():
    text = (MODULE / "CMakeLists.txt").read_text()
    assert re.search(r"set\(MODULE_NAME MedSIGHTSlicer\)", text)
    assert "slicerMacroBuildScriptedModule(" in text
    scripts = [s.replace("${MODULE_NAME}", "MedSIGHTSlicer") for s in cmake_list(text, "MODULE_PYTHON_SCRIPTS")]
    resources = [r.replace("${MODULE_NAME}", "MedSIGHTSlicer") for r in cmake_list(text, "MODULE_PYTHON_RESOURCES")]
    # rglob: a sub-package of the Lib must be listed too (ctkMacroCompilePythonScript keeps relative paths).
    on_disk = {"MedSIGHTSlicer.py"} | {p.relative_to(MODULE).as_posix() for p in LIB.rglob("*.py")}
    missing, stale = sorted(on_disk - set(scripts)), sorted(set(scripts) - on_disk)
    assert not missing and not stale, f"CMakeLists.txt lacks {missing}; lists {stale} that do not exist"
    # A data file in the Lib (not .py) is installed only as a resource; Resources/ holds only installed files.
    data_files = {p.relative_to(MODULE).as_posix() for folder in (LIB, MODULE / "Resources") for p in folder.rglob("*")
                  if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts}
    assert set(resources) == data_files, f"CMakeLists.txt lacks {sorted(data_files - set(resources))}; lists " \
                                         f"{sorted(set(resources) - data_files)} that do not exist"
    assert "add_subdirectory(Testing/Python)" in text
    testing = (MODULE / "Testing" / "Python" / "CMakeLists.txt").read_text()
    assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}SelfTest.py)" in testing
    assert SELF_TEST.is_file()


def test_extension_cmakelists_metadata():
    text = (REPO / "CMakeLists.txt").read_text()
    assert re.search(r"^project\(MedSIGHT\)", text, re.M)
    for variable in ("HOMEPAGE", "CONTRIBUTORS", "DESCRIPTION", "ICONURL"):
        value = re.search(rf'set\(EXTENSION_{variable} "([^"]*)"\)', text)
        assert value and value.group(1).strip(), f"EXTENSION_{variable} is empty"
    assert 'set(EXTENSION_CATEGORY "Segmentation")' in text
    assert 'set(EXTENSION_DEPENDS "NA")' in text
    assert "add_subdirectory(MedSIGHTSlicer)" in text
    assert "include(${Slicer_EXTENSION_CPACK})" in text



def test_extensions_index_readiness():
    """LICENSE, contributors as "Name (Organisation)", a real screenshot in Resources/ and a help link to the README's
    Slicer section."""
    text = (REPO / "CMakeLists.txt").read_text()
    assert "Apache License" in (REPO / "LICENSE").read_text()
    homepage = re.search(r'set\(EXTENSION_HOMEPAGE "([^"]+)"\)', text).group(1)
    contributors = re.search(r'set\(EXTENSION_CONTRIBUTORS "([^"]+)"\)', text).group(1)
    assert all(re.fullmatch(r"[^(),]+ \([^()]+\)", c.strip()) for c in contributors.split(","))
    urls = re.search(r'set\(EXTENSION_SCREENSHOTURLS "([^"]+)"\)', text).group(1).split()
    assert urls
    for url in urls:
        path = REPO / url.split("/main/", 1)[1]
        data = path.read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) < 400 * 1024
        width, height = struct.unpack(">II", data[16:24])
        assert width >= 800 and height >= 400
    module = SCRIPT.read_text()
    assert re.search(r'contributors = \["[^"(]+ \([^)]+\)"\]', module)
    help_url = re.search(r'HELP_URL = "([^"]+)"', module).group(1)
    assert help_url.startswith(homepage + "#")
    anchor = help_url.split("#", 1)[1]
    headings = re.findall(r"^## (.+)$", (REPO / "README.md").read_text(), re.M)
    assert anchor in {re.sub(r"[^a-z0-9 -]", "", h.lower()).replace(" ", "-") for h in headings}


def test_ui_names_every_widget_the_module_uses():
    widgets = ui_widgets()
    root = ET.parse(UI).getroot()
    assert root.findtext("class") == "MedSIGHTSlicer"
    assert widgets["MedSIGHTSlicer"] == "qMRMLWidget"  # setMRMLScene() is called on it
    used = set(re.findall(r"\.ui\.(\w+)", SCRIPT.read_text() + SELF_TEST.read_text()))
    assert used, "the widget looks up no .ui widgets?"
    assert used <= set(widgets), f"not in the .ui: {sorted(used - set(widgets))}"
    assert widgets["inputVolumeSelector"] == "qMRMLNodeComboBox"
    assert widgets["tokenLineEdit"] == "QLineEdit"
    placeholder = next(w for w in root.iter("widget") if w.get("name") == "chatPanelPlaceholder")
    assert placeholder.find("layout") is not None, "the chat panel is added to the placeholder's layout"
    declared = {c.findtext("class") for c in root.iter("customwidget")}
    assert {"ctkCollapsibleButton", "qMRMLNodeComboBox", "qMRMLWidget"} <= declared
    connections = [(c.findtext("receiver"), c.findtext("slot")) for c in root.iter("connection")]
    assert ("inputVolumeSelector", "setMRMLScene(vtkMRMLScene*)") in connections


def test_module_classes_and_lib_imports():
    tree = ast.parse(SCRIPT.read_text())
    classes = {node.name for node in tree.body if isinstance(node, ast.ClassDef)}
    assert {"MedSIGHTSlicer", "MedSIGHTSlicerWidget", "MedSIGHTSlicerLogic", "MedSIGHTSlicerTest"} <= classes
    # Every name imported from the Lib exists there (the Lib's MRML modules need vtk, so check by parsing).
    for path in (SCRIPT, SELF_TEST):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("MedSIGHTSlicerLib"):
                target = LIB / (node.module.split(".", 1)[1] + ".py") if "." in node.module else LIB / "__init__.py"
                assert target.is_file(), f"{path.name}: no {target.name}"
                source = ast.parse(target.read_text())
                defined = {n.name for n in source.body if isinstance(n, (ast.ClassDef, ast.FunctionDef))}
                defined |= {t.id for n in source.body if isinstance(n, ast.Assign) for t in n.targets
                            if isinstance(t, ast.Name)}
                defined |= {a.asname or a.name for n in source.body if isinstance(n, (ast.Import, ast.ImportFrom))
                            for a in n.names}
                for alias in node.names:
                    if target.name == "__init__.py" and (LIB / f"{alias.name}.py").is_file():
                        continue  # a submodule: `from MedSIGHTSlicerLib import geometry`
                    assert alias.name in defined, f"{path.name}: {node.module} has no {alias.name}"
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    assert alias.name.split(".")[0] != "MedSIGHTSlicerLib" or (LIB / "__init__.py").is_file()


class _SlicerLogicBase:
    """``__init__`` of Slicer's ScriptedLoadableModuleLogic as written in Base/Python/slicer/ScriptedLoadableModule.py
    (the same in v5.8.0, v5.10.0, v5.12.0 and master): it calls ``super().__init__()`` without arguments, so the next
    class in the subclass's MRO is constructed with none."""

    def __init__(self, parent=None):
        super().__init__()
        self.moduleName = self.__class__.__name__
        if self.moduleName.endswith("Logic"):
            self.moduleName = self.moduleName[:-5]
        self.isSingletonParameterNode = True


def test_module_logic_constructs_under_slicers_logic_base():
    """The module's Logic (the class statement of MedSIGHTSlicer.py, run against Slicer's base ``__init__`` and the
    real MedSIGHTSession on a slicer-core scene) constructs and watches its scene. With MedSIGHTSession after the
    Slicer base, the base's ``super().__init__()`` reached MedSIGHTSession.__init__ without its scene: a TypeError in
    the widget's setup(), so the module panel never opened."""
    slicer = pytest.importorskip("slicer")
    import __future__

    from MedSIGHTSlicerLib.session import MedSIGHTSession

    scene = slicer.vtkMRMLScene()
    namespace = {"__name__": "MedSIGHTSlicer", "ScriptedLoadableModuleLogic": _SlicerLogicBase,
                 "MedSIGHTSession": MedSIGHTSession, "slicer": types.SimpleNamespace(mrmlScene=scene)}
    logic_class = next(node for node in ast.parse(SCRIPT.read_text()).body
                       if isinstance(node, ast.ClassDef) and node.name == "MedSIGHTSlicerLogic")
    code = compile(ast.Module([logic_class], []), str(SCRIPT), "exec", flags=__future__.annotations.compiler_flag)
    exec(code, namespace)
    logic = namespace["MedSIGHTSlicerLogic"]()
    try:
        assert logic.moduleName == "MedSIGHTSlicer" and logic.scene is scene
        resets = []
        logic.on_reset = lambda: resets.append(True)
        scene.Clear(0)
        assert len(resets) == 2  # StartCloseEvent and EndCloseEvent of the scene it was given
    finally:
        logic.stop_observing()


def test_module_script_is_thin():
    """The module file only wires the Lib to Slicer: behaviour belongs in MedSIGHTSlicerLib (tested here)."""
    lines = [line for line in SCRIPT.read_text().splitlines() if line.strip() and not line.strip().startswith("#")]
    assert len(lines) < 355


@pytest.mark.parametrize(
    "path", [MODULE / "Resources" / "Icons" / "MedSIGHTSlicer.png", REPO / "Resources" / "Icons" / "MedSIGHT.png"]
)
def test_icons_are_small_valid_pngs(path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (128, 128)
    assert len(data) < 30 * 1024
    assert data.rstrip(b"\x00")[-8:-4] == b"IEND"


def _readme_code() -> list[str]:
    """Every piece of code the README shows: each line of its fenced blocks, then each inline code span (one may
    break across lines: "`medsight\nserve`")."""
    text = (REPO / "README.md").read_text()
    blocks = re.findall(r"^```[a-z]*\n(.*?)^```", text, re.M | re.S)
    prose = re.sub(r"^```[a-z]*\n.*?^```", "", text, flags=re.M | re.S)
    return [line for block in blocks for line in block.splitlines()] + [
        " ".join(span.split()) for span in re.findall(r"`([^`]+)`", prose)]


def _command_options() -> dict[str, set[str]]:
    """The options of every command line a user types: `medsight <command>`, `medsight train plan|merge`."""
    import argparse

    from medsight.cli import _parser
    from medsight.evaluate import cli as eval_cli
    from medsight.train import cli as train_cli

    def options(parser: argparse.ArgumentParser) -> set[str]:
        return {option for action in parser._actions for option in action.option_strings}

    commands = _parser()._subparsers._group_actions[0].choices  # argparse keeps sub-parsers here
    known = {name: options(sub) for name, sub in commands.items()}
    # `train` and `eval` hand their arguments to their own parsers (and `train plan|merge` to theirs).
    known.update({"train": options(train_cli.parser()), "train plan": options(train_cli.plan_parser()),
                  "train merge": options(train_cli.merge_parser()), "eval": options(eval_cli.parser())})
    return known


def test_readme_commands_name_only_existing_options():
    """Every `medsight ...` command the README shows (code blocks and inline code, torchrun's
    `-m medsight.train.cli` included) names a command that exists and only options that command's parser has; and
    the README shows every command."""
    known = _command_options()
    shown = set()
    for code in _readme_code():
        code = code.split(" #")[0]  # a block's comment is prose
        for found in re.finditer(r"(?:^|[\s/\\])medsight(?:\.exe)? ([a-z][a-z-]*)(?: (plan|merge)\b)?([^;|]*)"
                                 r"|-m medsight\.train\.cli ()()([^;|]*)", code):
            command, sub, rest = found.group(1), found.group(2), found.group(3)
            if found.group(1) is None:
                command, sub, rest = "train", None, found.group(6)
            name = f"{command} {sub}" if sub else command
            assert name in known, f"README: `medsight {name}` is no command ({code!r})"
            shown.add(name)
            for option in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", rest):
                assert option in known[name], f"README: `medsight {name} {option}` does not exist ({code!r})"
    assert shown == set(known), f"the README shows no `medsight {' / '.join(sorted(set(known) - shown))}`"


def test_readme_scripts_name_only_existing_options():
    """The benchmark scripts and `python -m medsight.<module>` tools the README shows take the options it names."""
    shown = 0
    for code in _readme_code():
        for found in re.finditer(r"(?:benchmarks/)?([a-z_]+)\.py\b([^;|]*)|-m (medsight\.[a-z_.]+)([^;|]*)", code):
            name, rest = (found.group(1), found.group(2)) if found.group(1) else (found.group(3), found.group(4))
            script = (REPO / "benchmarks" / f"{name}.py" if found.group(1)
                      else REPO / "engine" / (name.replace(".", "/") + ".py"))
            if not script.is_file() or name == "medsight.train.cli":  # a module file named in prose; the trainer
                continue  # is checked with the `medsight` commands
            takes = set(re.findall(r"[\"'](--[a-z][a-z0-9-]*)[\"']", script.read_text()))
            for option in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", rest):
                assert option in takes, f"README: `{name} {option}`: {script.name} has no such option ({code!r})"
                shown += 1
    assert shown, "the README shows no benchmark or tool options any more: is the parsing still right?"


def test_readme_environment_variables_are_read():
    """Each MEDSIGHT_* variable the README tells a user to set is read by the engine, the module, a script or the
    tests (MEDSIGHT_GOLDEN_DIR): a shell `${VAR...}`, or a Python file using os.environ that quotes the name."""
    named = set(re.findall(r"\bMEDSIGHT_[A-Z_]+\b", (REPO / "README.md").read_text()))
    assert named, "the README names no MEDSIGHT_* variable"
    sources = [*REPO.glob("engine/medsight/**/*.py"), *REPO.glob("MedSIGHTSlicer/**/*.py"), *REPO.glob("scripts/*.sh"),
               REPO / "Testing" / "conftest.py"]
    texts = [path.read_text() for path in sources]
    for variable in sorted(named):
        assert any(re.search(rf"\$\{{{variable}\b", text) or (
            re.search(rf"[\"']{variable}[\"']", text) and re.search(r"os\.environ|getenv", text)) for text in texts), \
            f"README names {variable}, which nothing reads"


def test_install_section_names_both_ways_to_add_the_module():
    readme = (REPO / "README.md").read_text()
    text = readme[readme.index("## Install in 3D Slicer") :]
    text = text[: text.index("\n## ", 1)]
    assert "Additional module paths" in text and "Extension Wizard" in text


def test_readme_names_every_config_field_a_resume_may_change():
    """The README's list of the config fields `--resume` lets differ from the run's is `RESUMABLE_CHANGES`."""
    from medsight.train.loop import RESUMABLE_CHANGES

    readme = " ".join((REPO / "README.md").read_text().split())
    start = readme.index("`--resume` refuses a config that differs")
    sentence = readme[start : readme.index("(what is written", start)]
    named = re.findall(r"`([a-z_]+)`", sentence)
    assert sorted(named) == sorted(RESUMABLE_CHANGES), f"README names {named}; the trainer allows {RESUMABLE_CHANGES}"


def test_readme_vision_files_are_hub_addresses():
    """A bare file name after --vision-file is a local path that no reader has: every one the README shows is a Hub
    address (REPO_ID:FILENAME), which the engine downloads once."""
    from medsight.model.hub import parse_hub_file

    values = re.findall(r"--vision-file[ =]([^\s`]+)", (REPO / "README.md").read_text())
    assert values, "the README shows no --vision-file"
    for value in values:
        assert parse_hub_file(value) is not None, f"README: --vision-file {value} is not a Hub address"


# -- the .ui and the module file's wiring, checked against the classes Slicer gives them -----------------------------
#: What PythonQt offers on each class the module's .ui and wiring use: properties (read and written as attributes:
#: PythonQt looks a name up as a property before a method, PythonQtClassInfo::member in commontk/PythonQt, so
#: ``label.text()`` is a TypeError there), signals by normalized signature (a signature the class lacks connects
#: nothing: PythonQt only prints a warning) and the methods the module calls. Taken from Slicer v5.8.0 (unchanged at
#: v5.12.0) Libs/MRML/Widgets/qMRMLNodeComboBox.h and qMRMLWidget.h, Base/QTGUI/qSlicerApplication.h
#: (startupCompleted), CTK Libs/Widgets/ctkCollapsibleButton.h, and the Qt 5.15 class references.
_QOBJECT = {"base": None, "properties": {"objectName"},
            "signals": {"destroyed()", "destroyed(QObject*)", "objectNameChanged(QString)"},
            "methods": {"connect", "disconnect", "blockSignals", "deleteLater", "setObjectName"}}
_QWIDGET = {"base": "QObject",
            "properties": {"enabled", "visible", "geometry", "toolTip", "statusTip", "whatsThis", "windowTitle",
                           "styleSheet", "sizePolicy", "minimumSize", "maximumSize", "minimumWidth", "minimumHeight",
                           "maximumWidth", "maximumHeight", "font", "palette", "focusPolicy", "layoutDirection"},
            "signals": {"customContextMenuRequested(QPoint)", "windowTitleChanged(QString)"},
            "methods": {"layout", "setLayout", "show", "hide", "setEnabled", "setVisible", "setToolTip"}}
UI_CLASSES: dict[str, dict] = {
    "QObject": _QOBJECT,
    "QWidget": _QWIDGET,
    "QAbstractButton": {"base": "QWidget",
                        "properties": {"text", "icon", "iconSize", "shortcut", "checkable", "checked", "autoRepeat",
                                       "autoExclusive", "down"},
                        "signals": {"clicked(bool)", "clicked()", "pressed()", "released()", "toggled(bool)"},
                        "methods": {"click", "setText", "setChecked", "isChecked"}},
    "QPushButton": {"base": "QAbstractButton", "properties": {"autoDefault", "default", "flat"}, "signals": set(),
                    "methods": set()},
    "QCheckBox": {"base": "QAbstractButton", "properties": {"tristate"}, "signals": {"stateChanged(int)"},
                  "methods": set()},
    "QLineEdit": {"base": "QWidget",
                  "properties": {"text", "echoMode", "placeholderText", "readOnly", "maxLength", "inputMask", "frame",
                                 "alignment", "modified", "clearButtonEnabled", "cursorPosition"},
                  "signals": {"editingFinished()", "returnPressed()", "textChanged(QString)", "textEdited(QString)",
                              "selectionChanged()", "cursorPositionChanged(int,int)", "inputRejected()"},
                  "methods": {"setText", "clear"}},
    "QLabel": {"base": "QWidget",
               "properties": {"text", "wordWrap", "textFormat", "alignment", "margin", "indent", "pixmap",
                              "openExternalLinks", "textInteractionFlags", "scaledContents"},
               "signals": {"linkActivated(QString)", "linkHovered(QString)"}, "methods": {"setText"}},
    "QComboBox": {"base": "QWidget",
                  "properties": {"currentIndex", "currentText", "currentData", "count", "editable", "maxVisibleItems",
                                 "maxCount", "insertPolicy", "sizeAdjustPolicy", "placeholderText"},
                  "signals": {"currentIndexChanged(int)", "currentTextChanged(QString)", "activated(int)",
                              "highlighted(int)", "editTextChanged(QString)", "textActivated(QString)"},
                  "methods": {"addItem", "addItems", "clear", "setCurrentIndex", "findText", "itemText"}},
    "QTimer": {"base": "QObject", "properties": {"singleShot", "interval", "remainingTime", "timerType", "active"},
               "signals": {"timeout()"}, "methods": {"start", "stop", "setInterval", "setSingleShot"}},
    "ctkCollapsibleButton": {"base": "QAbstractButton",
                             "properties": {"collapsed", "collapsedHeight", "flat", "contentsFrameShape",
                                            "contentsFrameShadow", "contentsLineWidth", "contentsMidLineWidth",
                                            "buttonTextAlignment", "indicatorAlignment"},
                             "signals": {"contentsCollapsed(bool)"}, "methods": set()},
    "qMRMLWidget": {"base": "QWidget", "properties": set(), "signals": {"mrmlSceneChanged(vtkMRMLScene*)"},
                    "methods": {"setMRMLScene", "mrmlScene"}},
    "qMRMLNodeComboBox": {"base": "QWidget",
                          "properties": {"currentNodeID", "currentNodeId", "nodeTypes", "showHidden",
                                         "showChildNodeTypes", "hideChildNodeTypes", "baseName", "noneEnabled",
                                         "addEnabled", "removeEnabled", "editEnabled", "renameEnabled",
                                         "interactionNodeSingletonTag", "selectNodeUponCreation", "noneDisplay",
                                         "sizeAdjustPolicy"},
                          "signals": {"currentNodeChanged(vtkMRMLNode*)", "currentNodeChanged(bool)",
                                      "currentNodeIDChanged(QString)", "nodeActivated(vtkMRMLNode*)",
                                      "nodeAdded(vtkMRMLNode*)", "nodeAddedByUser(vtkMRMLNode*)",
                                      "nodeAboutToBeRemoved(vtkMRMLNode*)", "currentNodeRenamed(QString)",
                                      "nodeAboutToBeEdited(vtkMRMLNode*)"},
                          "methods": {"setMRMLScene", "mrmlScene", "currentNode", "setCurrentNode", "setCurrentNodeID",
                                      "nodeCount", "nodeFromIndex"}},
    "qSlicerApplication": {"base": "QObject", "properties": set(), "signals": {"startupCompleted()", "aboutToQuit()"},
                           "methods": set()},
}


def class_members(name: str, kind: str) -> set[str]:
    """``kind`` ("properties", "signals", "methods") of class ``name`` and its bases in UI_CLASSES."""
    found: set[str] = set()
    while name is not None:
        assert name in UI_CLASSES, f"{name} is not in UI_CLASSES: look it up in Slicer/CTK/Qt sources and add it"
        found |= UI_CLASSES[name][kind]
        name = UI_CLASSES[name]["base"]
    return found


def normalized_signature(signature: str) -> str:
    """Qt's normalized form for the signatures used here: no spaces, ``const T&`` -> ``T``."""
    signature = re.sub(r"\bconst\s+", "", signature).replace("&", "")
    return re.sub(r"\s+", "", signature)


def test_ui_widget_classes_and_properties_exist():
    """Every widget class in the .ui is one Slicer's UI loader knows (in the table above), and every property the .ui
    sets is one that class has: QUiLoader skips an unknown property with only a warning."""
    root = ET.parse(UI).getroot()
    for widget in root.iter("widget"):
        cls, name = widget.get("class"), widget.get("name")
        properties = class_members(cls, "properties")
        for prop in widget.findall("property"):
            assert prop.get("name") in properties, f"{name} ({cls}) has no property {prop.get('name')!r}"
    for connection in root.iter("connection"):
        sender, receiver = connection.findtext("sender"), connection.findtext("receiver")
        signal, slot = connection.findtext("signal"), connection.findtext("slot")
        classes = ui_widgets()
        assert signal in class_members(classes[sender], "signals"), f".ui connection: {sender} has no {signal}"
        assert slot.split("(")[0] in class_members(classes[receiver], "methods"), f".ui: {receiver} has no {slot}"


def _ui_chain(node: ast.AST) -> str | None:
    """``x.ui.<name>`` -> ``<name>``."""
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) and node.value.attr == "ui":
        return node.attr
    return None


def _qt_assignments(tree: ast.AST) -> dict[str, str]:
    """``self.<attr> = qt.<Class>(...)`` in the module file -> {attr: Class}."""
    found = {}
    for node in ast.walk(tree):
        if (isinstance(node, ast.Assign) and isinstance(node.value, ast.Call)
                and isinstance(node.value.func, ast.Attribute) and isinstance(node.value.func.value, ast.Name)
                and node.value.func.value.id == "qt"):
            for target in node.targets:
                if isinstance(target, ast.Attribute):
                    found[target.attr] = node.value.func.attr
    return found


def _receiver_class(node: ast.AST, qt_objects: dict[str, str]) -> str | None:
    widgets = ui_widgets()
    name = _ui_chain(node)
    if name is not None:
        return widgets[name]
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self":
        return qt_objects.get(node.attr)
    if ast.unparse(node) == "slicer.app":
        return "qSlicerApplication"
    return None


def module_connections(source: str) -> list[tuple[int, str, str]]:
    """(line, receiver class, signal) of every ``receiver.connect("signal(...)", slot)`` in ``source``."""
    tree = ast.parse(source)
    qt_objects = _qt_assignments(tree)
    found = []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "connect"
                and node.args and isinstance(node.args[0], ast.Constant)
                and re.fullmatch(r"\w+\(.*\)", str(node.args[0].value))):  # not the logic's connect(url)
            cls = _receiver_class(node.func.value, qt_objects)
            assert cls is not None, f"line {node.lineno}: connect on {ast.unparse(node.func.value)}: add its class"
            found.append((node.lineno, cls, node.args[0].value))
    return found


def test_module_connects_only_signals_the_widgets_have():
    """Each ``.connect("signal(args)", slot)`` in the module file names a signal its receiver's class has. PythonQt
    looks the signature up (normalized, PythonQtSignalReceiver::getSignalIndex) and, for one the class lacks, only
    prints "signal ... does not exist" and connects nothing (PythonQtStdDecorators::connect, commontk/PythonQt)."""
    connections = module_connections(SCRIPT.read_text())
    assert len(connections) >= 8  # the module's buttons, fields, selector, timers and Slicer's startup
    for line, cls, signal in connections:
        signals = class_members(cls, "signals")
        assert normalized_signature(signal) in signals, f"MedSIGHTSlicer.py:{line}: {cls} has no signal {signal}"


def test_module_reads_ui_properties_as_attributes_and_calls_only_methods():
    """``self.ui.<name>.<attr>`` in the module file and the self-test: an attribute read or written is a property of
    that widget's class, a call is a method of it (never a property called like a method)."""
    widgets = ui_widgets()
    for path in (SCRIPT, SELF_TEST):
        tree = ast.parse(path.read_text())
        called = {id(node.func) for node in ast.walk(tree) if isinstance(node, ast.Call)}
        for node in ast.walk(tree):
            if not isinstance(node, ast.Attribute) or _ui_chain(node.value) is None:
                continue
            cls = widgets[_ui_chain(node.value)]
            where = f"{path.name}:{node.lineno}: {ast.unparse(node)} ({cls})"
            if id(node) in called:
                assert node.attr not in class_members(cls, "properties"), f"{where}: a property, read it unbound"
                assert node.attr in class_members(cls, "methods"), f"{where}: no such method"
            else:
                assert node.attr in class_members(cls, "properties"), f"{where}: no such property"


#: Qt classes the Lib gets back from Qt calls without naming them (``QTextEdit.verticalScrollBar()``).
LIB_REACHED_QT_CLASSES = ("QScrollBar",)
#: Qt methods whose result is a value class, not a QObject (``QTextEdit.textCursor()``: a QTextCursor), on which
#: PythonQt finds methods as PySide does (it shadows methods by properties on QObjects only).
QT_VALUE_RESULTS = ("textCursor",)


def qt_property_calls(source: str, properties: set[str]) -> list[str]:
    """Zero-argument calls ``x.<name>()`` in ``source`` whose name is in ``properties`` and whose receiver may be a
    QObject, as 'line: call'."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and not node.args
                and not node.keywords and node.func.attr in properties):
            continue
        receiver = node.func.value
        if isinstance(receiver, ast.Call) and getattr(receiver.func, "attr", None) in QT_VALUE_RESULTS:
            continue
        found.append(f"{node.lineno}: {ast.unparse(node)}")
    return found


def test_lib_never_calls_a_qt_property_like_a_method():
    """PythonQt looks a name up as a Qt property before a method (PythonQtClassInfo::member, commontk/PythonQt
    db525aff, the PythonQt of Slicer v5.8.0's CTK): on a QObject ``label.text`` is the text and ``label.text()`` a
    TypeError ('str' object is not callable) each time it runs in Slicer, while PySide6, which runs the Lib's tests,
    has only the method. So the Lib reads properties through ``qt_shim.prop`` and never calls one: no zero-argument
    call in it names a property of a QObject class it uses (read from Qt's own meta-objects)."""
    qt_modules = [pytest.importorskip(f"qtpy.{name}") for name in ("QtWidgets", "QtGui", "QtCore")]
    sources = {path.name: path.read_text(encoding="utf-8") for path in sorted(LIB.glob("*.py"))}
    names = {n for text in sources.values() for n in re.findall(r"\bqt\.(Q[A-Za-z]+)", text)}
    classes = [next(getattr(m, n) for m in qt_modules if hasattr(m, n))
               for n in sorted(names | set(LIB_REACHED_QT_CLASSES))]
    properties = {str(cls.staticMetaObject.property(n).name()) for cls in classes
                  if isinstance(cls, type) and issubclass(cls, qt_modules[2].QObject)
                  for n in range(cls.staticMetaObject.propertyCount())}
    assert {"text", "value", "palette", "count", "topLevelItemCount"} <= properties  # the meta-objects were read
    calls = {name: qt_property_calls(text, properties) for name, text in sources.items()}
    assert not {name: found for name, found in calls.items() if found}, "read these with qt_shim.prop(obj, name)"
    # The check sees a property called like a method (theme.colours_of called palette, behind a callable test).
    assert qt_property_calls("bar.value()\nbar.setValue(1)\nitem.text(0)\nw.textCursor().hasSelection()\n",
                             properties) == ["1: bar.value()"]


def test_ui_layouts_fit_what_the_module_adds():
    """The module adds rows to the Engine section (QFormLayout.addRow) and widgets to the conversation placeholder
    (a box layout's addWidget)."""
    root = ET.parse(UI).getroot()
    layouts = {w.get("name"): w.find("layout").get("class") for w in root.iter("widget")
               if w.find("layout") is not None}
    source = SCRIPT.read_text()
    for name, method in re.findall(r"self\.ui\.(\w+)\.layout\(\)\.(\w+)\(", source):
        expected = {"addRow": {"QFormLayout"}, "addWidget": {"QVBoxLayout", "QHBoxLayout", "QFormLayout"}}[method]
        assert layouts.get(name) in expected, f"{name} has a {layouts.get(name)}, the module calls {method}"


def test_resources_the_module_opens_are_installed():
    """Every ``self.resourcePath(...)`` the module opens is listed in MODULE_PYTHON_RESOURCES (so the extension
    package has it), as is the module icon ScriptedLoadableModule looks for (Resources/Icons/<module name>.png,
    Base/Python/slicer/ScriptedLoadableModule.py at v5.8.0)."""
    from MedSIGHTSlicerLib import naming

    text = (MODULE / "CMakeLists.txt").read_text()
    resources = {r.replace("${MODULE_NAME}", "MedSIGHTSlicer") for r in cmake_list(text, "MODULE_PYTHON_RESOURCES")}
    constants = {"TERMINOLOGY_FILE": naming.TERMINOLOGY_FILE}
    opened = []
    for node in ast.walk(ast.parse(SCRIPT.read_text())):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "resourcePath":
            arg = node.args[0]
            value = arg.value if isinstance(arg, ast.Constant) else constants.get(getattr(arg, "id", ""))
            assert value is not None, f"line {node.lineno}: resourcePath({ast.unparse(arg)}): add it to `constants`"
            opened.append(f"Resources/{value}")
    assert len(opened) >= 2  # the .ui and the terminology context
    missing = sorted({*opened, "Resources/Icons/MedSIGHTSlicer.png"} - resources)
    assert not missing, f"opened at run time but not installed: {missing}"
    for path in opened:
        assert (MODULE / path).is_file(), path


def test_extension_wizard_finds_the_module():
    """Slicer's Extension Wizard (README: "Select Extension") loads a folder's modules with ModuleInfo.findModules
    (Modules/Scripted/ExtensionWizard/ExtensionWizardLib/ModuleInfo.py, v5.8.0 to v5.12.0): it reads each .py with the
    platform's default encoding (cp1252 on Windows, where a UTF-8 byte above 127 may fail and hide the module), skips
    folders holding an __init__.py and wants a class named like the file whose base is the bare name
    ``ScriptedLoadableModule``."""
    assert not (MODULE / "__init__.py").exists() and not (REPO / "__init__.py").exists()
    data = SCRIPT.read_bytes()
    assert data.isascii(), f"non-ASCII byte at {next(i for i, b in enumerate(data) if b > 127)}"
    module_class = next(n for n in ast.parse(data).body if isinstance(n, ast.ClassDef) and n.name == SCRIPT.stem)
    assert "ScriptedLoadableModule" in [getattr(base, "id", None) for base in module_class.bases]


@pytest.mark.parametrize("slicer_version", ["5.8", "5.12"])
def test_module_package_install_failure_reaches_the_user_once_and_clearly(slicer_version):
    """The module file's ensure_packages, run with a real pip that fails and the slicer.util behaviour it relies on:
    Slicer's tryWithErrorDisplay shows a dialog and then re-raises (Base/Python/slicer/util.py, v5.8.0 l.3279-3320,
    same in v5.12.0), and pip_install raises CalledProcessError. Before, the install ran inside tryWithErrorDisplay
    with a ``return False`` after it that never ran: the user got the dialog, then Export's own message with a pip
    command line in it. Now the one error is a ValueError naming the package, the wait cursor is restored. Slicer
    5.12's pip_install shows an error dialog of its own unless told ``show_progress=False`` (see
    ``packages.pip_install_without_dialogs``): it showed one, then Export's message came too."""
    import __future__

    import contextlib

    from medsight_testing.pip import UNINSTALLABLE, SlicerPackagingPipInstall, pip_install
    from MedSIGHTSlicerLib import packages

    slicer_512 = SlicerPackagingPipInstall()

    dialogs, cursor = [], []

    @contextlib.contextmanager
    def try_with_error_display(message=None, show=True, waitCursor=False):
        try:
            yield
        except Exception as err:
            dialogs.append(f"{message}\n\n{err}")
            raise

    util = types.SimpleNamespace(confirmOkCancelDisplay=lambda text, windowTitle=None: True,
                                 pip_install=slicer_512 if slicer_version == "5.12" else pip_install,
                                 tryWithErrorDisplay=try_with_error_display)
    app = types.SimpleNamespace(setOverrideCursor=lambda shape: cursor.append(shape),
                                restoreOverrideCursor=lambda: cursor.pop())
    namespace = {"packages": packages, "slicer": types.SimpleNamespace(util=util, app=app),
                 "qt": types.SimpleNamespace(Qt=types.SimpleNamespace(WaitCursor="wait"))}
    function = next(node for node in ast.parse(SCRIPT.read_text()).body
                    if isinstance(node, ast.FunctionDef) and node.name == "ensure_packages")
    exec(compile(ast.Module([function], []), str(SCRIPT), "exec", flags=__future__.annotations.compiler_flag),
         namespace)
    with pytest.raises(ValueError, match=r"^installing medsight-no-such-package into Slicer's Python failed \(pip "
                                         r"exit status 1\)"):
        namespace["ensure_packages"]([UNINSTALLABLE], "DICOM SEG export")
    assert dialogs == [] and slicer_512.dialogs == [] and cursor == []


def _required_positional(function: ast.FunctionDef | ast.Lambda, bound: bool) -> int:
    """Positional parameters without a default (``self`` not counted for a bound method); -1: takes ``*args``."""
    args = function.args
    if args.vararg is not None:
        return -1
    positional = args.posonlyargs + args.args
    return len(positional) - len(args.defaults) - (1 if bound else 0)


def test_module_slots_take_what_the_signal_passes():
    """PythonQt calls a slot with the signal's arguments, dropping those beyond the slot's own positional parameters
    (PythonQtSignalTarget::call, commontk/PythonQt), but never supplies missing ones: a slot needing more than the
    signal carries raises TypeError each time it fires. Every slot the module file connects takes at most what its
    signal passes."""
    tree = ast.parse(SCRIPT.read_text())
    methods = {node.name: node for cls in tree.body if isinstance(cls, ast.ClassDef) for node in cls.body
               if isinstance(node, ast.FunctionDef)}
    lib_classes = {"engine": (LIB / "engine_process.py", "EngineProcess")}
    checked = 0
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "connect"
                and len(node.args) == 2 and isinstance(node.args[0], ast.Constant)
                and re.fullmatch(r"\w+\(.*\)", str(node.args[0].value))):
            continue
        signal, slot = node.args[0].value, node.args[1]
        passed = len([a for a in signal[signal.index("(") + 1:-1].split(",") if a.strip()])
        if isinstance(slot, ast.Lambda):
            needed = _required_positional(slot, bound=False)
        elif isinstance(slot, ast.Attribute) and isinstance(slot.value, ast.Name) and slot.value.id == "self":
            needed = _required_positional(methods[slot.attr], bound=True)
        else:  # self.<lib object>.<method>
            path, cls_name = lib_classes[slot.value.attr]
            cls = next(c for c in ast.parse(path.read_text()).body
                       if isinstance(c, ast.ClassDef) and c.name == cls_name)
            needed = _required_positional(next(f for f in cls.body if getattr(f, "name", "") == slot.attr), bound=True)
        assert needed <= passed, f"MedSIGHTSlicer.py:{node.lineno}: {ast.unparse(slot)} needs {needed}, {signal} passes"
        checked += 1
    assert checked == len(module_connections(SCRIPT.read_text()))


class _SlicerModuleBase:
    """What the module class uses of Slicer's ScriptedLoadableModule (Base/Python/slicer/ScriptedLoadableModule.py,
    v5.8.0 to v5.12.0): the parent kept, and resourcePath = <folder of parent.path>/Resources/<filename>."""

    def __init__(self, parent):
        self.parent = parent

    def resourcePath(self, filename):  # noqa: N802 - Slicer's name
        return str(Path(self.parent.path).parent / "Resources" / filename)


def test_terminology_is_loaded_at_startup_not_only_when_the_panel_opens():
    """Slicer 5.8's terminology picker finds an entry only in a loaded context: for any other it logs "Failed to find
    terminology with context name" and selects nothing (qSlicerTerminologyNavigatorWidget::setTerminologyEntry,
    Modules/Loadable/Terminologies/Widgets/qSlicerTerminologyNavigatorWidget.cxx at v5.8.0). Segments the module
    wrote name its context ("... - MedSIGHT"), which the module loaded only in the widget's setup(): reopening a saved
    segmentation in a later session, its terms could not be shown or edited until the MedSIGHT panel had been opened.
    The module now loads the context at start-up (as SlicerMONAIAuto3DSeg does), once: the widget's call adds none."""
    import __future__

    from MedSIGHTSlicerLib import naming

    connections, loads = {}, []

    class Terminologies:
        def LoadTerminologyFromFile(self, path):  # noqa: N802 - Slicer's name
            loads.append(path)
            return json.loads(Path(path).read_text())["SegmentationCategoryTypeContextName"]

    class Store(dict):
        def value(self, key, default=None):
            return self.get(key, default)

    app = types.SimpleNamespace(connect=lambda signal, slot: connections.setdefault(signal, []).append(slot),
                                commandOptions=lambda: types.SimpleNamespace(noMainWindow=True))
    slicer = types.SimpleNamespace(app=app, modules=types.SimpleNamespace(
        terminologies=types.SimpleNamespace(logic=Terminologies)))
    namespace = {"__name__": "MedSIGHTSlicer", "ScriptedLoadableModule": _SlicerModuleBase, "slicer": slicer,
                 "qt": types.SimpleNamespace(QSettings=Store)}
    tree = ast.parse(SCRIPT.read_text())
    def wanted(node: ast.stmt) -> bool:  # the Lib imports, the constants and the module class
        if isinstance(node, ast.ImportFrom):
            return (node.module or "").startswith("MedSIGHTSlicerLib")
        if isinstance(node, ast.Assign):
            return all(isinstance(t, ast.Name) and t.id.isupper() for t in node.targets)
        return isinstance(node, ast.ClassDef) and node.name == "MedSIGHTSlicer"

    nodes = [node for node in tree.body if wanted(node)]
    exec(compile(ast.Module(nodes, []), str(SCRIPT), "exec", flags=__future__.annotations.compiler_flag), namespace)
    module = namespace["MedSIGHTSlicer"](types.SimpleNamespace(path=str(SCRIPT)))
    for slot in connections.get("startupCompleted()", []):
        slot()
    assert loads == [str(MODULE / "Resources" / naming.TERMINOLOGY_FILE)]
    assert module.terminology_context == naming.TERMINOLOGY_CONTEXT  # the name its entries carry
    module.load_terminology()  # what the widget's setup() calls, for a module loaded after start-up
    assert len(loads) == 1


def _module_file_as_module(name: str, slicer, base) -> types.ModuleType:
    """The module file's Lib imports and classes, run as the module ``name`` in sys.modules (as Slicer loads it),
    against ``slicer`` and the ScriptedLoadableModule base ``base``; run again, it is what
    slicer.util.reloadScriptedModule does (v5.8.0 util.py:1428-1430: the file run again into the same module)."""
    import __future__

    class Store(dict):  # QSettings as far as the settings are read
        def value(self, key, default=None):
            return self.get(key, default)

    tree = ast.parse(SCRIPT.read_text())
    nodes = [node for node in tree.body if (isinstance(node, ast.ImportFrom)
                                            and (node.module or "").startswith("MedSIGHTSlicerLib"))
             or (isinstance(node, ast.Assign) and all(isinstance(t, ast.Name) and t.id.isupper() for t in node.targets))
             or (isinstance(node, ast.ClassDef) and node.name in ("MedSIGHTSlicer", "MedSIGHTSlicerWidget"))]
    module = sys.modules.get(name) or types.ModuleType(name)
    module.__dict__.update({"ScriptedLoadableModule": base, "ScriptedLoadableModuleWidget": base, "slicer": slicer,
                            "qt": types.SimpleNamespace(QSettings=Store)})
    sys.modules[name] = module
    exec(compile(ast.Module(nodes, []), str(SCRIPT), "exec", flags=__future__.annotations.compiler_flag),
         module.__dict__)
    return module


def _cleanup_ready(widget):
    """What setup() would have made, as far as cleanup() uses it."""
    timer = types.SimpleNamespace(stop=lambda: None)
    widget.check_timer = widget.engine_timer = timer
    widget.connection_form = types.SimpleNamespace(save=lambda: None)
    widget.ui = types.SimpleNamespace(startEngineButton=types.SimpleNamespace(),
                                      stopEngineButton=types.SimpleNamespace(),
                                      connectionStatusLabel=types.SimpleNamespace())
    widget.settings.stop_engine_on_exit = True
    return widget


class _SlicerBase:
    """ScriptedLoadableModule(Widget) as far as the module and widget classes use them at construction."""

    def __init__(self, parent=None):
        self.parent = parent
        self.moduleName = "MedSIGHTSlicer"


@pytest.mark.parametrize("how", ["Reload button", "reloadScriptedModule from the Python console"])
def test_a_developer_reload_keeps_the_engine_that_exit_stops(how):
    """Slicer's Reload (ScriptedLoadableModuleWidget.onReload -> slicer.util.reloadScriptedModule, v5.8.0 to main;
    developers and Slicer's own scripts also call it directly, e.g. v5.8.0 RSNAVisTutorial.py:129) runs the
    module file again, then calls cleanup() of the current widget and sets up a new one, in the same Slicer. The
    widget knew a reload only through its own onReload, so a reload from the console stopped an engine set to "stop
    on exit" (the loaded model lost) and released one set to keep running (it ran on, out of the new widget's reach:
    Start then failed on the taken port). The module file run as Slicer runs it: the engine runs on into the new
    widget, which exit stops."""
    from MedSIGHTSlicerLib.engine_launch import launch_plan

    name = "MedSIGHTSlicer"
    app = types.SimpleNamespace(connect=lambda signal, slot: None)
    modules = types.SimpleNamespace()
    slicer = types.SimpleNamespace(app=app, modules=modules)

    def reload_scripted_module():  # slicer.util.reloadScriptedModule: the file runs again, then the old cleanup()
        _module_file_as_module(name, slicer, Base)
        modules.MedSIGHTSlicerWidget.cleanup()

    class Base(_SlicerBase):
        def onReload(self):  # noqa: N802 - Slicer's name; ScriptedLoadableModuleWidget.onReload
            reload_scripted_module()

    sys.modules.pop(name, None)
    try:
        module = _module_file_as_module(name, slicer, Base)
        modules.MedSIGHTSlicerInstance = module.MedSIGHTSlicer(types.SimpleNamespace())
        old = modules.MedSIGHTSlicerWidget = _cleanup_ready(module.MedSIGHTSlicerWidget())
        sleeper = f'"{sys.executable}" -c "import time; time.sleep(120)"'
        old.engine.start(launch_plan(sleeper, os.environ, stop_on_exit=True))
        process = old.engine
        try:
            if how == "Reload button":
                old.onReload()
            else:
                reload_scripted_module()
            new = _cleanup_ready(module.MedSIGHTSlicerWidget())  # the new widget
            assert type(new) is not type(old) and process.running
            new._adopt_engine(modules.MedSIGHTSlicerInstance)  # what the new widget's setup() does first
            assert new.engine is process and modules.MedSIGHTSlicerInstance.reloaded_engine is None
            new.cleanup()  # Slicer exits
            assert not process.running and process.stop_requested
        finally:
            process.stop(wait=True)
    finally:
        sys.modules.pop(name, None)


def test_exit_stops_an_engine_a_reload_handed_on_that_no_widget_took():
    """A reload that fails after running the file again (an error in a later class, or in the new setup() before it
    takes the engine) leaves the handed engine with the module object: at exit no widget's cleanup() reaches it. The
    module object stops it from Slicer's aboutToQuit, after qSlicerCoreApplication's own slot (connected first, in
    qSlicerCoreApplicationPrivate::init, v5.8.0 Base/QTCore/qSlicerCoreApplication.cxx:598) has called every widget's
    cleanup() (onAboutToQuit -> unloadModules, l.2070-2074)."""
    from MedSIGHTSlicerLib.engine_launch import launch_plan
    from MedSIGHTSlicerLib.engine_process import EngineProcess

    name = "MedSIGHTSlicer"
    connections = {}
    app = types.SimpleNamespace(connect=lambda signal, slot: connections.setdefault(signal, []).append(slot))
    slicer = types.SimpleNamespace(app=app, modules=types.SimpleNamespace())
    sys.modules.pop(name, None)
    engine = EngineProcess()
    try:
        module = _module_file_as_module(name, slicer, _SlicerBase)
        instance = module.MedSIGHTSlicer(types.SimpleNamespace())
        instance.application_settings.settings.stop_engine_on_exit = True
        engine.start(launch_plan(f'"{sys.executable}" -c "import time; time.sleep(120)"', os.environ, True))
        instance.reloaded_engine = engine  # an old widget's cleanup() handed it on; no new widget took it
        for slot in connections["aboutToQuit()"]:
            slot()
        assert not engine.running and engine.stop_requested and instance.reloaded_engine is None
    finally:
        engine.stop(wait=True)
        sys.modules.pop(name, None)


def test_exit_stops_an_adopted_engine_when_the_reloaded_setup_failed():
    """A developer Reload whose new setup() raises after it adopted the running engine (an error further down while
    developing): the widget stays Slicer's (qSlicerScriptedLoadableModuleWidget::setPythonSource made it before
    setup()), and at exit Slicer calls its cleanup() (ScriptedLoadableModuleWidget._onModuleAboutToBeUnloaded, v5.8.0
    Base/Python/slicer/ScriptedLoadableModule.py:126-131, from qSlicerCoreApplication::onAboutToQuit). cleanup() first
    stopped timers setup() had not made yet: an AttributeError before the engine's turn, so an engine set to "stop on
    exit" ran on after Slicer had quit, holding its port and memory. The widget class of MedSIGHTSlicer.py: the engine
    is now stopped first."""
    import __future__

    from MedSIGHTSlicerLib.engine_launch import launch_plan
    from MedSIGHTSlicerLib.engine_process import EngineProcess

    class SlicerWidgetBase:
        def __init__(self, parent=None):
            self.moduleName = "MedSIGHTSlicer"

    tree = ast.parse(SCRIPT.read_text())
    nodes = [node for node in tree.body if (isinstance(node, ast.ImportFrom) and (node.module or "") in (
        "MedSIGHTSlicerLib.engine_process", "MedSIGHTSlicerLib.settings", "MedSIGHTSlicerLib.connection_check"))
        or (isinstance(node, ast.ClassDef) and node.name == "MedSIGHTSlicerWidget")]
    engine = EngineProcess()
    module = types.SimpleNamespace(reloaded_engine=engine)
    namespace = {"__name__": "MedSIGHTSlicer", "ScriptedLoadableModuleWidget": SlicerWidgetBase,
                 "slicer": types.SimpleNamespace(modules=types.SimpleNamespace(MedSIGHTSlicerInstance=module))}
    exec(compile(ast.Module(nodes, []), str(SCRIPT), "exec", flags=__future__.annotations.compiler_flag), namespace)
    sleeper = f'"{sys.executable}" -c "import time; time.sleep(120)"'
    engine.start(launch_plan(sleeper, os.environ, stop_on_exit=True))
    try:
        widget = namespace["MedSIGHTSlicerWidget"]()
        widget._adopt_engine(module)  # setup() got this far, then raised: no timers, no connection form
        assert widget.engine is engine and widget.settings.stop_engine_on_exit
        widget.cleanup()  # Slicer exits; what setup() never made is not closed (nor its engine callbacks called)
        assert not engine.running and engine.stop_requested
    finally:
        engine.stop(wait=True)


@pytest.mark.parametrize("then", ["Slicer exits", "the next Reload"])
@pytest.mark.parametrize("stop_on_exit", [True, False], ids=["stop on exit", "keep running"])
def test_a_reloaded_setup_that_fails_at_once_still_takes_the_engine_exit_leaves_it_as_set(stop_on_exit, then):
    """A Reload's old widget hands its running engine to the module object; the new setup() took it over only after
    loading the .ui and making the logic. A setup() that failed there (slicer.util.loadUI raises RuntimeError for a
    .ui it cannot load, v5.8.0 Base/Python/slicer/util.py:343-361) left the engine with the module object, where no
    widget stops it: it ran on after Slicer's exit, "stop on exit" or not. setup() of MedSIGHTSlicer.py now takes the
    engine first; the exit's cleanup() stops it, or leaves it running as the user set "stop on exit" (the widget's
    own default settings, True, stopped an engine the user had set to keep running). The developer's next Reload
    (the error fixed) calls this widget's cleanup() first (reloadScriptedModule, v5.8.0 util.py:1445, no try): it
    raised on the timers setup() never made, so no Reload got further until Slicer was restarted; it hands the engine
    on now."""
    import __future__

    from MedSIGHTSlicerLib.engine_launch import launch_plan
    from MedSIGHTSlicerLib.engine_process import EngineProcess
    from MedSIGHTSlicerLib.settings import ConnectionSettings

    class SlicerWidgetBase:
        def __init__(self, parent=None):
            self.moduleName = "MedSIGHTSlicer"

        def setup(self):
            pass

        def resourcePath(self, filename):  # noqa: N802 - Slicer's name
            return str(MODULE / "Resources" / filename)

    def load_ui(path):
        raise RuntimeError(f"Could not load UI file: {path}\n\n")

    tree = ast.parse(SCRIPT.read_text())
    nodes = [node for node in tree.body if (isinstance(node, ast.ImportFrom) and (node.module or "") in (
        "MedSIGHTSlicerLib.engine_process", "MedSIGHTSlicerLib.settings", "MedSIGHTSlicerLib.connection_check"))
        or (isinstance(node, ast.ClassDef) and node.name == "MedSIGHTSlicerWidget")]
    engine = EngineProcess()
    # The module object's settings: what the settings page and the module's own exit slot read.
    settings = types.SimpleNamespace(settings=ConnectionSettings(stop_engine_on_exit=stop_on_exit))
    module = types.SimpleNamespace(reloaded_engine=engine, application_settings=settings)
    namespace = {"__name__": "MedSIGHTSlicer", "ScriptedLoadableModuleWidget": SlicerWidgetBase,
                 "slicer": types.SimpleNamespace(modules=types.SimpleNamespace(MedSIGHTSlicerInstance=module),
                                                 util=types.SimpleNamespace(loadUI=load_ui))}
    exec(compile(ast.Module(nodes, []), str(SCRIPT), "exec", flags=__future__.annotations.compiler_flag), namespace)
    sleeper = f'"{sys.executable}" -c "import time; time.sleep(120)"'
    engine.start(launch_plan(sleeper, os.environ, stop_on_exit=stop_on_exit))
    process = engine._process
    try:
        widget = namespace["MedSIGHTSlicerWidget"]()
        with pytest.raises(RuntimeError, match="Could not load UI file"):
            widget.setup()
        if then == "the next Reload":  # the file ran again: a new widget class in the module
            new_class = type("MedSIGHTSlicerWidget", (), {})
            sys.modules["MedSIGHTSlicer"] = types.SimpleNamespace(MedSIGHTSlicerWidget=new_class)
        widget.cleanup()
        if then == "the next Reload":
            assert module.reloaded_engine is engine and engine.running  # for the new widget's setup()
        else:
            assert module.reloaded_engine is None and not engine.running
            assert engine.stop_requested == stop_on_exit and (process.poll() is None) != stop_on_exit
    finally:
        sys.modules.pop("MedSIGHTSlicer", None)
        engine.stop(wait=True)
        process.kill()
        process.wait()


def test_the_old_widget_stops_following_the_volume_selector_after_cleanup():
    """Slicer's Reload (slicer.util.reloadScriptedModule, v5.8.0 Base/Python/slicer/util.py:1432-1460, the same in
    v5.10.0) calls the old widget's cleanup(), hides its Qt widgets and sets up a new widget; it deletes none of them
    (qSlicerScriptedLoadableModuleWidget::reload, Base/QTGUI/qSlicerScriptedLoadableModuleWidget.cxx:180-189, only
    sets up the new one). The old volume selector keeps its scene and its connections: closing the scene changes its
    node, and the old widget's _volume_changed called into its closed suggestion list (the Qt object deleted: a
    RuntimeError in Slicer's console on every scene close after a Reload). The widget of MedSIGHTSlicer.py with the
    real chat panel and review widgets (PySide6): after cleanup() the selector no longer reaches it."""
    import __future__

    from MedSIGHTSlicerLib.chat_panel import ChatPanel
    from MedSIGHTSlicerLib.qt_shim import qt

    app = qt.QApplication.instance() or qt.QApplication(sys.argv[:1])

    class Selector:  # qMRMLNodeComboBox as far as the widget uses it; PythonQt disconnects a slot that compares equal
        def __init__(self):
            self.slots = []

        def connect(self, signal, slot):
            self.slots.append((signal, slot))

        def disconnect(self, signal, slot):
            self.slots.remove((signal, slot))

        def currentNode(self):  # noqa: N802 - Qt's name
            return None

        def node_changed(self, node):  # what the scene's close does to the selector's current node
            for signal, slot in list(self.slots):
                if signal == "currentNodeChanged(vtkMRMLNode*)":
                    slot(node)

    class SlicerWidgetBase:
        def __init__(self, parent=None):
            self.moduleName = "MedSIGHTSlicer"

    tree = ast.parse(SCRIPT.read_text())
    nodes = [node for node in tree.body if (isinstance(node, ast.ImportFrom) and (node.module or "") in (
        "MedSIGHTSlicerLib.engine_process", "MedSIGHTSlicerLib.settings", "MedSIGHTSlicerLib.connection_check",
        "MedSIGHTSlicerLib.review_host")) or (isinstance(node, ast.ClassDef) and node.name == "MedSIGHTSlicerWidget")]
    namespace = {"__name__": "MedSIGHTSlicer", "ScriptedLoadableModuleWidget": SlicerWidgetBase,
                 "slicer": types.SimpleNamespace(util=types.SimpleNamespace(mainWindow=lambda: None))}
    exec(compile(ast.Module(nodes, []), str(SCRIPT), "exec", flags=__future__.annotations.compiler_flag), namespace)
    widget = namespace["MedSIGHTSlicerWidget"]()
    placeholder, engine_section = qt.QWidget(), qt.QWidget()
    qt.QVBoxLayout(placeholder)
    qt.QFormLayout(engine_section)
    selector = Selector()
    widget.ui = types.SimpleNamespace(inputVolumeSelector=selector, chatPanelPlaceholder=placeholder,
                                      connectionCollapsibleButton=engine_section)
    widget.logic = types.SimpleNamespace(answer_volume=lambda: None, stop_observing=lambda: None)
    widget.panel = ChatPanel(None)
    widget._setup_review()  # as setup() wires the review widgets and the selector
    widget.check_timer = widget.engine_timer = types.SimpleNamespace(stop=lambda: None)
    widget.connection_form = types.SimpleNamespace(save=lambda: None)
    widget.cleanup()
    app.sendPostedEvents(None, qt.QEvent.DeferredDelete)  # the closed widgets' deleteLater
    selector.node_changed(None)  # the scene closes after the Reload
    assert selector.slots == []
    placeholder.deleteLater()
    engine_section.deleteLater()
    app.sendPostedEvents(None, qt.QEvent.DeferredDelete)


@pytest.mark.parametrize("answer", [False, True])
def test_start_local_engine_asks_about_another_port_before_it_starts(answer):
    """"Start local engine" with a command serving another port than the engine URL's: the warning came after the
    engine had started, in a modal dialog shown before the timer that reads the engine's log was started, so the log
    stood still while it was open. The widget's onStartEngine (MedSIGHTSlicer.py) with a real engine process now asks
    before anything runs: Cancel starts nothing, OK starts the engine and the timer."""
    import __future__

    from MedSIGHTSlicerLib.engine_launch import served_port, split_command

    asked, timer = [], []
    sleeper = f'"{sys.executable}" -c "import time; time.sleep(120)" serve --po 9000'

    def dialog(text, windowTitle=None):  # slicer.util's; notes what ran when the dialog opened
        asked.append((text, namespace["widget"].engine.running, len(timer)))
        return answer

    util = types.SimpleNamespace(errorDisplay=lambda text: pytest.fail(text), startupEnvironment=lambda: os.environ,
                                 confirmOkCancelDisplay=dialog, warningDisplay=dialog)
    tree = ast.parse(SCRIPT.read_text())
    nodes = [node for node in tree.body if (isinstance(node, ast.ImportFrom) and (node.module or "") in (
        "MedSIGHTSlicerLib.engine_process", "MedSIGHTSlicerLib.settings", "MedSIGHTSlicerLib.connection_check",
        "MedSIGHTSlicerLib.engine_launch")) or (isinstance(node, ast.ClassDef) and node.name == "MedSIGHTSlicerWidget")]
    class SlicerWidgetBase:
        def __init__(self, parent=None):
            self.moduleName = "MedSIGHTSlicer"

    namespace = {"__name__": "MedSIGHTSlicer", "ScriptedLoadableModuleWidget": SlicerWidgetBase,
                 "slicer": types.SimpleNamespace(util=util)}
    exec(compile(ast.Module(nodes, []), str(SCRIPT), "exec", flags=__future__.annotations.compiler_flag), namespace)
    widget = namespace["widget"] = namespace["MedSIGHTSlicerWidget"]()
    widget.connection_form = types.SimpleNamespace(save=lambda: None)
    widget.engine_timer = types.SimpleNamespace(start=lambda: timer.append("start"), stop=lambda: None)
    button = types.SimpleNamespace
    widget.ui = types.SimpleNamespace(startEngineButton=button(), stopEngineButton=button(),
                                      connectionStatusLabel=button())
    widget.settings.serve_command, widget.settings.url = sleeper, "http://127.0.0.1:8765"
    assert served_port(split_command(sleeper)) == 9000
    try:
        widget.onStartEngine()
        assert len(asked) == 1 and asked[0] == (widget.settings.start_question(), False, 0)  # before it ran
        assert "serves port 9000" in asked[0][0] and "names port 8765" in asked[0][0]
        assert widget.engine.running is answer and timer == (["start"] if answer else [])
        assert getattr(widget.ui.startEngineButton, "enabled", True) is not answer  # Cancel: the buttons stay
        widget.settings.url = "http://127.0.0.1:9000"
        assert widget.settings.start_question() is None  # the ports agree: it starts without a question
    finally:
        widget.engine.stop(wait=True)
