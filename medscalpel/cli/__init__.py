"""The ``medscalpel`` command line (typer).

Import rule of this package -- the one place in medscalpel that defers imports:

* At module top a ``medscalpel/cli`` module imports only the standard library, typer, rich and
  the light medscalpel modules that import neither NumPy nor torch: ``medscalpel.errors``,
  ``medscalpel.validation`` and ``medscalpel.cli.*``.
* Everything else of the library (and so NumPy, torch, scikit-learn...) is imported inside the
  body of the command that uses it, at the body's top.

Building the app imports every command module (typer reads their signatures), so this rule is
what keeps ``medscalpel -h`` and ``medscalpel CMD -h`` fast; the library's own modules import
at their top, where the import graph stays visible. ``tests/test_cli_truth.py`` checks that
importing ``medscalpel.cli.main`` leaves torch and NumPy unimported.
"""
