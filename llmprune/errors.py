"""The one exception type users see: a readable sentence that names the fix."""


class LLMPruneError(Exception):
    """Bad input or an unmet requirement. The CLI prints it as one line (traceback only with --debug)."""
