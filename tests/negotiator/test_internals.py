"""negotiator.E001: other packages' private names the code patches, checked at start.

Every name `llm/providers/network.py` and `negotiator/websocket_server.py` declare in their
`PRIVATE_NAMES` is there in the installed packages; taking one away (as a new release would)
makes the check name it, its distribution and version, and stops the server without a traceback.
"""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import httpcore
import pytest
from autobahn.websocket import protocol as autobahn_protocol
from httpcore._async import connection_pool
from twisted.internet import abstract

from llm.checks import format_errors, run_llm_checks
from llm.local_model import free_port
from negotiator import internals

ROOT = Path(__file__).resolve().parents[2]
POOL_HOOK = "httpcore.AsyncConnectionPool._assign_requests_to_connections"


def e001(name: str) -> list[str]:
    """The negotiator.E001 messages that name `name`."""
    return [
        f"{m.msg} HINT: {m.hint}"
        for m in internals.check_internals()
        if m.id == "negotiator.E001" and f" lacks {name}," in m.msg
    ]


# Everything there now ---------------------------------------------------------------------------


def test_every_declared_name_is_there() -> None:
    assert internals.check_internals() == []


@pytest.mark.parametrize("module", internals.PATCHED_MODULES)
def test_the_declaration_read_from_source_is_the_modules_own(module: str) -> None:
    declared = internals.declared_names(module)
    assert declared, module
    assert importlib.import_module(module).PRIVATE_NAMES == declared


def _names_the_code_reaches_for(module: str) -> set[str]:
    """A floor for what a declaration must hold, from the module's syntax: private attributes it
    reads that it does not define itself, the names `getattr`/`hasattr` look up, and what it
    imports from a private module. (Public-looking internals, like autobahn's `trafficStats`, are
    beyond what syntax tells: those are declared by reading the code.)"""
    tree = ast.parse(internals._ROOT.joinpath(*module.split(".")).with_suffix(".py").read_text())
    own = {
        node.name
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
    }
    own |= {
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and isinstance(node.ctx, ast.Store)
        and isinstance(node.value, ast.Name)
        and node.value.id == "self"
    }
    wanted: set[str] = set()
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
            and node.attr not in own
        ):
            wanted.add(node.attr)
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ("getattr", "hasattr")
            and len(node.args) > 1
            and isinstance(node.args[1], ast.Constant)
        ):
            wanted.add(str(node.args[1].value))
        elif isinstance(node, ast.ImportFrom) and any(
            part.startswith("_") and not part.startswith("__")
            for part in (node.module or "").split(".")
        ):
            wanted |= {alias.name for alias in node.names}
    return wanted


@pytest.mark.parametrize("module", internals.PATCHED_MODULES)
def test_every_private_name_the_code_reaches_for_is_declared(module: str) -> None:
    declared = {name.rsplit(".", 1)[-1] for _dist, name in internals.declared_names(module)}
    assert _names_the_code_reaches_for(module) - declared == set()


def test_instance_attributes_are_looked_up_where_instances_have_them() -> None:
    # on a throwaway instance
    assert internals.missing("httpcore.AsyncConnectionPool()._requests") is None
    assert internals.missing("httpcore.AsyncConnectionPool()._no_such_list") is not None
    # in the source of the class and its bases (set as a connection is made)
    assert internals.missing("autobahn.websocket.protocol.WebSocketProtocol().send_queue") is None
    assert internals.missing("daphne.ws_protocol.WebSocketProtocol().send_queue") is None
    assert internals.missing("twisted.internet.tcp.Server().no_such_buffer") is not None
    # a class attribute is not looked for on instances, nor is object's own
    assert internals.missing("httpcore.AsyncConnectionPool._requests") is not None
    assert internals.missing("httpcore.AsyncConnectionPool.__lt__") is not None
    assert internals.missing("httpx._utils.URLPattern.__lt__") is None


# One name taken away ----------------------------------------------------------------------------


