"""The package's layering, read from the source: data flows cli → (models, sampling, ...) → checkpoint,
and a lower layer never imports a higher one. Imports are parsed (ast), not executed, so an import
hidden inside a function counts as much as one at the top of a file."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "fastdit"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    return imports_of(path.read_text(), module_name(path), is_package=path.name == "__init__.py")


def imports_of(source: str, module: str, is_package: bool = False) -> set[str]:
    """Every absolute module name `source` imports; `from .x import y` also yields `x.y`, since y may be a module."""
    package = module.split(".") if is_package else module.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package[: len(package) - (node.level - 1)] + ([node.module] if node.module else []))
            else:
                base = node.module
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def offending(module: str, forbidden: str) -> bool:
    return module == forbidden or module.startswith(forbidden + ".")


def test_import_resolution_reads_relative_and_nested_imports():
    # The checks below are only as good as this resolution: the import models/dit.py once hid inside
    # forward_with_cfg, and the other spellings of the same dependency, must all be caught.
    nested = "def f():\n    from ..sampling.guidance import guide\n"
    assert "fastdit.sampling.guidance" in imports_of(nested, "fastdit.models.dit")
    assert "fastdit.sampling" in imports_of("from .. import sampling", "fastdit.models.dit")
    assert "fastdit.sampling" in imports_of("from ... import sampling", "fastdit.models.sub", is_package=True)
    assert "fastdit.sampling.generate" in imports_of("import fastdit.sampling.generate", "fastdit.models.dit")
    assert imported_modules(PACKAGE / "models" / "__init__.py") >= {"fastdit.models.dit", "fastdit.models.presets"}


MODEL_FILES = sorted((PACKAGE / "models").rglob("*.py"))


@pytest.mark.parametrize("path", MODEL_FILES, ids=lambda p: p.name)
@pytest.mark.parametrize("higher", ["fastdit.sampling", "fastdit.train", "fastdit.cli"])
def test_models_import_no_higher_layer(path, higher):
    assert MODEL_FILES, "no model files found: the package moved"
    bad = sorted(m for m in imported_modules(path) if offending(m, higher))
    assert not bad, f"{module_name(path)} imports {bad}: nothing under fastdit/models may depend on {higher}"


def test_training_evaluation_samples_with_the_sampling_layer_not_sample_ddp():
    # The FID of a training run and `fastdit sample-ddp` share one loop in fastdit.sampling.indexed;
    # sample_ddp/ is a command's machinery (work folders, chunks, the .npz), not a library for train/.
    path = PACKAGE / "train" / "evaluation.py"
    imports = imported_modules(path)
    assert not sorted(m for m in imports if offending(m, "fastdit.sample_ddp"))
    assert "fastdit.sampling.indexed.sample_by_index" in imports


# Objectives sit between the processes and the samplers: samplers consume their views, so an objective
# must not depend on a sampler (or on training or the CLI); the diffusion processes depend on neither.
LOWER_LAYERS = {
    "objectives": ["fastdit.sampling", "fastdit.train", "fastdit.cli", "fastdit.sample_ddp"],
    "diffusion": ["fastdit.objectives", "fastdit.sampling", "fastdit.train", "fastdit.cli"],
}


@pytest.mark.parametrize("layer, path", [(layer, path) for layer in LOWER_LAYERS
                                         for path in sorted((PACKAGE / layer).rglob("*.py"))],
                         ids=lambda value: value if isinstance(value, str) else value.name)
def test_objectives_and_processes_import_no_higher_layer(layer, path):
    bad = sorted(m for m in imported_modules(path) for higher in LOWER_LAYERS[layer] if offending(m, higher))
    assert not bad, f"{module_name(path)} imports {bad}: fastdit/{layer} may not depend on {LOWER_LAYERS[layer]}"


def test_data_modules_import_each_other_one_way():
    # Within fastdit/data, data flows one way (extract -> latent_store -> image_folder): a module whose
    # helper another one needs owns it, rather than the two importing each other (lazily or not).
    modules = {module_name(path): imported_modules(path) for path in sorted((PACKAGE / "data").glob("*.py"))
               if path.name != "__init__.py"}
    assert "fastdit.data.extract" in modules and "fastdit.data.latent_store" in modules, "the data modules moved"
    both_ways = sorted((a, b) for a in modules for b in modules if a < b
                       and any(offending(m, b) for m in modules[a]) and any(offending(m, a) for m in modules[b]))
    assert not both_ways, f"these fastdit/data modules import each other: {both_ways}"


def test_sampling_modules_import_each_other_one_way():
    # Within fastdit/sampling, one way too (generate -> recipe -> options): the options and their schema
    # sit below the recipe, the recipe below generate, and no module reaches back, lazily or not.
    modules = {module_name(path): imported_modules(path) for path in sorted((PACKAGE / "sampling").glob("*.py"))
               if path.name != "__init__.py"}
    assert "fastdit.sampling.generate" in modules and "fastdit.sampling.recipe" in modules, "the sampling modules moved"
    both_ways = sorted((a, b) for a in modules for b in modules if a < b
                       and any(offending(m, b) for m in modules[a]) and any(offending(m, a) for m in modules[b]))
    assert not both_ways, f"these fastdit/sampling modules import each other: {both_ways}"
