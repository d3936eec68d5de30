"""Production settings: `check --deploy` is clean but for what the README explains.

Assets are served.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from django.core.checks import Warning
from django.test import AsyncClient

from llm.checks import check_api_token

ROOT = Path(__file__).resolve().parents[2]
PRODUCTION = {
    "DJANGO_DEBUG": "false",
    "DJANGO_SECRET_KEY": "x" * 20 + "-a-long-random-production-secret-0123456789",
    "DJANGO_ALLOWED_HOSTS": "negotiator.example.com",
}


def deploy_check(**extra: str) -> str:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("DJANGO_", "LLM_", "API_TOKEN"))
    }
    env |= PRODUCTION | extra | {"DATABASE_URL": "sqlite:////tmp/negotiator-deploy-check.sqlite3"}
    result = subprocess.run(
        [sys.executable, "manage.py", "check", "--deploy"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert "Traceback" not in result.stderr
    return result.stdout + result.stderr


def test_deploy_check_reports_only_what_the_readme_explains() -> None:
    output = deploy_check()
    ids = set(re.findall(r"\((\w+\.[EW]\d{3})\)", output))
    assert ids == {"llm.W002", "security.W004"}, output
    readme = (ROOT / "README.md").read_text()
    assert all(check_id in readme for check_id in ids)


def test_deploy_check_is_clean_with_a_token_and_hsts() -> None:
    output = deploy_check(API_TOKEN="a-long-random-api-token", DJANGO_HSTS_SECONDS="31536000")
    assert "no issues" in output, output


def test_w002_warns_when_debug_is_off_without_a_token(settings) -> None:
    settings.DEBUG, settings.API_TOKEN = False, ""
    [warning] = check_api_token()
    assert isinstance(warning, Warning) and warning.id == "llm.W002"
    settings.API_TOKEN = "set"
    assert check_api_token() == []
    settings.DEBUG, settings.API_TOKEN = True, ""
    assert check_api_token() == []


@pytest.mark.parametrize("path", ["/static/admin/css/base.css", "/static/ninja/swagger-ui.css"])
async def test_admin_and_docs_assets_are_served(path: str) -> None:
    response = await AsyncClient().get(path)
    assert response.status_code == 200
    body = (
        b"".join([chunk async for chunk in response.streaming_content])
        if response.streaming
        else response.content
    )
    assert len(body) > 100
