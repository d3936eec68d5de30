from django.apps import AppConfig


class NegotiationConfig(AppConfig):
    name = "negotiation"
    verbose_name = "Negotiations"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from django.core import checks

        from . import checks as negotiation_checks

        for check in negotiation_checks.ALL_CHECKS:
            checks.register(check, "negotiation")
