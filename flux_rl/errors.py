"""The one error type the toolkit raises for bad input found once a run has started. In a module of
its own so that every helper can raise it without importing the flag parser (flux_rl/args.py)."""


class ConfigurationError(ValueError):
    """Bad input found once the run has started (a dataset column, a checkpoint folder): shown in
    one line, like the errors of the parser, since its traceback would say nothing more."""
