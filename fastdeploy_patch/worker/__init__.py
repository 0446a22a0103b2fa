"""Worker-process glue: the signal group created once and the per-step status sync."""
