"""Other packages' private names this project relies on, checked at start (`negotiator.E001`).

Two modules reach into other packages' internals, for speed or around their bugs:
`llm/providers/network.py` (httpx, httpcore, asyncio) and `negotiator/websocket_server.py`
(daphne, autobahn, Twisted). Each declares beside its code, in a module-level `PRIVATE_NAMES`
tuple of `(distribution, dotted name)` literals, every private or undocumented name it uses. This
module reads those declarations from the modules' source, without importing them (an import that
stops on a missing name would end in a traceback before any check could name it), and looks each
name up in the installed packages. A name that is gone is an error, never a fallback: the server
does not start (`negotiator/asgi.py`, through `llm.checks.run_llm_checks`) and `manage.py check`
reports it, naming the distribution, its installed version and the name.

A dotted name is looked up in one of two ways:
- `module.Class.name` (or `module.name`): an attribute of the module or class, or of a class it
  inherits from other than `object` (so a `__lt__` counts only where the package defines one).
- `module.Class().name`: an attribute only instances have. Where `INSTANCES` below can build a
  throwaway instance without I/O, it is looked up on that instance. Else (objects that exist only in
  a running server: a Twisted transport, an autobahn or daphne protocol, whose attributes are set
  when a connection is made) by finding `self.name` assigned (`=`, `+=` or annotated) in the source
  of the class or of a class it inherits from.
"""

from __future__ import annotations

import ast
import asyncio
import functools
import importlib
import importlib.metadata
import inspect
import platform
import re
import tomllib
from collections.abc import Callable, Iterable
from pathlib import Path
from types import ModuleType
from typing import Any

from django.core.checks import CheckMessage, Error

# The modules that patch other packages' internals, each with its own `PRIVATE_NAMES`.
PATCHED_MODULES = ("llm.providers.network", "negotiator.websocket_server")

# The project's packages all sit beside this one (in a checkout or in site-packages).
_ROOT = Path(__file__).resolve().parents[1]

# The distribution name standing for the standard library.
PYTHON = "Python"


def _new_stream_reader() -> Any:
    loop = asyncio.new_event_loop()  # a StreamReader binds to a loop; this one never runs
    try:
        return asyncio.StreamReader(loop=loop)
    finally:
        loop.close()


def _new_pool_request() -> Any:
    import httpcore
    from httpcore._async.connection_pool import AsyncPoolRequest

    return AsyncPoolRequest(httpcore.Request("GET", "http://127.0.0.1/"))


def _new_proxy() -> Any:
    import httpcore

    return httpcore.AsyncHTTPProxy(proxy_url="http://127.0.0.1:3128/")


def _new_pool() -> Any:
    import httpcore

    return httpcore.AsyncConnectionPool()


def _new_transport() -> Any:
    import httpx

    return httpx.AsyncHTTPTransport()  # builds its pool and SSL context; connects nowhere


def _new_traffic_stats() -> Any:
    from autobahn.websocket.protocol import TrafficStats

    return TrafficStats()


# How to build a throwaway instance, without I/O, of the classes whose instance attributes are
# checked on an instance (by the class's dotted name, as the declarations write it).
INSTANCES: dict[str, Callable[[], Any]] = {
    "asyncio.StreamReader": _new_stream_reader,
    "httpcore.AsyncConnectionPool": _new_pool,
    "httpcore.AsyncHTTPProxy": _new_proxy,
    "httpcore._async.connection_pool.AsyncPoolRequest": _new_pool_request,
    "httpx.AsyncHTTPTransport": _new_transport,
    "autobahn.websocket.protocol.TrafficStats": _new_traffic_stats,
}


def declared_names(module: str) -> tuple[tuple[str, str], ...]:
    """The `PRIVATE_NAMES` literal of a project module, read from its source (not imported)."""
    path = _ROOT.joinpath(*module.split(".")).with_suffix(".py")
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    for node in tree.body:
        if isinstance(node, ast.Assign):
            targets, value = node.targets, node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            targets, value = [node.target], node.value
        else:
            continue
        if any(isinstance(target, ast.Name) and target.id == "PRIVATE_NAMES" for target in targets):
            return tuple((str(dist), str(name)) for dist, name in ast.literal_eval(value))
    raise LookupError(f"{path} declares no PRIVATE_NAMES literal")


def all_declared_names() -> list[tuple[str, str, str]]:
    """(module, distribution, dotted name) for every declared name."""
    return [(module, *entry) for module in PATCHED_MODULES for entry in declared_names(module)]


def _resolve(dotted: str) -> Any:
    """The module, class or attribute a dotted name names, importing modules on the way."""
    parts = dotted.split(".")
    found: Any = importlib.import_module(parts[0])
    for index, part in enumerate(parts[1:], start=1):
        if isinstance(found, type):
            found = _class_attribute(found, part)
        elif hasattr(found, part):
            found = getattr(found, part)
        elif isinstance(found, ModuleType):
            try:  # a submodule not imported yet
                found = importlib.import_module(".".join(parts[: index + 1]))
            except ModuleNotFoundError as exc:
                if exc.name != ".".join(parts[: index + 1]):
                    raise  # the submodule is there and fails to import something else
                raise AttributeError(f"module {found.__name__} has no {part!r}") from None
        else:
            raise AttributeError(f"{'.'.join(parts[:index])} has no {part!r}")
    return found


