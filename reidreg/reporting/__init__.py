"""The parts of ``python -m reidreg.report``: gather runs, name methods, compare over seeds, plot."""
