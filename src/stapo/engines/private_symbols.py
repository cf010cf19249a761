"""The private symbols of other libraries that an engine relies on, and the check that they are still there.

Each engine lists its own (`stapo.engines.trl.internals`, `stapo.engines.verl.internals`): every private
method it overrides or calls, every private attribute it reads, every module attribute it replaces.
None of them is an API, so a release of TRL, transformers, verl or vLLM can rename one or change its
parameters without notice; an override then stops being called, or a default hides the change. A
`PrivateSymbol` says where the symbol is looked up, the parameters the engine relies on and what the
engine does with it; `symbol_problems` checks presence, parameters and type, and names the symbol in
every problem it finds. Version numbers are never compared: a symbol is what it was or it is not.

An engine warns (`warn_changed`) when it, or the module owning the symbol, is imported: a warning, not
an error, since a run may not reach the changed symbol. tests/engines/trl/test_engine_internals.py (TRL) and
tests/engines/verl/test_verl_internals.py check every symbol, the attributes an object has only once it runs
included.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import textwrap
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["INSTANCE", "ChangedPrivateSymbolWarning", "PrivateSymbol", "source_symbol_problems", "symbol_problems",
           "warn_changed"]

INSTANCE = "instance"  # the owner of an attribute of a running object (a trainer), looked up on that object


class ChangedPrivateSymbolWarning(RuntimeWarning):
    """A private symbol an engine relies on is missing or has other parameters than it relies on."""


@dataclass(frozen=True)
class PrivateSymbol:
    """One private symbol an engine relies on.

    owner    where it is looked up: "package.module" (a module attribute), "package.module:Class", or
             INSTANCE (an attribute of the running object the check is given: set during training)
    symbol   the attribute path below the owner ("_compute_loss", "vllm_generation._iter_named_params")
    params   the parameters of a callable, in order (None: not called)
    exact    the engine overrides or replaces it and the library calls the engine's version: the
             parameters must be exactly `params`. Otherwise the engine calls it with `params`: they
             must be there in that order, and any other parameter must be optional
    type     for a value: "package.module:Class" it must be an instance of
    keys     string keys of the data it reads or writes that the engine relies on too (a dict or TensorDict
             key): each must appear as a string literal in its source
    needs    "" (always checked) or the condition an engine module gives a meaning to (e.g. "vllm")
    use      what the engine does with it (in the docs and in every problem)
    """

    owner: str
    symbol: str
    params: tuple[str, ...] | None = None
    exact: bool = False
    type: str | None = None
    keys: tuple[str, ...] = ()
    needs: str = ""
    use: str = ""

    def name(self, instance: str = "<instance>") -> str:
        """The symbol's full name: package.module.Class.symbol, or <instance>.symbol (`instance` its name)."""
        owner = instance if self.owner == INSTANCE else self.owner.replace(":", ".")
        return f"{owner}.{self.symbol}"


def _lookup(path: str) -> Any:
    module_name, _, attributes = path.partition(":")
    value: Any = importlib.import_module(module_name)
    for part in filter(None, attributes.split(".")):
        value = getattr(value, part)
    return value


# A signature as (name, optional) pairs, in order; *args and **kwargs are optional.
Parameters = list[tuple[str, bool]]


def _parameters(value: Any) -> Parameters | None:
    try:
        parameters = inspect.signature(value).parameters.values()  # follows __wrapped__ through a wrapper
    except (TypeError, ValueError):
        return None
    return [(p.name, p.default is not p.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)) for p in parameters]


def _source_parameters(node: ast.AST) -> Parameters | None:
    args = getattr(node, "args", None)
    if not isinstance(args, ast.arguments):
        return None
    positional = args.posonlyargs + args.args
    first_default = len(positional) - len(args.defaults)
    out = [(a.arg, i >= first_default) for i, a in enumerate(positional)]
    out += [(args.vararg.arg, True)] if args.vararg else []
    out += [(a.arg, d is not None) for a, d in zip(args.kwonlyargs, args.kw_defaults)]
    return out + ([(args.kwarg.arg, True)] if args.kwarg else [])


def _parameter_problem(expected_names: tuple[str, ...], exact: bool, name: str, parameters: Parameters | None
                       ) -> str | None:
    expected = ", ".join(expected_names)
    if parameters is None:
        return f"{name} is no longer a callable with a signature (stapo relies on ({expected}))"
    names = tuple(name for name, _ in parameters)
    if exact:
        fits = names == expected_names
    else:  # every parameter stapo passes is there, in its order, and it passes every required one
        fits = ([n for n in names if n in expected_names] == list(expected_names)
                and all(optional for n, optional in parameters if n not in expected_names))
    return None if fits else f"{name} has parameters ({', '.join(names)}); stapo relies on ({expected})"


