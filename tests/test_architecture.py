"""The dependency direction rule of CONTRIBUTING.md, checked on every import in the packages, lazy ones included.

utils <- training (shared modules) <- step packages <- inference; training/pipeline, the driver, sits on top.
A step never imports another step, no shared module imports a step, and nobody imports a step's command-line
module (its main.py, rw_eval.py, heldout.py) except that step's own __main__.py and launch glue.

Launch glue: Python files in a folder that is not a package (no __init__.py, so not installed), such as
DeepSpeed-Chat's step folder names under training/ (training/step1_supervised_finetuning/main.py runs
chatrlhf.training.step1_sft.main). Like a step's __main__.py they may import the command-line modules, and only
those; nothing imports them.
"""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("training", "inference", "utils")
CLI_MODULES = {"main", "rw_eval", "heldout"}  # a step's command-line modules: glue, never imported
GLUE_TARGETS = ("chatrlhf.inference.prompt_eval", "chatrlhf.inference.chatbot", "chatrlhf.training.pipeline.cli")


def is_glue(root: Path, path: Path) -> bool:
    """A file in a folder that is not a package: launch glue, not installed (see the module docstring)."""
    folder = path.parent
    while folder != root and folder.parent != root:
        if not (folder / "__init__.py").is_file():
            return True
        folder = folder.parent
    return False


def is_cli_module(module: str) -> bool:
    """A step's main.py or rw_eval.py, or an entry point of inference or the pipeline."""
    kind, _ = layer(module)
    return (kind == "step" and module.split(".")[-1] in CLI_MODULES and module.count(".") == 3) or module in GLUE_TARGETS


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(["chatrlhf"] + parts)


