"""The package layout rules of CONTRIBUTING.md: imports through the `chatrlhf` namespace only, no sys.path edits,
only `chatrlhf` installed, a torch-only PPO core, devices through DeepSpeed's accelerator."""
import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCE_DIRS = ("training", "inference", "utils", "applications", "benchmarks")
PACKAGES = ("training", "inference", "utils")  # installed as chatrlhf.<name>; never importable bare


def python_files(dirs=SOURCE_DIRS, extra=("train.py",)):
    files = [p for d in dirs if (REPO / d).is_dir() for p in sorted((REPO / d).rglob("*.py"))]
    files += [REPO / f for f in extra if (REPO / f).is_file()]
    return files


def parse(path: Path) -> ast.AST:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def where(path: Path, node: ast.AST) -> str:
    shown = path.relative_to(REPO) if path.is_relative_to(REPO) else path
    return f"{shown}:{node.lineno}"


def run_python(code: str, cwd, **kwargs) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, **kwargs)


def test_source_files_are_found():
    files = python_files()
    assert REPO / "utils" / "config.py" in files and REPO / "training" / "ds_config.py" in files


# ------------------------------------------------------------------------------------------ (a) import hygiene

def bad_imports(path: Path) -> list[str]:
    found = []
    for node in ast.walk(parse(path)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in PACKAGES:
                    found.append(f"{where(path, node)}: import {alias.name}")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                found.append(f"{where(path, node)}: relative import from {'.' * node.level}{node.module or ''}")
            elif node.module and node.module.split(".")[0] in PACKAGES:
                found.append(f"{where(path, node)}: from {node.module} import ...")
    return found


def sys_path_edits(path: Path) -> list[str]:
    found = []
    for node in ast.walk(parse(path)):
        # sys.path.insert/append/extend/remove, sys.path[:] = ..., sys.path = ...: any use of the attribute.
        if (isinstance(node, ast.Attribute) and node.attr == "path" and isinstance(node.value, ast.Name)
                and node.value.id == "sys"):
            found.append(f"{where(path, node)}: sys.path")
        elif isinstance(node, ast.ImportFrom) and node.module == "sys" and any(a.name == "path" for a in node.names):
            found.append(f"{where(path, node)}: from sys import path")
        elif (isinstance(node, ast.Attribute) and node.attr == "addsitedir" and isinstance(node.value, ast.Name)
                and node.value.id == "site"):
            found.append(f"{where(path, node)}: site.addsitedir")
    return found


def test_no_bare_package_imports():
    found = [hit for path in python_files() for hit in bad_imports(path)]
    assert not found, "import through the namespace (`from chatrlhf.utils... import`):\n" + "\n".join(found)


def test_no_sys_path_manipulation():
    found = [hit for path in python_files() for hit in sys_path_edits(path)]
    assert not found, "no sys.path edits; install the package (pip install -e .):\n" + "\n".join(found)


def test_the_scanners_catch_what_they_should(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import utils\nimport training.config as c\nfrom inference import chatbot\nfrom utils.models import x\n"
                   "from . import sibling\nimport sys\nsys.path.insert(0, '..')\nsys.path[:0] = ['x']\n"
                   "from sys import path\n")
    good = tmp_path / "good.py"
    good.write_text("import chatrlhf.utils.config\nfrom chatrlhf.training import config\nimport utilsx\nimport sys\n"
                    "print(sys.argv, 'sys.path')\nimport os.path\n")
    assert len(bad_imports(bad)) == 5 and len(sys_path_edits(bad)) == 3
    assert bad_imports(good) == [] and sys_path_edits(good) == []


# ------------------------------------------------------------------------------------------ (b) namespace imports

def test_namespace_imports_work_outside_the_repo(tmp_path):
    result = run_python("import chatrlhf.training.step1_sft.main, chatrlhf.utils.config", cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("name", PACKAGES)
def test_bare_package_names_are_not_importable(tmp_path, name):
    result = run_python(f"import {name}", cwd=tmp_path, timeout=60)
    assert result.returncode != 0 and "ModuleNotFoundError" in result.stderr, result.stderr


def test_chatrlhf_is_a_namespace_mapped_to_the_repo_folders(tmp_path):
    code = ("import chatrlhf, chatrlhf.utils, chatrlhf.training, chatrlhf.inference; "
            "print(getattr(chatrlhf, '__file__', None)); "
            "print(chatrlhf.utils.__file__); print(chatrlhf.training.__file__); print(chatrlhf.inference.__file__)")
    result = run_python(code, cwd=tmp_path, timeout=60)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.split()
    assert lines[0] == "None"  # implicit namespace package: no chatrlhf/__init__.py
    for line, folder in zip(lines[1:], ("utils", "training", "inference")):
        assert Path(line).resolve().parent == (REPO / folder).resolve()


# ------------------------------------------------------------------------------------------ (c) setup.py

def test_setup_name_and_top_level(tmp_path):
    name = subprocess.run([sys.executable, "setup.py", "--name"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert name.returncode == 0, name.stderr
    assert name.stdout.strip().splitlines()[-1] == "chatrlhf"

    info = subprocess.run([sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert info.returncode == 0, info.stderr
    egg = tmp_path / "chatrlhf.egg-info"
    assert (egg / "top_level.txt").read_text().split() == ["chatrlhf"]
    sources = (egg / "SOURCES.txt").read_text().split()
    assert "utils/config.py" in sources and "training/step1_sft/main.py" in sources


# ------------------------------------------------------------------------------------------ (d) PPO core

def test_ppo_core_imports_only_torch(tmp_path):
    code = ("import sys; import chatrlhf.training.step3_ppo.core; "
            "heavy = sorted(m for m in ('deepspeed', 'transformers', 'peft', 'datasets') if m in sys.modules); "
            "print(heavy); sys.exit(1 if heavy else 0)")
    result = run_python(code, cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


# ------------------------------------------------------------------------------------------ (e) devices

def cuda_uses(path: Path) -> list[str]:
    found = []
    for node in ast.walk(parse(path)):
        if isinstance(node, ast.Attribute) and node.attr == "cuda" and isinstance(node.value, ast.Name) \
                and node.value.id == "torch":
            found.append(f"{where(path, node)}: torch.cuda")
        elif isinstance(node, ast.Import) and any(a.name.startswith("torch.cuda") for a in node.names):
            found.append(f"{where(path, node)}: import torch.cuda")
        elif isinstance(node, ast.ImportFrom) and node.module and (
                node.module.startswith("torch.cuda") or (node.module == "torch" and any(a.name == "cuda"
                                                                                        for a in node.names))):
            found.append(f"{where(path, node)}: from {node.module} import ...")
    return found


def test_no_torch_cuda_in_the_packages():
    # AST, not text: docstrings that say "never torch.cuda" are fine.
    found = [hit for path in python_files(PACKAGES, extra=()) for hit in cuda_uses(path)]
    assert not found, "use chatrlhf.utils.distributed / deepspeed's get_accelerator():\n" + "\n".join(found)


def test_cuda_scanner_catches_uses(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import torch\nimport torch.cuda\nfrom torch.cuda import amp\nfrom torch import cuda\n"
                   "torch.cuda.synchronize()\nx = torch.cuda.is_available()\n")
    good = tmp_path / "good.py"
    good.write_text('"""never torch.cuda"""\nimport torch\n# torch.cuda.empty_cache()\ns = "torch.cuda"\n')
    assert len(cuda_uses(bad)) == 5 and cuda_uses(good) == []
