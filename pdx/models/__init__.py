"""Models pdx builds itself (no downloads): see ``pdx.models.tiny``."""
