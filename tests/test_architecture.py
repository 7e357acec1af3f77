"""The package's shape: an acyclic import graph in layers, and one complete record per model type."""

from __future__ import annotations

import ast
import pathlib

import pytest

import vla_foundry_jax
from vla_foundry_jax import registry

ROOT = pathlib.Path(vla_foundry_jax.__file__).parent
REPO = ROOT.parent

# Bottom -> top. A module may import from its own layer or a lower one (docs/architecture.md).
LAYERS = [
    ("registry", "errors", "params", "paths", "host_memory", "cpu_threads"),
    ("configs",),
    ("layers", "parallel"),
    ("checkpoint",),
    ("convert", "data"),
    ("models",),
    ("training", "sampling"),
    ("serving",),
    ("testbeds", "gin_utils"),
    ("apps", "cli"),
]


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules() -> dict[str, pathlib.Path]:
    return {module_name(p): p for p in ROOT.rglob("*.py")}


def imported_modules(name: str, path: pathlib.Path, known: set[str]) -> set[str]:
    """Package modules ``name`` imports anywhere in its file (module level, inside functions, under TYPE_CHECKING)."""
    out = set()
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".")
                anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `from pkg import name` where name is not a module
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def import_graph() -> dict[str, set[str]]:
    modules = package_modules()
    known = set(modules)
    return {name: imported_modules(name, path, known) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as a path ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def layer_of(name: str) -> int | None:
    parts = name.split(".")
    if len(parts) < 2:
        return None  # the package root imports everything so that importing it registers everything
    for i, group in enumerate(LAYERS):
        if parts[1] in group:
            return i
    raise AssertionError(f"{name} belongs to no layer; add its top-level name to LAYERS and docs/architecture.md")


def test_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_import_graph_has_no_cycle():
    graph = import_graph()
    assert len(graph) > 50  # the walk found the package
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_imports_only_go_down_the_layers():
    upward = [
        f"{src} (layer {layer_of(src)}) imports {dst} (layer {layer_of(dst)})"
        for src, targets in sorted(import_graph().items())
        for dst in sorted(targets)
        if layer_of(src) is not None and layer_of(dst) is not None and layer_of(dst) > layer_of(src)
    ]
    assert not upward, "\n".join(upward)


def test_launch_tests_and_benchmarks_use_the_library_not_launch():
    offenders = []
    for folder in ("launch", "tests", "benchmarks"):
        for path in (REPO / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "launch":
                    offenders.append(f"{path.relative_to(REPO)} imports {node.module}")
                if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "launch" for a in node.names):
                    offenders.append(f"{path.relative_to(REPO)} imports launch")
    assert not offenders, "\n".join(offenders)


MODEL_TYPES = sorted(k for k, c in registry.PARAMS.items() if c.family == "model" and not k.startswith("test_"))
BUILT_INSIDE_A_PARENT = {"unet", "noise_scheduler"}  # the original builds these inside stable_diffusion / policies
WITH_HF_PRETRAINED = {"transformer_hf", "vit_hf", "clip_hf", "clip_backbone", "vlm_hf", "vlm_backbone", "unet"}


@pytest.mark.parametrize("key", MODEL_TYPES)
def test_every_model_type_has_one_complete_record(key):
    record = registry.model_record(key)
    assert record.params is registry.PARAMS[key] and record.type == key
    if key in BUILT_INSIDE_A_PARENT:
        assert record.builder is None and record.loss is None
    else:
        assert callable(record.builder)
    if "hf_pretrained" in {f for f in record.params.__dataclass_fields__}:
        assert key in WITH_HF_PRETRAINED and callable(record.weight_loader), f"{key} names weights it cannot load"
    if "pretrained" in record.params.__dataclass_fields__:
        assert callable(record.weight_loader)
    for field in ("loss", "weight_loader", "batch_check", "frozen_paths", "resume_loader", "eval_metrics"):
        value = getattr(record, field)
        assert value is None or callable(value)


def test_trainable_top_level_types_have_a_loss():
    trainable = {k for k in MODEL_TYPES if registry.model_record(k).loss is not None}
    assert trainable >= {
        "transformer",
        "transformer_hf",
        "vlm",
        "vlm_hf",
        "clip_hf",
        "clip_openclip",
        "stable_diffusion",
        "diffusion_policy",
    }


def test_a_second_record_for_a_type_is_refused():
    record = registry.model_record("transformer")
    with pytest.raises(ValueError, match="registered twice"):
        registry.register_model(registry.ModelRecord(params=record.params, builder=lambda *a, **k: None))
    assert registry.model_record("transformer") is record
