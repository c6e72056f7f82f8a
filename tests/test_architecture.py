"""The dependency direction rule of CONTRIBUTING.md, checked on every import in the packages, lazy ones included.

utils <- training (shared modules) <- step packages <- inference; training/pipeline, the driver, sits on top.
A step never imports another step, no shared module imports a step, and nobody imports a step's command-line
module (its main.py, rw_eval.py) except that step's own __main__.py.
"""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("training", "inference", "utils")
CLI_MODULES = {"main", "rw_eval"}  # a step's command-line modules: glue, never imported


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
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            name = module_name(root, path)
            kind, step = layer(name)
            for line, target in imports(path, name):
                if target.count(".") < 1 or target.split(".")[1] not in PACKAGES:
                    continue
                t_kind, t_step = layer(target)
                where = f"{path.relative_to(root)}:{line} imports {target}"
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


def plant(tmp_path: Path, file: str, text: str) -> Path:
    for package in PACKAGES:
        (tmp_path / package).mkdir(parents=True, exist_ok=True)
    (tmp_path / file).parent.mkdir(parents=True, exist_ok=True)
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
    assert violations(ok) == []
