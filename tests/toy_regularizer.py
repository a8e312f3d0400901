"""A regularizer that declares the rules of its own options, as every regularizer does: for the tests of
the option checks (tests/test_options.py, and tests/test_cli.py through ``python -m reidreg.train``)."""

from __future__ import annotations

from typing import ClassVar

from reidreg.options.rules import Rule, choice, number
from reidreg.regularizers.base import Regularizer


class ToyRegularizer(Regularizer):
    OPTION_RULES: ClassVar[dict[str, Rule]] = {"lam": number(ge=0), "mode": choice("coupled", "decoupled")}

    def __init__(self, *, lam: float = 0.0, mode: str = "coupled") -> None:
        super().__init__()
        self.lam, self.mode = lam, mode


SELECT = f"+regularizer.toy._target_={__name__}.ToyRegularizer"  # the override that selects it
