"""The dependency rule, read from the imports: cli / flows -> pws_batch.batch -> pws_batch.core.

- core (one pair on one device) imports no Ray, Prefect, pyarrow or pandas, and nothing of batch, cli or flows;
- batch (many pairs, many machines) imports nothing of cli or flows;
- flows orchestrate: they import no torch (not even inside functions) and importing them loads no torch.
"""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def imported_modules(path: pathlib.Path) -> set[str]:
    """Every module a file imports, at the top or inside functions (relative imports resolved)."""
    tree = ast.parse(path.read_text(), str(path))
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def files(folder: str) -> list[pathlib.Path]:
    found = sorted((ROOT / folder).rglob("*.py"))
    assert found, f"no Python files under {folder}"
    return found


def offending(folder: str, forbidden: tuple[str, ...]) -> list[str]:
    bad = []
    for path in files(folder):
        for name in sorted(imported_modules(path)):
            if any(name == f or name.startswith(f + ".") for f in forbidden):
                bad.append(f"{path.relative_to(ROOT)} imports {name}")
    return bad


def test_core_imports_no_ray_prefect_pyarrow_pandas_or_upper_layers():
    assert offending("pws_batch/core", ("ray", "prefect", "pyarrow", "pandas", "pws_batch.batch",
                                        "pws_batch.cli", "flows")) == []


def test_batch_imports_no_cli_and_no_flows():
    assert offending("pws_batch/batch", ("pws_batch.cli", "flows")) == []


def test_flows_import_no_torch_and_no_model_code():
    assert offending("flows", ("torch", "diffusers", "transformers", "pws_batch.core.pipeline",
                               "pws_batch.core.sampler", "pws_batch.cli")) == []


def test_the_rule_checker_sees_imports_inside_functions(tmp_path, monkeypatch):
    """The checker itself must catch a lazy import, or the tests above could not fail."""
    sample = ROOT / "pws_batch" / "core" / "_layer_probe_tmp.py"
    sample.write_text("def f():\n    import ray\n    from pws_batch.batch import run\n")
    try:
        bad = offending("pws_batch/core", ("ray", "pws_batch.batch"))
    finally:
        sample.unlink()
    assert "pws_batch/core/_layer_probe_tmp.py imports ray" in bad
    assert any("imports pws_batch.batch" in b for b in bad)


@pytest.mark.parametrize("module", ["flows.generate_dataset", "pws_batch.batch.manifest", "pws_batch.batch.run",
                                    "pws_batch.batch.engine", "pws_batch.cli"])
def test_importing_the_driver_side_loads_no_torch(module):
    code = f"import sys, {module}; heavy = [m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules]; " \
           f"print(heavy); sys.exit(1 if heavy else 0)"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"importing {module} loaded {result.stdout.strip()} {result.stderr[-2000:]}"


def test_validating_a_manifest_loads_no_torch(tmp_path):
    """`pws-batch validate` (and so the driver of `pws-batch run`) checks DDIM (the default) and Euler schedules with
    numpy and opens guide files without torch or diffusers. A scheduler name that is no diffusers class is told
    without importing diffusers too, whether or not it ends in "Scheduler"; a class whose timesteps only diffusers
    computes is built in a child process."""
    import numpy as np
    import soundfile as sf
    from PIL import Image

    sf.write(tmp_path / "guide.wav", np.zeros(1600, dtype=np.float32), 16000)
    Image.new("L", (64, 32)).save(tmp_path / "guide.png")
    manifest = tmp_path / "m.csv"
    manifest.write_text("image_prompt,audio_prompt,steps,t_image,t_audio,scheduler,guide_audio,guide_image\n"
                        "a castle,bells,25,1.0,1.0,,guide.wav,\n"
                        "a dog,barking,50,0.5,0.5,DDIMScheduler,,\n"
                        "a cat,meowing,10,1.0,1.0,bogus,,\n"
                        "a cow,mooing,10,1.0,1.0,,,guide.png\n"
                        "a bird,singing,30,0.9,1.0,EulerDiscreteScheduler,,\n"
                        "a fox,howling,30,1.0,1.0,NoSuchScheduler,,\n"
                        "a hen,clucking,20,1.0,1.0,DPMSolverMultistepScheduler,,\n"
                        "an owl,hooting,20,0.5,0.5,DPMSolverMultistepScheduler,,\n")
    code = ("import sys; from pws_batch import cli; sys.argv = ['pws-batch', 'validate', sys.argv[1]]\n"
            "try:\n    cli.main()\nexcept SystemExit as e:\n    code = e.code\n"
            "heavy = [m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules]\n"
            "print('heavy', heavy); sys.exit(3 if heavy else code)")
    result = subprocess.run([sys.executable, "-c", code, str(manifest)], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 1, result.stdout + result.stderr[-2000:]  # three bad rows, and no torch
    assert "heavy []" in result.stdout
    assert "row 1" in result.stdout and "no model is active at timestep" in result.stdout
    assert "row 2: scheduler" in result.stdout and "'bogus'" in result.stdout
    assert "row 5: scheduler" in result.stdout and "'NoSuchScheduler'" in result.stdout
    assert "row 7: t_image" in result.stdout  # DPM's schedule, built by diffusers in a child process
    assert "8 rows, 4 good, 4 bad" in result.stdout


def test_the_scheduler_names_read_from_diffusers_source_are_exactly_its_scheduler_classes():
    """Validation rejects a name diffusers' __init__.py does not declare without importing diffusers: the names
    read from the source must be every scheduler class the imported package has (none missed, or a good row
    would be rejected; none extra, or a bad name would need the import after all)."""
    import diffusers

    from pws_batch.core.schedule import declared_scheduler_names

    classes = {name for name in dir(diffusers)
               if name.endswith("Scheduler") and hasattr(getattr(diffusers, name), "from_config")}
    assert "DDIMScheduler" in classes and "DPMSolverMultistepScheduler" in classes
    assert declared_scheduler_names() == classes
