from django.apps import AppConfig


class LLMConfig(AppConfig):
    name = "llm"
    verbose_name = "LLM"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from django.core import checks

        from . import checks as llm_checks

        for check in llm_checks.ALL_CHECKS:
            checks.register(check, "llm")
        for check in llm_checks.DEPLOY_CHECKS:
            checks.register(check, "llm", deploy=True)
