"""TEMPORARY alias during the move (removed before the layout lands)."""

import importlib
import sys

sys.modules[__name__] = importlib.import_module("hesse.cli._inputs")
