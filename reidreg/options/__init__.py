"""Every option of every command checked before any work, by rules declared one way.

``rules``: what an option accepts (``integer(min=1)`` → "an integer >= 1"); ``tables``: the rule of each
option of ``reidreg.train``, ``evaluate``, ``extract`` and ``export``; a regularizer declares its own in
``OPTION_RULES``. ``check``: a composed config against its table, unknown keys ("did you mean ..."),
relations between options; ``folders``: output and data folders, checkpoint files; ``callback``: the Hydra
callback that runs all of it before Hydra creates a run folder. Only omegaconf, Hydra and the standard
library are imported until the cheap checks have passed.
"""