def _string_literals(tree: ast.AST) -> set[str]:
    return {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}


def _key_problem(item: PrivateSymbol, name: str, literals: set[str]) -> str | None:
    missing = [key for key in item.keys if key not in literals]
    return f"{name} no longer names the key(s) {missing} in its source" if missing else None


def _problem_line(item: PrivateSymbol, problem: str) -> str:
    return f"{problem}; stapo uses it: {item.use}"


def _missing(item: PrivateSymbol, name: str, exc: Exception) -> str:
    why = f" (its module cannot be imported: {exc})" if isinstance(exc, ImportError) else ""
    return _problem_line(item, f"{name} is missing{why}")


def symbol_problems(symbols: tuple[PrivateSymbol, ...], instance: Any = None, instance_name: str = "<instance>"
                    ) -> list[str]:
    """One line per symbol that is missing, has other parameters, is of another type or no longer names its
    keys; each line names the symbol and what the engine uses it for. Symbols owned by INSTANCE are checked
    only with an `instance` (named `instance_name`). Wrappers (`functools.wraps`, as the engines' own patches
    are) are seen through: what is checked is the library's function."""
    problems = []
    for item in symbols:
        if item.owner == INSTANCE and instance is None:
            continue
        name = item.name(instance_name)
        try:
            value = instance if item.owner == INSTANCE else _lookup(item.owner)
            for part in item.symbol.split("."):
                value = getattr(value, part)
        except (ImportError, AttributeError) as exc:
            problems.append(_missing(item, name, exc))
            continue
        problem = None
        if item.params is not None:
            problem = _parameter_problem(item.params, item.exact, name, _parameters(value))
        if problem is None and item.type is not None and not isinstance(value, _lookup(item.type)):
            problem = f"{name} is a {type(value).__name__}, not the {item.type.replace(':', '.')} stapo relies on"
        if problem is None and item.keys:
            try:
                source = textwrap.dedent(inspect.getsource(inspect.unwrap(value)))
            except (OSError, TypeError):
                problem = f"{name} has no Python source to find the key(s) {list(item.keys)} in"
            else:
                problem = _key_problem(item, name, _string_literals(ast.parse(source)))
        if problem is not None:
            problems.append(_problem_line(item, problem))
    return problems


def source_symbol_problems(symbols: tuple[PrivateSymbol, ...]) -> list[str]:
    """`symbol_problems` read from the owners' source files, without executing them: for a module that
    cannot be imported where the check runs. Definitions only (a class's own methods, module-level
    functions, classes and assignments): what a decorator or a base class would change is not seen."""
    problems = []
    for item in symbols:
        name = item.name()
        module_name, _, attributes = item.owner.partition(":")
        try:
            spec = importlib.util.find_spec(module_name)  # imports the parent packages, not the module
            if spec is None or not spec.origin:
                raise ImportError(f"no source file for {module_name}")
            node: ast.AST = ast.parse(Path(spec.origin).read_text(encoding="utf-8"))
            for part in [*filter(None, attributes.split(".")), *item.symbol.split(".")]:
                node = _definition(node, part)
        except (ImportError, AttributeError) as exc:
            problems.append(_missing(item, name, exc))
            continue
        problem = None
        if item.params is not None:
            problem = _parameter_problem(item.params, item.exact, name, _source_parameters(node))
        if problem is None and item.keys:
            problem = _key_problem(item, name, _string_literals(node))
        if problem is not None:
            problems.append(_problem_line(item, problem))
    return problems


def _definition(node: ast.AST, name: str) -> ast.AST:
    for child in getattr(node, "body", []):
        if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and child.name == name:
            return child
        targets = child.targets if isinstance(child, ast.Assign) else [getattr(child, "target", None)]
        if any(isinstance(t, ast.Name) and t.id == name for t in targets):
            return child
    raise AttributeError(f"no definition of {name!r} in {getattr(node, 'name', 'the module')}")


def warn_changed(engine: str, problems: list[str], docs: str) -> None:
    """One `ChangedPrivateSymbolWarning` per problem, naming the symbol (at an engine's import)."""
    for problem in problems:
        warnings.warn(f"{engine}: a private symbol it relies on changed: {problem}. The engine may fail or "
                      f"train differently; see {docs}", ChangedPrivateSymbolWarning, stacklevel=2)