def imports(path: Path, name: str) -> list[tuple[int, str]]:
    """(line, imported chatrlhf module) of every import statement, at module level or inside functions."""
    tree = ast.parse(path.read_text(), str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative imports are against the rules anyway; resolve them to judge the direction
                base = name.split(".")[:-node.level] if not path.name == "__init__.py" else name.split(".")
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            out.append((node.lineno, module))
            # `from chatrlhf.training.step1_sft import main` imports the module `main`.
            out += [(node.lineno, f"{module}.{a.name}") for a in node.names]
    return [(line, m) for line, m in out if m.startswith("chatrlhf.")]


def layer(module: str) -> tuple[str, str | None]:
    """(kind, step) of a chatrlhf module: kind in utils, shared, step, pipeline, inference."""
    parts = module.split(".")
    if parts[1] == "utils":
        return "utils", None
    if parts[1] == "inference":
        return "inference", None
    if len(parts) > 2 and parts[2] == "pipeline":
        return "pipeline", None
    if len(parts) > 2 and parts[2].startswith("step"):
        return "step", parts[2]
    return "shared", None


def violations(root: Path) -> list[str]:
    found = []
    glue = {module_name(root, path) for package in PACKAGES for path in (root / package).rglob("*.py")
            if is_glue(root, path)}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            name = module_name(root, path)
            kind, step = layer(name)
            for line, target in imports(path, name):
                if target.count(".") < 1 or target.split(".")[1] not in PACKAGES:
                    continue
                t_kind, t_step = layer(target)
                where = f"{path.relative_to(root)}:{line} imports {target}"
                if target in glue or any(target.startswith(g + ".") for g in glue):
                    found.append(f"{where}: launch glue is run, never imported")
                    continue
                if name in glue:
                    # `from chatrlhf.training.step1_sft.main import main` also yields the module it comes from.
                    parent = target.rsplit(".", 1)[0]
                    if not (is_cli_module(target) or is_cli_module(parent)):
                        found.append(f"{where}: launch glue runs a command-line module and nothing else")
                    continue
                if kind == "utils" and t_kind != "utils":
                    found.append(f"{where}: utils imports nothing above it")
                elif kind == "shared" and t_kind in ("step", "pipeline", "inference"):
                    found.append(f"{where}: a shared training module imports a step, the pipeline or inference")
                elif kind == "step" and t_kind == "step" and t_step != step:
                    found.append(f"{where}: a step imports another step (move what they share into training/)")
                elif kind in ("step", "inference") and t_kind in ("pipeline",) + (("inference",) if kind == "step"
                                                                                    else ()):
                    found.append(f"{where}: only the pipeline's own CLI imports the pipeline")
                if t_kind == "step" and target.split(".")[-1] in CLI_MODULES and target.count(".") == 3:
                    own_main = kind == "step" and t_step == step and path.name == "__main__.py"
                    if not own_main:
                        found.append(f"{where}: a step's command-line module is glue; import what it uses instead")
    return found


def test_imports_point_one_way():
    assert violations(REPO) == []


def plant(tmp_path: Path, file: str, text: str, package: bool = True) -> Path:
    """Writes `file` under a fake repo; its folders are packages (with __init__.py) unless package=False."""
    for name in PACKAGES:
        (tmp_path / name).mkdir(parents=True, exist_ok=True)
    folder = (tmp_path / file).parent
    folder.mkdir(parents=True, exist_ok=True)
    while package and folder.parent != tmp_path:
        (folder / "__init__.py").touch()
        folder = folder.parent
    (tmp_path / file).write_text(text)
    return tmp_path


def test_a_planted_upward_import_is_caught(tmp_path):
    cases = {
        "utils/x.py": "from chatrlhf.training import loop\n",
        "training/loop.py": "def f():\n    from chatrlhf.training.step1_sft.data import SFT_DATA\n",  # lazy
        "training/step2_reward/x.py": "import chatrlhf.training.step1_sft.trainer\n",
        "training/step3_ppo/x.py": "from chatrlhf.training.pipeline import plan\n",
        "inference/x.py": "from chatrlhf.training.step2_reward.rw_eval import main\n",
        "training/data/x.py": "from chatrlhf.inference import chatbot\n",
    }
    for i, (file, text) in enumerate(cases.items()):
        found = violations(plant(tmp_path / str(i), file, text))
        assert len(found) >= 1 and file in found[0], (file, found)
    # Allowed: a step's own __main__ imports its main; the pipeline imports a step's data module.
    ok = plant(tmp_path / "ok", "training/step1_sft/__main__.py", "from chatrlhf.training.step1_sft.main import main\n")
    plant(ok, "training/pipeline/report.py", "from chatrlhf.training.step3_ppo.data import prompt_data\n")
    # Launch glue (a folder without __init__.py) may run a step's command-line module.
    plant(ok, "training/step1_supervised_finetuning/main.py", "from chatrlhf.training.step1_sft.main import main\n",
          package=False)
    plant(ok, "training/step1_supervised_finetuning/prompt_eval.py",
          "from chatrlhf.inference.prompt_eval import main\n", package=False)
    assert violations(ok) == []


def test_launch_glue_runs_command_line_modules_only_and_is_never_imported(tmp_path):
    root = plant(tmp_path / "a", "training/step1_supervised_finetuning/main.py",
                 "from chatrlhf.training.step1_sft.trainer import train\n", package=False)
    found = violations(root)
    assert found and all("launch glue runs a command-line module" in f for f in found), found
    root = plant(tmp_path / "b", "training/step1_supervised_finetuning/main.py",
                 "from chatrlhf.training.step1_sft.main import main\n", package=False)
    plant(root, "training/x.py", "import chatrlhf.training.step1_supervised_finetuning.main\n")
    found = violations(root)
    assert len(found) == 1 and "never imported" in found[0], found


def test_dschat_folders_are_glue_not_packages():
    folders = ["step1_supervised_finetuning", "step2_reward_model_finetuning", "step2_dpo_finetuning",
               "step3_rlhf_finetuning"]
    for folder in folders:
        main = REPO / "training" / folder / "main.py"
        assert main.is_file() and is_glue(REPO, main), folder
        assert not (REPO / "training" / folder / "__init__.py").exists()