def test_a_missing_pool_hook_is_named_with_its_package_and_version(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delattr(httpcore.AsyncConnectionPool, "_assign_requests_to_connections")
    errors = internals.check_internals()
    assert [m.id for m in errors] == ["negotiator.E001"]
    version = importlib.metadata.version("httpcore")
    assert errors[0].msg == (
        f"httpcore {version} lacks {POOL_HOOK}, which llm.providers.network relies on."
    )
    assert "written for httpcore" in errors[0].hint
    assert "requirements/run.txt" in errors[0].hint


def test_a_missing_import_time_name_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    import httpcore._utils

    monkeypatch.delattr(httpcore._utils, "is_socket_readable")
    assert len(e001("httpcore._utils.is_socket_readable")) == 1


def test_a_missing_twisted_transport_buffer_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(abstract.FileDescriptor, "dataBuffer")
    (message,) = e001("twisted.internet.tcp.Server.dataBuffer")
    version = importlib.metadata.version("twisted")
    assert message.startswith(f"twisted {version} lacks twisted.internet.tcp.Server.dataBuffer, ")
    assert "negotiator.websocket_server relies on" in message


def test_a_missing_autobahn_state_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(autobahn_protocol.WebSocketProtocol, "STATE_OPEN")
    (message,) = e001("autobahn.websocket.protocol.WebSocketProtocol.STATE_OPEN")
    assert message.startswith(f"autobahn {importlib.metadata.version('autobahn')} lacks ")


def test_an_instance_attribute_a_new_release_stopped_setting_is_named(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def init(self: object, request: httpcore.Request) -> None:
        self.request = request  # type: ignore[attr-defined]

    monkeypatch.setattr(connection_pool.AsyncPoolRequest, "__init__", init)
    (message,) = e001("httpcore._async.connection_pool.AsyncPoolRequest().connection")
    assert "(a new httpcore._async.connection_pool.AsyncPoolRequest() has no connection)" in message


def test_the_entry_points_stop_on_it_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """The other checks import the patching modules: they do not run while E001 stands."""
    monkeypatch.delattr(httpcore.AsyncConnectionPool, "_assign_requests_to_connections")
    monkeypatch.setattr("llm.checks.check_proxies", lambda **kw: pytest.fail("ran"))
    problems = format_errors(run_llm_checks())
    assert problems.startswith(
        f"(negotiator.E001) httpcore {httpcore.__version__} lacks {POOL_HOOK},"
    )
    assert " HINT: This code was written for httpcore" in problems


# The real entry points --------------------------------------------------------------------------

# A wrapper run as `python -c`: takes the pool's hook away, as a release without it would, then
# runs what follows it on the command line (daphne's command line, or manage.py).
WITHOUT_POOL_HOOK = """
import runpy, sys, httpcore
del httpcore.AsyncConnectionPool._assign_requests_to_connections
sys.argv = sys.argv[1:]
if sys.argv[0] == "daphne":
    runpy.run_module("daphne", run_name="__main__", alter_sys=True)
else:
    runpy.run_path(sys.argv[0], run_name="__main__")
"""


def run_without_pool_hook(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("LLM_", "LM_STUDIO_", "OPENROUTER_", "DJANGO_"))
    }
    env |= {
        "DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite3'}",
        "LLM_LOCAL_MODEL": "off",
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    return subprocess.run(
        [sys.executable, "-c", WITHOUT_POOL_HOOK, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_daphne_does_not_start_without_the_pool_hook(tmp_path: Path) -> None:
    port = str(free_port())
    result = run_without_pool_hook(
        tmp_path, "daphne", "-b", "127.0.0.1", "-p", port, "negotiator.asgi:application"
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "(negotiator.E001) httpcore " in output
    assert f"lacks {POOL_HOOK}, which llm.providers.network relies on." in output
    assert "Traceback" not in output
    assert "Listening on" not in output


@pytest.mark.parametrize("command", ["check", "serve"])
def test_manage_py_reports_it(tmp_path: Path, command: str) -> None:
    result = run_without_pool_hook(tmp_path, "manage.py", command)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "(negotiator.E001) httpcore " in output
    assert POOL_HOOK in output
    assert "Traceback" not in output