def _class_attribute(cls: type, name: str) -> Any:
    for klass in cls.__mro__:
        if klass is not object and name in vars(klass):
            return getattr(cls, name)
    raise AttributeError(f"{cls.__qualname__} has no attribute {name!r}")


@functools.cache
def _class_nodes(source_file: str) -> dict[str, ast.ClassDef]:
    """The class definitions of a source file, by qualified name (parsed once per process)."""
    tree = ast.parse(Path(source_file).read_text(encoding="utf-8"), source_file)
    found: dict[str, ast.ClassDef] = {}

    def visit(body: Iterable[ast.stmt], prefix: str) -> None:
        for node in body:
            if isinstance(node, ast.ClassDef):
                found[prefix + node.name] = node
                visit(node.body, f"{prefix}{node.name}.")
            elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                visit(node.body, f"{prefix}{node.name}.<locals>.")

    visit(tree.body, "")
    return found


def _assigned_to_self(cls: type, name: str) -> bool:
    """Whether `self.<name>` is assigned anywhere in the source of `cls` or a class it inherits."""
    for klass in cls.__mro__:
        try:
            source_file = inspect.getsourcefile(klass)
        except TypeError:  # a built-in class
            continue
        node = _class_nodes(source_file).get(klass.__qualname__) if source_file else None
        for sub in ast.walk(node) if node else ():
            if (
                isinstance(sub, ast.Attribute)
                and isinstance(sub.ctx, ast.Store)
                and sub.attr == name
                and isinstance(sub.value, ast.Name)
                and sub.value.id == "self"
            ):
                return True
    return False


def missing(dotted: str) -> str | None:
    """None when the name is there; else why not ("" when it is simply not found)."""
    owner, instance, attribute = dotted.partition("().")
    try:
        found = _resolve(owner)
    except AttributeError:
        return ""
    except ImportError as exc:
        return f"{type(exc).__name__}: {exc}"
    if not instance:
        return None
    if not isinstance(found, type):
        return f"{owner} is not a class"
    build = INSTANCES.get(owner)
    if build is not None:
        try:
            obj = build()
        except Exception as exc:  # a constructor that changed breaks the code as a lost name does
            return f"{owner}() cannot be built to look: {type(exc).__name__}: {exc}"
        return None if hasattr(obj, attribute) else f"a new {owner}() has no {attribute}"
    if _assigned_to_self(found, attribute):
        return None
    return f"no method of {owner} or of its bases sets self.{attribute}"


def installed_version(distribution: str) -> str:
    if distribution == PYTHON:
        return platform.python_version()
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "(not installed)"


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirements() -> tuple[list[str], str]:
    """The project's dependencies and its Python range: from pyproject.toml in a checkout, else
    from the installed project's metadata."""
    pyproject = _ROOT / "pyproject.toml"
    if pyproject.is_file():
        project = tomllib.loads(pyproject.read_text(encoding="utf-8")).get("project", {})
        extras = project.get("optional-dependencies", {}).values()
        requirements = [*project.get("dependencies", []), *(r for extra in extras for r in extra)]
        return requirements, project.get("requires-python", "")
    try:
        metadata = importlib.metadata.metadata("negotiator")
        return importlib.metadata.requires("negotiator") or [], metadata["Requires-Python"] or ""
    except importlib.metadata.PackageNotFoundError:
        return [], ""


def written_for(distribution: str) -> str:
    """The version range the project asks for, e.g. `httpcore>=1.0.9,<1.1`."""
    requirements, python = _requirements()
    if distribution == PYTHON:
        return f"Python {python or '>=3.11'}"
    for requirement in requirements:
        match = re.match(r"\s*([A-Za-z0-9._-]+)\s*(\[[^\]]*\])?\s*([^;]*)", requirement)
        if match and _canonical(match[1]) == _canonical(distribution) and match[3].strip():
            return f"{distribution}{match[3].strip()}"
    return f"the {distribution} range pyproject.toml gives"


def check_internals(**kwargs: Any) -> list[CheckMessage]:
    """negotiator.E001: each declared private name the installed packages lack."""
    errors: list[CheckMessage] = []
    for module, distribution, dotted in all_declared_names():
        problem = missing(dotted)
        if problem is None:
            continue
        errors.append(
            Error(
                f"{distribution} {installed_version(distribution)} lacks {dotted}, which {module} "
                f"relies on{f' ({problem})' if problem else ''}.",
                hint=f"This code was written for {written_for(distribution)}: install the locked "
                "versions (pip install --require-hashes -r requirements/run.txt, as `make run` "
                f"does), or pin {distribution} to that range.",
                id="negotiator.E001",
            )
        )
    return errors
