"""Check the names the vLLM backend passes against a vLLM release, read from its wheel.

vLLM cannot be installed beside the CPU test environment (it needs its own torch), and no
GPU is needed to know whether ``LLM(..., enable_prefix_caching=...)`` still exists: the
wheel's source says. ``python -m bft_resources.engine.vllm_contract WHEEL`` prints every
name the backend passes (``VLLM_CALLS``) that the release no longer accepts, and exits 1 if
there is one.
"""

import ast
import sys
import zipfile
from collections.abc import Mapping

# Where each callable is defined in the wheel. LLM(**kwargs) hands unknown keyword
# arguments to EngineArgs, so EngineArgs' fields are accepted by LLM too.
_SOURCES = {
    "vllm.LLM": ("vllm/entrypoints/llm.py", "LLM", "__init__"),
    "vllm.LLM.generate": ("vllm/entrypoints/llm.py", "LLM", "generate"),
    "vllm.LLM.get_tokenizer": ("vllm/entrypoints/llm.py", "LLM", "get_tokenizer"),
    "vllm.SamplingParams": ("vllm/sampling_params.py", "SamplingParams", None),
    "vllm.inputs.TokensPrompt": ("vllm/inputs/llm.py", "TokensPrompt", None),
    "vllm.v1.engine.core_client.EngineCoreClient.shutdown": (
        "vllm/v1/engine/core_client.py",
        "EngineCoreClient",
        "shutdown",
    ),
}
_ENGINE_ARGS = ("vllm/engine/arg_utils.py", "EngineArgs")


def _class(tree: ast.Module, name: str) -> ast.ClassDef | None:
    return next((n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == name), None)


def _fields(cls: ast.ClassDef) -> set[str]:
    """Annotated class attributes: a dataclass's, a msgspec Struct's or a TypedDict's keys."""
    return {
        n.target.id
        for n in cls.body
        if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)
    }


def _parameters(cls: ast.ClassDef, method: str) -> tuple[set[str], bool] | None:
    """(parameter names, takes **kwargs) of a method, or None if the class has none of that name."""
    for node in cls.body:
        if isinstance(node, ast.FunctionDef) and node.name == method:
            args = node.args
            names = {a.arg for a in args.posonlyargs + args.args + args.kwonlyargs} - {"self"}
            return names, args.kwarg is not None
    return None


def accepted_names(sources: Mapping[str, str]) -> dict[str, set[str] | None]:
    """What each callable of ``_SOURCES`` accepts in this release (None: it is gone)."""
    trees = {path: ast.parse(text) for path, text in sources.items()}
    engine_args = (
        _class(trees[_ENGINE_ARGS[0]], _ENGINE_ARGS[1]) if _ENGINE_ARGS[0] in trees else None
    )
    out: dict[str, set[str] | None] = {}
    for call, (path, cls_name, method) in _SOURCES.items():
        cls = _class(trees[path], cls_name) if path in trees else None
        if cls is None:
            out[call] = None
        elif method is None:
            out[call] = _fields(cls)
        else:
            found = _parameters(cls, method)
            if found is None:
                out[call] = None
            else:
                names, kwargs = found
                if kwargs and call == "vllm.LLM" and engine_args is not None:
                    names |= _fields(engine_args)
                out[call] = names
    return out


def problems(sources: Mapping[str, str], calls: Mapping[str, tuple[str, ...]]) -> list[str]:
    """Every call or keyword of ``calls`` the release does not accept, one line each."""
    accepted = accepted_names(sources)
    lines = []
    for call, names in calls.items():
        if call not in accepted:
            lines.append(f"{call}: bft does not know where vLLM defines it")
        elif accepted[call] is None:
            lines.append(f"{call}: not found in this vLLM release")
        else:
            lines += [f"{call}: no parameter {name!r} in this vLLM release" for name in names
                      if name not in accepted[call]]  # fmt: skip
    return lines


def wheel_sources(wheel: str) -> dict[str, str]:
    wanted = {path for path, _, _ in _SOURCES.values()} | {_ENGINE_ARGS[0]}
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        return {p: archive.read(p).decode() for p in wanted if p in names}


def main(argv: list[str] | None = None) -> int:
    from bft_resources.engine.vllm import VLLM_CALLS

    (wheel,) = argv if argv is not None else sys.argv[1:]
    found = problems(wheel_sources(wheel), VLLM_CALLS)
    print("\n".join(found) if found else f"{wheel}: every call of the vLLM backend matches")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
