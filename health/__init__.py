"""Health: is the database answering, is the LLM provider reachable (django-ninja endpoints)."""
