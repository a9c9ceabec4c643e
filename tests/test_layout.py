"""The library's import structure: no import from a lower layer to a higher one, no library module
importing the CLI plumbing, no private name imported across packages."""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "m2r2_jax"

# lower layers first; a module may import its own package and packages of lower rank
RANK = {
    "errors": -1,
    "config": 0,
    "kernels": 0,
    "backend": 1,
    "sharding": 1,
    "model": 2,
    "loading": 3,
    "m2r2": 3,
    "peers": 3.5,
    "offload": 3.5,  # model-independent (numpy + stdlib): imports only errors-level modules
    "decoding": 4,
    "data": 4,
    "training": 5,
    "evaluation": 5,
    "cli": 6,
    "aot": 6,
    "roofline": 0,
    "stats": 0,
    "distill_cache": 0,
    "orbax_paths": 0,
}


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _imports():
    for f in sorted(PKG.rglob("*.py")):
        mod = ".".join(f.relative_to(PKG.parent).with_suffix("").parts).removesuffix(".__init__")
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("m2r2_jax"):
                yield mod, node.module, [a.name for a in node.names]
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.startswith("m2r2_jax"):
                        yield mod, a.name, []


def test_every_package_has_a_rank():
    pkgs = {f.relative_to(PKG).parts[0].removesuffix(".py") for f in PKG.glob("*") if f.suffix == ".py" or f.is_dir()}
    pkgs -= {"__init__", "__pycache__", "assets"}
    assert pkgs <= set(RANK), pkgs - set(RANK)


def test_no_upward_imports():
    bad = []
    for mod, target, _ in _imports():
        src, dst = _package(mod), _package(target)
        if not dst or src == dst:
            continue
        if RANK[dst] > RANK[src] or (RANK[dst] == RANK[src]):
            bad.append(f"{mod} -> {target}")
    assert not bad, bad


def test_no_private_names_across_packages():
    bad = [
        f"{mod} -> {target}.{n}"
        for mod, target, names in _imports()
        for n in names
        if n.startswith("_") and _package(mod) != _package(target)
    ]
    assert not bad, bad


def test_library_never_imports_the_cli():
    assert not [m for m, t, _ in _imports() if t == "m2r2_jax.cli" and m != "m2r2_jax.cli"]
